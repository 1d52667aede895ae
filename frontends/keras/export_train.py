"""A Keras model's training as a C library: `model.export_train("NAME.so")`.

The compiled train step (forward, loss, gradients, optimizer update: trainer.py's
graph) is linked with a small C wrapper that owns the weights and optimizer slots (two
sets, swapped each step, as in Python) and computes the optimizer's per-step scalars:

    NAME_trainer *t;  NAME_trainer_create(&t);           // the model's current weights
    NAME_train_step(t, x, y, &loss);                      // one batch: x float32, y as fit takes it
    NAME_get_param(t, i, dst);  NAME_set_param(t, i, src);  NAME_set_learning_rate(t, lr);
    NAME_trainer_destroy(t);

For data parallelism (MPI, or any all-reduce) the CPU library also has the step split
in two around one in-place all-reduce of one float32 buffer (trainer.py's
gradient_graph and update_graph, as keras.distribution runs them in Python):

    NAME_compute_gradients(t, x, y, first_row, batch_rows, &loss);  // this process's rows
    MPI_Allreduce(MPI_IN_PLACE, NAME_gradients(t), (int)NAME_gradient_count(),
                  MPI_FLOAT, MPI_SUM, comm);
    NAME_apply_gradients(t, &loss);                     // the optimizer step; loss: the batch's

x and y are rows first_row .. first_row + B - 1 (B: the library's batch) of a global
batch of batch_rows rows; the process's share s = B / batch_rows scales what it writes
into the buffer (s · loss, s · each gradient, s · each moving statistic's new value;
metric sums as they are), so the sum is the global batch's. The dropout masks are the
process's rows of the masks one process would draw for the global batch (each process
moves its stream past all of them), so with one seed everywhere the processes train as
one with the global batch, up to float rounding (BatchNormalization: each process's
batch statistics are its own rows', as in Keras; the moving statistics are averaged).
apply_gradients advances the step count and swaps the weight sets as NAME_train_step
does; one process passes (0, B) and needs no all-reduce. The library links the fused
step and the two split programs (prefixes NAME, NAME_split_gradients,
NAME_split_apply) around one copy of Kiln's runtime (compiler.driver.build_several);
the split programs' instances are made on the first split call. `target="cuda"` (and
"cuda-sim") has no split: those functions are absent there.

The step's own API (NAME_run, NAME_create, ...) is in the same library. The header
NAME.h beside it documents the buffers. `target="cuda"` gives the same API over a
--target cuda step: the two sets live in GPU memory (NAME_alloc), and a step copies
one block up (x, y, masks, scalars) and one down (loss, metric sums). Dropout masks
are drawn by the wrapper each step from a splitmix64 stream (NAME_set_seed; seed 0 at
creation): a mask element keeps its unit when the draw's top 24 bits, as a fraction of
2^24, are at least the rate (then it is 1 / (1 - rate), as in Python's training).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.driver import TARGETS, build, build_cuda, build_several, lower_graph
from frontends.keras.data_parallel import gradient_layout
from frontends.keras.trainer import ALIGN, aligned_offsets, gradient_graph, train_graph, update_graph
from ir.errors import UnsupportedError


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _scalar_expressions(optimizer) -> list[str]:
    """Each per-step scalar as a C expression of `lr` and `step` (= iterations + 1), in
    float32 arithmetic as optimizer.step_scalars() computes it."""
    known = {"learning_rate": "lr"}
    if hasattr(optimizer, "beta_1"):
        b1, b2 = optimizer.beta_1, optimizer.beta_2
        known["alpha"] = f"lr * sqrtf(1.0f - powf({b2!r}f, step)) / (1.0f - powf({b1!r}f, step))"
    return [known[s] for s in optimizer.scalars]


@dataclass(frozen=True)
class _Split:
    """The split step in a CPU library: the prefixes of its gradient and update programs,
    and the gradient buffer: each gradient-program output's offset (floats), described
    for the header, and the buffer's length."""

    gradients: str
    apply: str
    offsets: list[int]
    entries: list[str]
    count: int


def _split(name: str, outputs: list[tuple[str, int]]) -> _Split:
    """The buffer of the gradient program's outputs (what, elements), laid out as
    data-parallel fit lays it out."""
    offsets, end = gradient_layout([size for _, size in outputs])
    entries = [f"[{o}] {what}" for o, (what, _) in zip(offsets, outputs)]
    return _Split(f"{name}_split_gradients", f"{name}_split_apply", offsets, entries, end)


_TRAINER_ERRORS = """
API const char *{name}_trainer_last_error(const {name}_trainer *t) {{
    if (t) return t->error[0] ? t->error : {core}_last_error(t->m);
    const char *why = kiln_thread_error();
    return why ? why : "no trainer (NULL handle: did {name}_trainer_create fail?)";
}}
"""


def _wrapper(
    name: str,
    core: str,
    n_ins_head: int,
    state_sizes: list[int],
    n_weights: int,
    param_names: list[str],
    n_metrics: int,
    scalars: list[str],
    lr: float,
    iterations: int,
    masks: list[tuple[float, int]],
    io_bytes: tuple[int, int],
    cuda: bool = False,
    *,
    batch_rows: int,
    split: _Split | None = None,
) -> str:
    """The trainer's C. On the CPU it owns the two sets of weights and slots in host
    memory and passes pointers to {core}_run; for CUDA the sets are device memory
    ({core}_alloc) and a step uploads one block (x, y, masks, scalars), runs
    {core}_run_device and downloads one block (the loss, the metric sums). `masks`:
    each mask's rate and size (batch_rows rows); `split`: the split step's programs
    (CPU only), whose API _split_c writes."""
    n_state = len(state_sizes)
    n_masks = len(masks)
    mask_rates = ", ".join(f"{rate!r}" for rate, _ in masks) or "0"
    mask_sizes = ", ".join(f"{size}L" for _, size in masks) or "0"
    mask_rows = ", ".join(f"{size // batch_rows}L" for _, size in masks) or "0"
    n_in = n_ins_head + n_state + len(scalars)
    n_out = 1 + n_metrics + n_state
    sizes = ", ".join(f"{n}L" for n in state_sizes)
    names = ", ".join(f'"{p}"' for p in param_names)
    scalar_lines = "\n".join(f"    t->scalars[{i}] = {e};" for i, e in enumerate(scalars))
    # the CUDA trainer's batch block: x, y, each mask, then the scalars side by side
    block = [*io_bytes, *(4 * size for _, size in masks), 4 * max(len(scalars), 1)]
    offsets, end = aligned_offsets(block, ALIGN)
    x_off, y_off, *mask_offs, scalar_off = offsets
    if cuda:
        api = f"""int {core}_create({core}_model **out);
int {core}_run_device({core}_model *m, const void *const *dev_inputs, void *const *dev_outputs, void *stream);
int {core}_alloc({core}_model *m, size_t bytes, void **dev);
int {core}_upload({core}_model *m, void *dev, const void *host, size_t bytes);
int {core}_download({core}_model *m, void *host, const void *dev, size_t bytes);"""
        fields = f"""    void *state[2][N_STATE]; /* device memory, from {core}_alloc */
    void *batch_dev, *results_dev;
    unsigned char *batch; /* the host side of batch_dev: x, y, masks, scalars */
    float *scalars;       /* in batch */
    float results[1 + {n_metrics}]; /* loss, metric sums */
    const void *ins[2][N_IN];  /* device addresses */
    void *outs[2][N_OUT];"""
        setup = f"""    if (!(t->batch = calloc(1, BATCH_BYTES))) {{
        {name}_trainer_destroy(t);
        return kiln_thread_failed("out of memory for the batch's staging (%d bytes)", BATCH_BYTES);
    }}
    if ({core}_alloc(t->m, BATCH_BYTES, &t->batch_dev) ||
        {core}_alloc(t->m, sizeof t->results, &t->results_dev))
        return give_up(t);
    const unsigned char *init = {name}_initial_state;
    for (int i = 0; i < N_STATE; i++) {{
        size_t bytes = sizeof(float) * (size_t)state_size[i];
        for (int s = 0; s < 2; s++)
            if ({core}_alloc(t->m, bytes, &t->state[s][i])) return give_up(t);
        if ({core}_upload(t->m, t->state[0][i], init, bytes)) return give_up(t);
        init += bytes;
    }}
    unsigned char *dev = t->batch_dev;
    for (int i = 0; i < N_MASKS; i++) t->masks[i] = (float *)(t->batch + mask_offset[i]);
    t->scalars = (float *)(t->batch + SCALAR_OFFSET);
    for (int s = 0; s < 2; s++) {{
        t->ins[s][0] = dev + X_OFFSET;
        t->ins[s][1] = dev + Y_OFFSET;
        for (int i = 0; i < N_MASKS; i++) t->ins[s][2 + i] = dev + mask_offset[i];
        for (int i = 0; i < N_STATE; i++) {{
            t->ins[s][{n_ins_head} + i] = t->state[s][i];
            t->outs[s][1 + {n_metrics} + i] = t->state[1 - s][i];
        }}
        for (int i = 0; i < N_SCALARS; i++)
            t->ins[s][{n_ins_head} + N_STATE + i] = dev + SCALAR_OFFSET + 4 * i;
        for (int i = 0; i < 1 + {n_metrics}; i++) t->outs[s][i] = (unsigned char *)t->results_dev + 4 * i;
    }}"""
        run = f"""    memcpy(t->batch + X_OFFSET, x, X_BYTES);
    memcpy(t->batch + Y_OFFSET, y, Y_BYTES);
    if ({core}_upload(t->m, t->batch_dev, t->batch, BATCH_BYTES) ||
        {core}_run_device(t->m, t->ins[t->current], t->outs[t->current], NULL) ||
        {core}_download(t->m, t->results, t->results_dev, sizeof t->results))
        return 1;
    t->current ^= 1;
    t->iterations++;
    if (loss) *loss = t->results[0];"""
        release = f"""    if (t->m) {core}_destroy(t->m); /* frees the device memory of {core}_alloc */
    free(t->batch);"""
        get_param = f"return {core}_download(t->m, dst, t->state[t->current][i], PARAM_BYTES(i));"
        set_param = f"return {core}_upload(t->m, t->state[t->current][i], src, PARAM_BYTES(i));"
    else:
        api = f"""int {core}_create({core}_model **out);
int {core}_run({core}_model *m, const void *const *inputs, void *const *outputs);"""
        fields = f"""    float *state[2][N_STATE];
    float scalars[N_SCALARS > 0 ? N_SCALARS : 1];
    float loss;
    float metric_sums[{max(n_metrics, 1)}];
    const void *ins[2][N_IN];
    void *outs[2][N_OUT];"""
        setup = f"""    const float *init = (const float *){name}_initial_state;
    for (int i = 0; i < N_STATE; i++) {{
        for (int s = 0; s < 2; s++) {{
            t->state[s][i] = malloc(sizeof(float) * (size_t)(state_size[i] > 0 ? state_size[i] : 1));
            if (!t->state[s][i]) {{
                {name}_trainer_destroy(t);
                return kiln_thread_failed("out of memory for the weights and slots");
            }}
            memcpy(t->state[s][i], init, sizeof(float) * (size_t)state_size[i]);
        }}
        init += state_size[i];
    }}
    for (int i = 0; i < N_MASKS; i++) {{
        t->masks[i] = malloc(sizeof(float) * (size_t)mask_size[i]);
        if (!t->masks[i]) {{
            {name}_trainer_destroy(t);
            return kiln_thread_failed("out of memory for the dropout masks");
        }}
    }}
    for (int s = 0; s < 2; s++) {{
        for (int i = 0; i < N_MASKS; i++) t->ins[s][2 + i] = t->masks[i];
        for (int i = 0; i < N_STATE; i++) {{
            t->ins[s][{n_ins_head} + i] = t->state[s][i];
            t->outs[s][1 + {n_metrics} + i] = t->state[1 - s][i];
        }}
        for (int i = 0; i < N_SCALARS; i++) t->ins[s][{n_ins_head} + N_STATE + i] = &t->scalars[i];
        t->outs[s][0] = &t->loss;
        for (int i = 0; i < {n_metrics}; i++) t->outs[s][1 + i] = &t->metric_sums[i];
    }}"""
        run = f"""    t->ins[t->current][0] = x;
    t->ins[t->current][1] = y;
    if ({core}_run(t->m, t->ins[t->current], t->outs[t->current]) != 0) return 1;
    t->current ^= 1;
    t->iterations++;
    if (loss) *loss = t->loss;"""
        release = f"""    if (t->m) {core}_destroy(t->m);
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < N_STATE; i++) free(t->state[s][i]);
    for (int i = 0; i < N_MASKS; i++) free(t->masks[i]);"""
        get_param = "memcpy(dst, t->state[t->current][i], PARAM_BYTES(i));\n    return 0;"
        set_param = "memcpy(t->state[t->current][i], src, PARAM_BYTES(i));\n    return 0;"
    offsets_c = ", ".join(str(o) for o in mask_offs) or "0"
    run_fn = f"{core}_run_device" if cuda else f"{core}_run"
    split_api = split_fields = split_setup = split_release = split_functions = ""
    if split is not None:
        split_api, split_fields, split_setup, split_release, split_functions = _split_c(
            name, split, n_ins_head, n_metrics, scalar_lines
        )
    return f"""/* {name}: training of a Keras model compiled by Kiln (wrapper over {run_fn}). */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kiln_thread_error.h"

#define API __attribute__((visibility("default")))
typedef struct {core}_model {core}_model;
{api}
void {core}_destroy({core}_model *m);
const char *{core}_last_error(const {core}_model *m);
extern const unsigned char {name}_initial_state[];

enum {{ N_STATE = {n_state}, N_PARAMS = {n_weights}, N_IN = {n_in}, N_OUT = {n_out} }};
enum {{ N_SCALARS = {len(scalars)}, N_MASKS = {n_masks} }};
enum {{ X_BYTES = {io_bytes[0]}, Y_BYTES = {io_bytes[1]}, X_OFFSET = {x_off}, Y_OFFSET = {y_off} }};
enum {{ SCALAR_OFFSET = {scalar_off}, BATCH_BYTES = {end}, BATCH_ROWS = {batch_rows} }};
static const double mask_rate[N_MASKS > 0 ? N_MASKS : 1] = {{{mask_rates}}};
static const long mask_size[N_MASKS > 0 ? N_MASKS : 1] = {{{mask_sizes}}};
static const long mask_row[N_MASKS > 0 ? N_MASKS : 1] = {{{mask_rows}}}; /* elements per batch row */
static const long mask_offset[N_MASKS > 0 ? N_MASKS : 1] = {{{offsets_c}}};
static const long state_size[N_STATE] = {{{sizes}}};
static const char *const param_names[N_PARAMS] = {{{names}}};
#define PARAM_BYTES(i) (sizeof(float) * (size_t)state_size[i])
{split_api}
typedef struct {name}_trainer {{
    {core}_model *m;
{fields}
    float *masks[N_MASKS > 0 ? N_MASKS : 1];
    uint64_t rng;
    int current;
    long iterations;
    float learning_rate;
    char error[512]; /* the wrapper's own failure (else the step's instance has it) */
{split_fields}}} {name}_trainer;
{_TRAINER_ERRORS.format(name=name, core=core)}
#define GOLDEN 0x9E3779B97F4A7C15ULL
static uint64_t splitmix64(uint64_t *state) {{
    uint64_t z = (*state += GOLDEN);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}}

/* The masks of rows first_row .. first_row + BATCH_ROWS - 1 of a batch of batch_rows rows
 * (a step on its own batch: 0, BATCH_ROWS). A mask's elements are consecutive draws, row
 * after row, and the k-th draw after a state s is splitmix64 of s + k * GOLDEN, so this
 * trainer's rows are drawn from where they start and the stream moves past the whole
 * batch's masks: every process of a data-parallel step draws its rows of the masks one
 * process would draw for the whole batch, and their streams stay in step. */
static void draw_masks({name}_trainer *t, long first_row, long batch_rows) {{
    for (int i = 0; i < N_MASKS; i++) {{
        const float keep = 1.0f / (float)(1.0 - mask_rate[i]);
        uint64_t s = t->rng + (uint64_t)first_row * (uint64_t)mask_row[i] * GOLDEN;
        for (long j = 0; j < mask_size[i]; j++) {{
            double u = (double)(splitmix64(&s) >> 40) / 16777216.0;
            t->masks[i][j] = u >= mask_rate[i] ? keep : 0.0f;
        }}
        t->rng += (uint64_t)batch_rows * (uint64_t)mask_row[i] * GOLDEN;
    }}
}}

API void {name}_trainer_destroy({name}_trainer *t) {{
    if (!t) return;
{release}
{split_release}    free(t);
}}

/* A failure of the step's library while creating: its message kept, the trainer gone. */
__attribute__((unused)) static int give_up({name}_trainer *t) {{
    kiln_thread_failed("%s", {core}_last_error(t->m));
    {name}_trainer_destroy(t);
    return 1;
}}

API int {name}_trainer_create({name}_trainer **out) {{
    if (!out) return kiln_thread_failed("out is NULL");
    *out = NULL;
    {name}_trainer *t = calloc(1, sizeof *t);
    if (!t) return kiln_thread_failed("out of memory for the trainer");
    if ({core}_create(&t->m) != 0) {{
        kiln_thread_failed("%s", {core}_last_error(NULL));
        free(t);
        return 1;
    }}
{setup}
{split_setup}    t->learning_rate = {lr!r}f;
    t->iterations = {iterations};
    *out = t;
    return 0;
}}

API int {name}_train_step({name}_trainer *t, const void *x, const void *y, float *loss) {{
    if (!t) return 1;
    t->error[0] = 0;
    const float lr = t->learning_rate, step = (float)(t->iterations + 1);
    (void)lr; (void)step;
{scalar_lines}
    draw_masks(t, 0, BATCH_ROWS);
{run}
    return 0;
}}
{split_functions}
API void {name}_set_learning_rate({name}_trainer *t, float lr) {{ t->learning_rate = lr; }}
API void {name}_set_seed({name}_trainer *t, uint64_t seed) {{ t->rng = seed; }}
API long {name}_iterations(const {name}_trainer *t) {{ return t->iterations; }}
API int {name}_num_params(void) {{ return N_PARAMS; }}
API const char *{name}_param_name(int i) {{ return i >= 0 && i < N_PARAMS ? param_names[i] : 0; }}
API long {name}_param_size(int i) {{ return i >= 0 && i < N_PARAMS ? state_size[i] : -1; }}

API int {name}_get_param(const {name}_trainer *t, int i, float *dst) {{
    if (i < 0 || i >= N_PARAMS) return 1;
    {get_param}
}}

API int {name}_set_param({name}_trainer *t, int i, const float *src) {{
    if (i < 0 || i >= N_PARAMS) return 1;
    {set_param}
}}
"""


def _split_c(name: str, split: _Split, n_ins_head: int, n_metrics: int, scalar_lines: str):
    """The CPU trainer's split step: its programs' declarations, the trainer's fields, what
    create and destroy add, and the API (compute_gradients, gradients, gradient_count,
    apply_gradients). The gradient program reads x, y, the masks, the weights and the
    share, and writes every output into the buffer; the update program reads the
    current set, the buffer's summed gradients and updates, and the scalars, and writes
    the other set, as the fused step does."""
    g, a = split.gradients, split.apply
    n_out = len(split.offsets)
    offsets = ", ".join(f"{o}L" for o in split.offsets)
    api = "".join(
        f"""typedef struct {p}_model {p}_model;
int {p}_create({p}_model **out);
int {p}_run({p}_model *m, const void *const *inputs, void *const *outputs);
void {p}_destroy({p}_model *m);
const char *{p}_last_error(const {p}_model *m);
"""
        for p in (g, a)
    )
    api += f"""enum {{ GRADIENT_COUNT = {split.count}, N_GRADIENT_IN = {n_ins_head} + N_PARAMS + 1 }};
enum {{ N_GRADIENT_OUT = {n_out}, N_SUMMED = {n_out - 1 - n_metrics} }};
static const long gradient_offset[N_GRADIENT_OUT] = {{{offsets}}};
"""
    fields = f"""    {g}_model *gradients; /* the split step's instances, made by its first call */
    {a}_model *apply;
    float *buffer; /* GRADIENT_COUNT floats, 64-byte aligned */
    float share;
"""
    setup = f"""    if (!(t->buffer = aligned_alloc(64, sizeof(float) * GRADIENT_COUNT))) {{
        {name}_trainer_destroy(t);
        return kiln_thread_failed("out of memory for the gradient buffer");
    }}
    memset(t->buffer, 0, sizeof(float) * GRADIENT_COUNT);
"""
    release = f"""    if (t->gradients) {g}_destroy(t->gradients);
    if (t->apply) {a}_destroy(t->apply);
    free(t->buffer);
"""
    functions = f"""
__attribute__((format(printf, 2, 3))) static int split_failed({name}_trainer *t, const char *format, ...) {{
    va_list ap;
    va_start(ap, format);
    vsnprintf(t->error, sizeof t->error, format, ap);
    va_end(ap);
    return 1;
}}

static int split_ready({name}_trainer *t) {{
    if (!t->gradients && {g}_create(&t->gradients) != 0)
        return split_failed(t, "%s", {g}_last_error(NULL));
    if (!t->apply && {a}_create(&t->apply) != 0) return split_failed(t, "%s", {a}_last_error(NULL));
    return 0;
}}

API int {name}_compute_gradients({name}_trainer *t, const void *x, const void *y, long first_row,
                                 long batch_rows, float *loss) {{
    if (!t) return 1;
    t->error[0] = 0;
    if (first_row < 0 || batch_rows < BATCH_ROWS || first_row > batch_rows - BATCH_ROWS)
        return split_failed(t, "rows %ld to %ld are not rows of a batch of %ld rows (x and y hold %d rows)",
                            first_row, first_row + BATCH_ROWS - 1, batch_rows, BATCH_ROWS);
    if (split_ready(t)) return 1;
    t->share = (float)((double)BATCH_ROWS / (double)batch_rows);
    draw_masks(t, first_row, batch_rows);
    const void *ins[N_GRADIENT_IN];
    void *outs[N_GRADIENT_OUT];
    ins[0] = x;
    ins[1] = y;
    for (int i = 0; i < N_MASKS; i++) ins[2 + i] = t->masks[i];
    for (int i = 0; i < N_PARAMS; i++) ins[{n_ins_head} + i] = t->state[t->current][i];
    ins[{n_ins_head} + N_PARAMS] = &t->share;
    for (int i = 0; i < N_GRADIENT_OUT; i++) outs[i] = t->buffer + gradient_offset[i];
    if ({g}_run(t->gradients, ins, outs) != 0) return split_failed(t, "%s", {g}_last_error(t->gradients));
    if (loss) *loss = t->buffer[0];
    return 0;
}}

API float *{name}_gradients({name}_trainer *t) {{ return t ? t->buffer : NULL; }}
API size_t {name}_gradient_count(void) {{ return GRADIENT_COUNT; }}

API int {name}_apply_gradients({name}_trainer *t, float *loss) {{
    if (!t) return 1;
    t->error[0] = 0;
    if (split_ready(t)) return 1;
    const float lr = t->learning_rate, step = (float)(t->iterations + 1);
    (void)lr; (void)step;
{scalar_lines}
    const void *ins[N_STATE + N_SUMMED + N_SCALARS];
    void *outs[N_STATE];
    for (int i = 0; i < N_STATE; i++) {{
        ins[i] = t->state[t->current][i];
        outs[i] = t->state[1 - t->current][i];
    }}
    for (int i = 0; i < N_SUMMED; i++)
        ins[N_STATE + i] = t->buffer + gradient_offset[N_GRADIENT_OUT - N_SUMMED + i];
    for (int i = 0; i < N_SCALARS; i++) ins[N_STATE + N_SUMMED + i] = &t->scalars[i];
    if ({a}_run(t->apply, ins, outs) != 0) return split_failed(t, "%s", {a}_last_error(t->apply));
    t->current ^= 1;
    t->iterations++;
    if (loss) *loss = t->buffer[0];
    return 0;
}}
"""
    return api, fields, setup, release, functions


def _header(name: str, x_shape, x_dtype, y_shape, y_dtype, param_names, sizes, cuda: bool = False,
            split: _Split | None = None) -> str:  # fmt: skip
    params = "\n".join(f" *   param {i}: {p}  float[{n}]" for i, (p, n) in enumerate(zip(param_names, sizes)))
    split_doc = split_api = ""
    if split is not None:
        entries = "\n".join(f" *     {e}" for e in split.entries)
        split_doc = f"""
 * Data parallelism (MPI or any all-reduce) splits {name}_train_step in two around
 * one in-place sum of one float32 buffer over the processes:
 *
 *   {name}_compute_gradients(t, x, y, first_row, batch_rows, &loss);
 *   MPI_Allreduce(MPI_IN_PLACE, {name}_gradients(t), (int){name}_gradient_count(),
 *                 MPI_FLOAT, MPI_SUM, comm);
 *   {name}_apply_gradients(t, &loss);
 *
 * x and y hold rows first_row .. first_row + {x_shape[0] - 1} of a global batch of batch_rows
 * rows (say rank * {x_shape[0]} of size * {x_shape[0]}). The process's share s = {x_shape[0]} / batch_rows
 * scales what it writes into the buffer, so that the sum is the global batch's; the
 * loss compute_gradients gives is s * the loss of its rows, the one apply_gradients
 * gives the buffer's (after the sum: the global batch's). Its Dropout masks are its
 * rows of the masks one process would draw for the global batch, and every process's
 * stream moves past all of them: with one seed on every process (the default) they
 * all train as one process with the global batch would, up to float rounding;
 * BatchNormalization normalizes by each process's own rows (as Keras does) and its
 * moving statistics are averaged with the shares as weights. apply_gradients runs
 * the optimizer on the buffer, advances the step count and swaps the weight sets as
 * {name}_train_step does; every process applies the same sum and stays identical.
 * One process with its own batch: (t, x, y, 0, {x_shape[0]}, &loss), no sum. The buffer
 * (offsets in floats; the rest is zero padding):
{entries}
 *"""
        split_api = f"""
/* the split step (see above) */
int {name}_compute_gradients({name}_trainer *t, const void *x, const void *y, long first_row,
                         long batch_rows, float *loss);
float *{name}_gradients({name}_trainer *t);           /* the buffer to sum in place */
size_t {name}_gradient_count(void);                  /* its length in floats */
int {name}_apply_gradients({name}_trainer *t, float *loss);
"""
    gpu = (
        f"""
 * It trains on an NVIDIA GPU (CUDA device 0; CUDA_VISIBLE_DEVICES picks another)
 * through the CUDA driver, which {name}_trainer_create opens (libcuda.so.1, with
 * dlopen; KILN_LIBCUDA names another driver library). The weights and optimizer
 * slots stay on the GPU: a step copies x, y and its dropout masks there and the loss
 * back; {name}_get_param / {name}_set_param copy one parameter.
 *"""
        if cuda
        else ""
    )
    return f"""/* {name}: a Keras model's training step, compiled by Kiln.
 *
 *   x: {x_dtype}[{", ".join(map(str, x_shape))}]   y: {y_dtype}[{", ".join(map(str, y_shape))}]
 *   (one batch each, dense row-major)
{params}
 *{gpu}{split_doc}
 * Functions returning int give 0 on success ({name}_trainer_last_error says why not;
 * {name}_trainer_last_error(NULL): why the calling thread's last create failed).
 */
#ifndef {name.upper()}_H
#define {name.upper()}_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {{
#endif

typedef struct {name}_trainer {name}_trainer;

int {name}_trainer_create({name}_trainer **out);      /* starts from the weights at export */
int {name}_train_step({name}_trainer *t, const void *x, const void *y, float *loss);
void {name}_set_learning_rate({name}_trainer *t, float lr);
void {name}_set_seed({name}_trainer *t, uint64_t seed);  /* Dropout masks' stream (0 at creation) */
long {name}_iterations(const {name}_trainer *t);
int {name}_num_params(void);
const char *{name}_param_name(int i);
long {name}_param_size(int i);                          /* elements (float32) */
int {name}_get_param(const {name}_trainer *t, int i, float *dst);
int {name}_set_param({name}_trainer *t, int i, const float *src);
const char *{name}_trainer_last_error(const {name}_trainer *t);
void {name}_trainer_destroy({name}_trainer *t);
{split_api}
#ifdef __cplusplus
}}
#endif
#endif
"""


def export_train(model, filepath, batch_size: int, cpu: str | None = None, target: str = "cpu") -> Path:
    """The library; `target` "cuda" builds the step for an NVIDIA GPU (the same C API;
    the weights and slots on the GPU), "cuda-sim" the GPU's kernels run on the CPU."""
    path = Path(filepath)
    name = path.stem
    if path.suffix != ".so":
        raise ValueError(
            f"export_train writes a shared library: the filename must end in .so, got {filepath}"
        )
    if target not in TARGETS:
        raise UnsupportedError(f"target {target!r} is not supported (supported: {', '.join(TARGETS)})")
    if target == "cuda" and cpu is not None:
        raise ValueError("a cuda training library has no CPU code: cpu= is for target cpu or cuda-sim")
    targets = model._check_compiled()
    if len(model._input_shapes or []) != 1 or len(targets) != 1 or model._several_outputs:
        raise ValueError(
            "export_train takes a model with one input and one output (the C step takes one x and one y)"
        )
    model._sync()
    state = model._state if model._state is not None else model._train_state()
    weights = model.weights
    (feed,) = model._feeds(batch_size)
    (trained,) = model._targets(batch_size)
    core = name  # the step's own API (NAME_run, ...) sits beside the trainer's in one library
    opt = model.optimizer
    graph, masks = train_graph(model._forward, weights, [feed], [trained], False, opt, name=core)
    split = programs = None
    if target == "cpu":  # the split step: a gradient program and an update program beside it
        with warnings.catch_warnings():  # unreached weights: train_graph has warned
            warnings.simplefilter("ignore")
            gradients, split_masks, layout = gradient_graph(model._forward, weights, [feed], [trained], False)
        assert [shape for _, shape in split_masks] == [shape for _, shape in masks]
        outputs = [("loss (s * this process's)", 1)]
        outputs += [(f"{m.name} (sum over the rows)", 1) for m in trained.metrics]
        outputs += [(f"s * d loss / d {w.name}  float[{w.value.size}]", w.value.size) for w in layout.reached]
        outputs += [(f"s * new {w.name}  float[{w.value.size}]", w.value.size) for w in layout.updated]
        split = _split(name, outputs)
        updates = update_graph(weights, opt, layout)
        programs = [(graph, core), (gradients, split.gradients), (updates, split.apply)]
    if any(shape[0] != batch_size for _, shape in masks):
        raise UnsupportedError("export_train draws dropout masks by batch row: a mask without the batch rows")
    arrays = state.arrays()
    blob = b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in arrays)
    wrapper = _wrapper(
        name, core, 2 + len(masks), [a.size for a in arrays], len(weights), [w.name for w in weights],
        len(trained.metrics), _scalar_expressions(opt), opt.learning_rate, opt.iterations,
        [(layer.rate, int(np.prod(shape))) for layer, shape in masks],
        (_nbytes(feed.shape, feed.dtype), _nbytes(trained.y.shape, trained.y.dtype)), target == "cuda",
        batch_rows=batch_size, split=split,
    )  # fmt: skip
    blobs = {f"{name}_initial_state": blob}
    with tempfile.TemporaryDirectory(prefix="kiln-train-") as work:
        if programs is not None:  # three programs, one library
            lowered = [lower_graph(g, prefix, target=target, cpu_name=cpu) for g, prefix in programs]
            so = build_several(lowered, Path(work), name, extra_c=wrapper, extra_blobs=blobs)
        elif target == "cuda":
            lowered = lower_graph(graph, core, target=target)
            so = build_cuda(lowered, Path(work), extra_c=wrapper, extra_blobs=blobs)
        else:
            lowered = lower_graph(graph, core, target=target, cpu_name=cpu)
            so = build(lowered, Path(work), extra_c=wrapper, extra_blobs=blobs)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(so, path)
    y = trained.y
    header = _header(name, feed.shape, feed.dtype, y.shape, y.dtype, [w.name for w in weights],
                     [w.value.size for w in weights], target == "cuda", split)  # fmt: skip
    path.with_name(f"{name}.h").write_text(header)
    return path
