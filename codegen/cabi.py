"""The model library's C ABI: the generated glue (C), its header, and the link step.

The kernels come from LLVM; this module writes the small C file around them that
owns the arena, runs the kernel schedule through the thread pool, checks the
pointers it is given, answers metadata queries, and embeds the weights (an
`.incbin` of the weight blob, so a 100 MB model costs no compile time). Every
symbol but the public API is hidden, and the API carries the chosen prefix, so
several models link into one program.
"""

from __future__ import annotations

import enum
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ir.errors import CompileError

#: the folder of the C runtime every library is linked with (kiln_runtime.h, kiln_runner.c)
C_SOURCES = Path(__file__).parent
#: the arena and every weight in the blob start at a multiple of this many bytes
ALIGN = 64


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


class Space(enum.Enum):
    """Where a kernel argument's bytes are."""

    INPUT = "input"  # the caller's input array (index: its position)
    OUTPUT = "output"  # the caller's output array (index: its position)
    ARENA = "arena"  # the instance's arena (index: a byte offset)
    WEIGHTS = "weights"  # the embedded weight blob (index: a byte offset)
    STATUS = "status"  # the instance's status word, which kernels' checks set


@dataclass(frozen=True)
class BufferRef:
    """Where a kernel argument lives: a space and a position or byte offset in it."""

    space: Space
    index: int

    def c_expr(self) -> str:
        if self.space is Space.INPUT:
            return f"(void *)inputs[{self.index}]"
        if self.space is Space.OUTPUT:
            return f"outputs[{self.index}]"
        if self.space is Space.ARENA:
            return f"(void *)(m->arena + {self.index})"
        if self.space is Space.STATUS:
            return "(void *)&m->status"
        return f"(void *)({{PREFIX}}_weights + {self.index})"


@dataclass(frozen=True)
class Launch:
    symbol: str
    args: tuple[BufferRef, ...]
    extent: int  # iterations of the parallel loop, or 1
    parallel: bool
    #: what went wrong, by status code - 1, for a kernel with checks
    errors: tuple[str, ...] = ()


@dataclass
class Library:
    """Everything the glue needs: the ABI's tensors, the schedule, the memory sizes."""

    prefix: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    launches: list[Launch]
    arena_bytes: int
    weights: bytes


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_prefix(prefix: str) -> str:
    if not _IDENT.match(prefix):
        raise ValueError(f"library name {prefix!r} must be a C identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return prefix


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _metadata(kind: str, specs: list[TensorSpec]) -> str:
    n = len(specs)
    lines = []
    for i, s in enumerate(specs):
        dims = ", ".join(str(d) for d in s.shape) or "0"
        lines.append(f"static const int64_t {kind}_shape_{i}[] = {{{dims}}};")
    arr = lambda xs: "{" + ", ".join(xs) + "}" if xs else "{0}"  # noqa: E731
    lines += [
        f"static const char *const {kind}_names[] = {arr([_c_string(s.name) for s in specs])};",
        f"static const char *const {kind}_dtypes[] = {arr([_c_string(s.dtype) for s in specs])};",
        f"static const int {kind}_ranks[] = {arr([str(len(s.shape)) for s in specs])};",
        f"static const int64_t *const {kind}_shapes[] = {arr([f'{kind}_shape_{i}' for i in range(n)])};",
        f"API int {{PREFIX}}_num_{kind}s(void) {{ return {n}; }}",
    ]
    for attr, ctype, table, missing in (
        ("name", "const char *", "names", "NULL"),
        ("dtype", "const char *", "dtypes", "NULL"),
        ("rank", "int ", "ranks", "-1"),
        ("shape", "const int64_t *", "shapes", "NULL"),
    ):
        lines.append(
            f"API {ctype}{{PREFIX}}_{kind}_{attr}(int i) "
            f"{{ return i >= 0 && i < {n} ? {kind}_{table}[i] : {missing}; }}"
        )
    return "\n".join(lines)


def glue_source(p: Library) -> str:
    launches = []
    for i, launch in enumerate(p.launches):
        args = ", ".join(a.c_expr() for a in launch.args)
        launches.append(
            f"    {{ void *const a[] = {{{args}}};\n"
            f"      double t0 = m->profiling ? kiln_now() : 0;\n"
            f"      kiln_launch(&m->pool, {launch.symbol}, a, {launch.extent}, {int(launch.parallel)});\n"
            f"      if (m->profiling) m->kernel_seconds[{i}] += kiln_now() - t0; }}"
        )
        if launch.errors:
            cases = " ".join(
                f"case {c + 1}: return fail(m, {_c_string(msg)});" for c, msg in enumerate(launch.errors)
            )
            launches.append(f"    switch (m->status) {{ case 0: break; {cases} default: return 1; }}")
    n_launch = max(len(p.launches), 1)
    kernel_names = ", ".join(_c_string(launch.symbol) for launch in p.launches) or "0"
    kernels = sorted({launch.symbol for launch in p.launches})
    checks = [
        f'    if (!inputs[{i}]) return fail(m, "input {i} ({s.name}) is NULL");'
        for i, s in enumerate(p.inputs)
    ] + [
        f'    if (!outputs[{i}]) return fail(m, "output {i} ({s.name}) is NULL");'
        for i, s in enumerate(p.outputs)
    ]
    src = f"""/* Generated by Kiln: the C ABI around the model's kernels. */
#include "kiln_runtime.h"

#define API __attribute__((visibility("default")))
#define ARENA_BYTES {p.arena_bytes}ULL

extern const unsigned char {{PREFIX}}_weights[];
{chr(10).join(f"void {k}(void *const *bufs, int64_t begin, int64_t end);" for k in kernels)}

typedef struct {{PREFIX}}_model {{
    unsigned char *arena;
    kiln_pool pool;
    char error[512];
    int profiling;
    int32_t status; /* set by a kernel whose checks failed */
    double kernel_seconds[{n_launch}];
}} {{PREFIX}}_model;

static const char *const kernel_names[] = {{{kernel_names}}};

/* Per-kernel timing: off by default (it costs two clock reads per kernel). */
API int {{PREFIX}}_num_kernels(void) {{ return {len(p.launches)}; }}
API const char *{{PREFIX}}_kernel_name(int i) {{
    return i >= 0 && i < {len(p.launches)} ? kernel_names[i] : NULL;
}}
API void {{PREFIX}}_set_profiling({{PREFIX}}_model *m, int on) {{
    if (!m) return;
    m->profiling = on;
    memset(m->kernel_seconds, 0, sizeof m->kernel_seconds);
}}
API const double *{{PREFIX}}_kernel_seconds(const {{PREFIX}}_model *m) {{
    return m ? m->kernel_seconds : NULL;
}}

static int fail({{PREFIX}}_model *m, const char *message) {{
    snprintf(m->error, sizeof m->error, "%s", message);
    return 1;
}}

{_metadata("input", p.inputs)}
{_metadata("output", p.outputs)}

API int {{PREFIX}}_create({{PREFIX}}_model **out) {{
    if (!out) return 1;
    *out = NULL;
    {{PREFIX}}_model *m = calloc(1, sizeof *m);
    if (!m) return 1;
    size_t arena = (ARENA_BYTES + {ALIGN - 1}) / {ALIGN} * {ALIGN};
    if (ARENA_BYTES && !(m->arena = aligned_alloc({ALIGN}, arena))) {{
        free(m);
        return 1;
    }}
    kiln_pool_init(&m->pool, kiln_default_threads());
    *out = m;
    return 0;
}}

API void {{PREFIX}}_destroy({{PREFIX}}_model *m) {{
    if (!m) return;
    kiln_pool_destroy(&m->pool);
    free(m->arena);
    free(m);
}}

API const char *{{PREFIX}}_last_error(const {{PREFIX}}_model *m) {{
    if (!m) return "no model (NULL handle: did {{PREFIX}}_create fail?)";
    return m->error;
}}

/* Threads used by this instance from now on (1 = the calling thread only). */
API int {{PREFIX}}_set_num_threads({{PREFIX}}_model *m, int n) {{
    if (!m || n < 1) return 1;
    kiln_pool_destroy(&m->pool);
    return kiln_pool_init(&m->pool, n);
}}

API int {{PREFIX}}_num_threads(const {{PREFIX}}_model *m) {{ return m ? m->pool.nthreads : -1; }}

API int {{PREFIX}}_run({{PREFIX}}_model *m, const void *const *inputs, void *const *outputs) {{
    if (!m) return 1;
    if (!inputs && {len(p.inputs)}) return fail(m, "inputs is NULL");
    if (!outputs) return fail(m, "outputs is NULL");
{chr(10).join(checks)}
    m->error[0] = 0;
    m->status = 0;
{chr(10).join(launches)}
    return 0;
}}
"""
    return src.replace("{PREFIX}", p.prefix)


def header_source(p: Library) -> str:
    guard = f"{p.prefix.upper()}_H"
    doc = "\n".join(
        f" *   {kind} {i}: {s.name}  {s.dtype}[{', '.join(map(str, s.shape))}]"
        for kind, specs in (("input", p.inputs), ("output", p.outputs))
        for i, s in enumerate(specs)
    )
    return f"""/* {p.prefix}: a model compiled by Kiln.
 *
{doc}
 *
 * Buffers are dense, row-major (C order) arrays of the dtype above. A model
 * instance owns its scratch memory and threads; separate instances may run at
 * the same time on separate threads. Functions returning int give 0 on success;
 * {p.prefix}_last_error then says what went wrong.
 */
#ifndef {guard}
#define {guard}

#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

typedef struct {p.prefix}_model {p.prefix}_model;

int {p.prefix}_create({p.prefix}_model **out);
int {p.prefix}_run({p.prefix}_model *m, const void *const *inputs, void *const *outputs);
void {p.prefix}_destroy({p.prefix}_model *m);
const char *{p.prefix}_last_error(const {p.prefix}_model *m);
int {p.prefix}_set_num_threads({p.prefix}_model *m, int n);
int {p.prefix}_num_threads(const {p.prefix}_model *m);

/* profiling: seconds spent in each kernel since set_profiling(m, 1) */
int {p.prefix}_num_kernels(void);
const char *{p.prefix}_kernel_name(int i);
void {p.prefix}_set_profiling({p.prefix}_model *m, int on);
const double *{p.prefix}_kernel_seconds(const {p.prefix}_model *m);

int {p.prefix}_num_inputs(void);
int {p.prefix}_num_outputs(void);
const char *{p.prefix}_input_name(int i);
const char *{p.prefix}_input_dtype(int i);
int {p.prefix}_input_rank(int i);
const int64_t *{p.prefix}_input_shape(int i);
const char *{p.prefix}_output_name(int i);
const char *{p.prefix}_output_dtype(int i);
int {p.prefix}_output_rank(int i);
const int64_t *{p.prefix}_output_shape(int i);

#ifdef __cplusplus
}}
#endif

#endif
"""


def blob_asm(symbol: str, blob: Path) -> str:
    """Embed a file's bytes in the library as read-only data named `symbol` (64-byte aligned)."""
    path = str(blob).replace("\\", "\\\\").replace('"', '\\"')
    return f"""    .section .rodata
    .balign 64
    .globl {symbol}
    .hidden {symbol}
{symbol}:
    .incbin "{path}"
    .byte 0
    .section .note.GNU-stack,"",@progbits
"""


def c_compiler() -> str:
    for cc in ("cc", "gcc", "clang"):
        if shutil.which(cc):
            return cc
    raise CompileError("no C compiler found (looked for cc, gcc, clang): install gcc to link models")


def link(
    p: Library,
    kernels_object: bytes,
    workdir: Path,
    so_path: Path,
    extra_c: str | None = None,
    extra_blobs: dict[str, bytes] | None = None,
) -> None:
    """Write glue, header and weights beside the object, and link them into so_path.
    `extra_c` is more C compiled into the library (a wrapper API over NAME_run), and
    `extra_blobs` more read-only data it refers to by symbol (embedded like the weights)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kernels.o").write_bytes(kernels_object)
    (workdir / "glue.c").write_text(glue_source(p))
    sources = [workdir / "glue.c"]
    for symbol, blob in {f"{p.prefix}_weights": p.weights, **(extra_blobs or {})}.items():
        (workdir / f"{symbol}.bin").write_bytes(blob)
        (workdir / f"{symbol}.S").write_text(blob_asm(symbol, workdir / f"{symbol}.bin"))
        sources.append(workdir / f"{symbol}.S")
    if extra_c is not None:
        (workdir / "extra.c").write_text(extra_c)
        sources.append(workdir / "extra.c")
    cmd = [
        c_compiler(),
        "-shared",
        "-fPIC",
        "-O2",
        "-fvisibility=hidden",
        "-pthread",
        f"-I{C_SOURCES}",
        *map(str, sources),
        str(workdir / "kernels.o"),
        "-o",
        str(so_path),
        f"-Wl,-soname,{so_path.name}",
        "-lm",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompileError(f"linking {so_path.name} failed:\n$ {' '.join(cmd)}\n{result.stderr}")


def build_c_runner(so_path: Path, name: str, out: Path) -> Path:
    """Compile kiln_runner.c against NAME.h (beside the .so) into an executable at `out`."""
    so_path = Path(so_path).resolve()
    cmd = [
        c_compiler(),
        "-O1",
        "-g",
        f"-I{so_path.parent}",
        f"-DMODEL={name}",
        f'-DMODEL_HEADER="{name}.h"',
        str(C_SOURCES / "kiln_runner.c"),
        str(so_path),
        f"-Wl,-rpath,{so_path.parent}",
        "-o",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompileError(f"building the C runner failed:\n$ {' '.join(cmd)}\n{result.stderr}")
    return out
