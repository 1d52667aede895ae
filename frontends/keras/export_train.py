"""A Keras model's training as a C library: `model.export_train("NAME.so")`.

The compiled train step (forward, loss, gradients, optimizer update: trainer.py's
graph) is linked with a small C wrapper that owns the weights and optimizer slots (two
sets, swapped each step, as in Python) and computes the optimizer's per-step scalars:

    NAME_trainer *t;  NAME_trainer_create(&t);           // the model's current weights
    NAME_train_step(t, x, y, &loss);                      // one batch: x float32, y as fit takes it
    NAME_get_param(t, i, dst);  NAME_set_param(t, i, src);  NAME_set_learning_rate(t, lr);
    NAME_trainer_destroy(t);

The step's own API (NAME_run, NAME_create, ...) is in the same library. The header
NAME.h beside it documents the buffers. Dropout masks are drawn by the wrapper each
step from a splitmix64 stream (NAME_set_seed; seed 0 at creation): a mask element
keeps its unit when the draw's top 24 bits, as a fraction of 2^24, are at least the
rate (then it is 1 / (1 - rate), as in Python's training).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from compiler.driver import build, lower_graph
from frontends.keras.trainer import train_graph


def _scalar_expressions(optimizer) -> list[str]:
    """Each per-step scalar as a C expression of `lr` and `step` (= iterations + 1), in
    float32 arithmetic as optimizer.step_scalars() computes it."""
    known = {"learning_rate": "lr"}
    if hasattr(optimizer, "beta_1"):
        b1, b2 = optimizer.beta_1, optimizer.beta_2
        known["alpha"] = f"lr * sqrtf(1.0f - powf({b2!r}f, step)) / (1.0f - powf({b1!r}f, step))"
    return [known[s] for s in optimizer.scalars]


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
) -> str:
    n_state = len(state_sizes)
    n_masks = len(masks)
    mask_rates = ", ".join(f"{rate!r}" for rate, _ in masks) or "0"
    mask_sizes = ", ".join(f"{size}L" for _, size in masks) or "0"
    n_in = n_ins_head + n_state + len(scalars)
    n_out = 1 + n_metrics + n_state
    sizes = ", ".join(f"{n}L" for n in state_sizes)
    names = ", ".join(f'"{p}"' for p in param_names)
    scalar_lines = "\n".join(f"    t->scalars[{i}] = {e};" for i, e in enumerate(scalars))
    return f"""/* {name}: training of a Keras model compiled by Kiln (wrapper over {core}_run). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define API __attribute__((visibility("default")))
typedef struct {core}_model {core}_model;
int {core}_create({core}_model **out);
int {core}_run({core}_model *m, const void *const *inputs, void *const *outputs);
void {core}_destroy({core}_model *m);
const char *{core}_last_error(const {core}_model *m);
extern const unsigned char {name}_initial_state[];

enum {{ N_STATE = {n_state}, N_PARAMS = {n_weights}, N_IN = {n_in}, N_OUT = {n_out} }};
enum {{ N_SCALARS = {len(scalars)}, N_MASKS = {n_masks} }};
static const double mask_rate[N_MASKS > 0 ? N_MASKS : 1] = {{{mask_rates}}};
static const long mask_size[N_MASKS > 0 ? N_MASKS : 1] = {{{mask_sizes}}};
static const long state_size[N_STATE] = {{{sizes}}};
static const char *const param_names[N_PARAMS] = {{{names}}};

typedef struct {name}_trainer {{
    {core}_model *m;
    float *state[2][N_STATE];
    float scalars[N_SCALARS > 0 ? N_SCALARS : 1];
    float loss;
    float metric_sums[{max(n_metrics, 1)}];
    const void *ins[2][N_IN];
    void *outs[2][N_OUT];
    float *masks[N_MASKS > 0 ? N_MASKS : 1];
    uint64_t rng;
    int current;
    long iterations;
    float learning_rate;
}} {name}_trainer;

static uint64_t splitmix64(uint64_t *state) {{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}}

static void draw_masks({name}_trainer *t) {{
    for (int i = 0; i < N_MASKS; i++) {{
        const float keep = 1.0f / (float)(1.0 - mask_rate[i]);
        for (long j = 0; j < mask_size[i]; j++) {{
            double u = (double)(splitmix64(&t->rng) >> 40) / 16777216.0;
            t->masks[i][j] = u >= mask_rate[i] ? keep : 0.0f;
        }}
    }}
}}

API void {name}_trainer_destroy({name}_trainer *t) {{
    if (!t) return;
    if (t->m) {core}_destroy(t->m);
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < N_STATE; i++) free(t->state[s][i]);
    for (int i = 0; i < N_MASKS; i++) free(t->masks[i]);
    free(t);
}}

API int {name}_trainer_create({name}_trainer **out) {{
    {name}_trainer *t = calloc(1, sizeof *t);
    if (!t || {core}_create(&t->m) != 0) {{ {name}_trainer_destroy(t); return 1; }}
    const float *init = (const float *){name}_initial_state;
    for (int i = 0; i < N_STATE; i++) {{
        for (int s = 0; s < 2; s++) {{
            t->state[s][i] = malloc(sizeof(float) * (size_t)(state_size[i] > 0 ? state_size[i] : 1));
            if (!t->state[s][i]) {{ {name}_trainer_destroy(t); return 1; }}
            memcpy(t->state[s][i], init, sizeof(float) * (size_t)state_size[i]);
        }}
        init += state_size[i];
    }}
    for (int i = 0; i < N_MASKS; i++) {{
        t->masks[i] = malloc(sizeof(float) * (size_t)mask_size[i]);
        if (!t->masks[i]) {{ {name}_trainer_destroy(t); return 1; }}
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
    }}
    t->learning_rate = {lr!r}f;
    t->iterations = {iterations};
    *out = t;
    return 0;
}}

API int {name}_train_step({name}_trainer *t, const void *x, const void *y, float *loss) {{
    const float lr = t->learning_rate, step = (float)(t->iterations + 1);
    (void)lr; (void)step;
{scalar_lines}
    draw_masks(t);
    t->ins[t->current][0] = x;
    t->ins[t->current][1] = y;
    if ({core}_run(t->m, t->ins[t->current], t->outs[t->current]) != 0) return 1;
    t->current ^= 1;
    t->iterations++;
    if (loss) *loss = t->loss;
    return 0;
}}

API const char *{name}_trainer_last_error(const {name}_trainer *t) {{ return {core}_last_error(t->m); }}
API void {name}_set_learning_rate({name}_trainer *t, float lr) {{ t->learning_rate = lr; }}
API void {name}_set_seed({name}_trainer *t, uint64_t seed) {{ t->rng = seed; }}
API long {name}_iterations(const {name}_trainer *t) {{ return t->iterations; }}
API int {name}_num_params(void) {{ return N_PARAMS; }}
API const char *{name}_param_name(int i) {{ return i >= 0 && i < N_PARAMS ? param_names[i] : 0; }}
API long {name}_param_size(int i) {{ return i >= 0 && i < N_PARAMS ? state_size[i] : -1; }}

API int {name}_get_param(const {name}_trainer *t, int i, float *dst) {{
    if (i < 0 || i >= N_PARAMS) return 1;
    memcpy(dst, t->state[t->current][i], sizeof(float) * (size_t)state_size[i]);
    return 0;
}}

API int {name}_set_param({name}_trainer *t, int i, const float *src) {{
    if (i < 0 || i >= N_PARAMS) return 1;
    memcpy(t->state[t->current][i], src, sizeof(float) * (size_t)state_size[i]);
    return 0;
}}
"""


def _header(name: str, x_shape, x_dtype, y_shape, y_dtype, param_names, sizes) -> str:
    params = "\n".join(f" *   param {i}: {p}  float[{n}]" for i, (p, n) in enumerate(zip(param_names, sizes)))
    return f"""/* {name}: a Keras model's training step, compiled by Kiln.
 *
 *   x: {x_dtype}[{", ".join(map(str, x_shape))}]   y: {y_dtype}[{", ".join(map(str, y_shape))}]
 *   (one batch each, dense row-major)
{params}
 *
 * Functions returning int give 0 on success ({name}_trainer_last_error says why not).
 */
#ifndef {name.upper()}_H
#define {name.upper()}_H
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

#ifdef __cplusplus
}}
#endif
#endif
"""


def export_train(model, filepath, batch_size: int, cpu: str | None = None) -> Path:
    path = Path(filepath)
    name = path.stem
    if path.suffix != ".so":
        raise ValueError(
            f"export_train writes a shared library: the filename must end in .so, got {filepath}"
        )
    targets = model._check_compiled()
    if len(model._input_shapes or []) != 1 or len(targets) != 1 or model._several_outputs:
        raise ValueError(
            "export_train takes a model with one input and one output (the C step takes one x and one y)"
        )
    model._sync()
    state = model._train_state()
    weights = model.weights
    (feed,) = model._feeds(batch_size)
    (target,) = model._targets(batch_size)
    core = name  # the step's own API (NAME_run, ...) sits beside the trainer's in one library
    graph, masks = train_graph(model._forward, weights, [feed], [target], False, model.optimizer, name=core)
    arrays = state.sets[state.current]
    blob = b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in arrays)
    opt = model.optimizer
    wrapper = _wrapper(
        name, core, 2 + len(masks), [a.size for a in arrays], len(weights), [w.name for w in weights],
        len(target.metrics), _scalar_expressions(opt), opt.learning_rate, opt.iterations,
        [(layer.rate, int(np.prod(shape))) for layer, shape in masks],
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kiln-train-") as work:
        so = build(
            lower_graph(graph, core),
            Path(work),
            cpu_name=cpu,
            extra_c=wrapper,
            extra_blobs={f"{name}_initial_state": blob},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(so, path)
    header = _header(name, feed.shape, feed.dtype, target.y.shape, target.y.dtype, [w.name for w in weights],
                     [w.value.size for w in weights])  # fmt: skip
    path.with_name(f"{name}.h").write_text(header)
    return path
