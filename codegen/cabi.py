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
    TEAM = "team"  # the instance's team barrier state (a team kernel's last argument)


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
        if self.space is Space.TEAM:
            return "(void *)m->pool.team"
        return f"(void *)({{PREFIX}}_weights + {self.index})"


@dataclass(frozen=True)
class Launch:
    symbol: str
    args: tuple[BufferRef, ...]
    extent: int  # iterations of the parallel loop, or 1
    parallel: bool
    #: what went wrong, by status code - 1, for a kernel with checks
    errors: tuple[str, ...] = ()
    #: bytes of scratch the kernel keeps on each running thread's stack
    stack_bytes: int = 0
    #: each thread runs its steps last to first on odd runs (kir.Kernel.alternate_steps)
    alternate: bool = False


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


def c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _metadata(kind: str, specs: list[TensorSpec]) -> str:
    n = len(specs)
    lines = []
    for i, s in enumerate(specs):
        dims = ", ".join(str(d) for d in s.shape) or "0"
        lines.append(f"static const int64_t {kind}_shape_{i}[] = {{{dims}}};")
    arr = lambda xs: "{" + ", ".join(xs) + "}" if xs else "{0}"  # noqa: E731
    lines += [
        f"static const char *const {kind}_names[] = {arr([c_string(s.name) for s in specs])};",
        f"static const char *const {kind}_dtypes[] = {arr([c_string(s.dtype) for s in specs])};",
        f"static const int {kind}_ranks[] = {arr([str(len(s.shape)) for s in specs])};",
        f"static const int64_t *const {kind}_shapes[] = {arr([f'{kind}_shape_{i}' for i in range(n)])};",
    ]
    return "\n".join(lines + metadata_accessors(kind, n))


#: fail(m, format, ...), which writes an instance's error and returns 1, and
#: PREFIX_last_error: the C every model API (static, dynamic-batch, sequence) shares
ERROR_FUNCTIONS = """__attribute__((format(printf, 2, 3)))
static int fail({PREFIX}_model *m, const char *format, ...) {
    va_list ap;
    va_start(ap, format);
    vsnprintf(m->error, sizeof m->error, format, ap);
    va_end(ap);
    return 1;
}

API const char *{PREFIX}_last_error(const {PREFIX}_model *m) {
    if (m) return m->error;
    const char *why = kiln_thread_error();
    return why ? why : "no model (NULL handle: did {PREFIX}_create fail?)";
}
"""


def metadata_accessors(kind: str, n: int) -> list[str]:
    """NAME_num_KINDs() and NAME_KIND_name/dtype/rank/shape(i) over the static tables
    KIND_names, KIND_dtypes, KIND_ranks and KIND_shapes (NULL or -1 for a bad i)."""
    lines = [f"API int {{PREFIX}}_num_{kind}s(void) {{ return {n}; }}"]
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
    return lines


def null_checks(p: Library, inputs: str = "inputs", outputs: str = "outputs") -> str:
    """The C that refuses NULL input and output arrays (and NULL entries) before a run."""
    lines = [
        f'    if (!{inputs} && {len(p.inputs)}) return fail(m, "{inputs} is NULL");',
        f'    if (!{outputs}) return fail(m, "{outputs} is NULL");',
    ]
    lines += [
        f'    if (!{inputs}[{i}]) return fail(m, "input {i} ({_c_escape(s.name)}) is NULL");'
        for i, s in enumerate(p.inputs)
    ]
    lines += [
        f'    if (!{outputs}[{i}]) return fail(m, "output {i} ({_c_escape(s.name)}) is NULL");'
        for i, s in enumerate(p.outputs)
    ]
    return "\n".join(lines)


def _c_escape(s: str) -> str:
    return c_string(s)[1:-1].replace("%", "%%")


def common_source(p: Library, kernel_symbols: list[str]) -> str:
    """The C every Kiln library shares, after its `{PREFIX}_model` struct (which has
    `char error[]` and `double kernel_seconds[]`): the API macro's users, the kernel
    names and timings, errors (`fail`, `last_error`; a failed create's message is the
    thread's: kiln_thread_error.h) and metadata."""
    n = len(kernel_symbols)
    names = ", ".join(c_string(s) for s in kernel_symbols) or "0"
    src = f"""static const char *const kernel_names[] = {{{names}}};

/* Per-kernel timing: off by default (set_profiling starts it). */
API int {{PREFIX}}_num_kernels(void) {{ return {n}; }}
API const char *{{PREFIX}}_kernel_name(int i) {{
    return i >= 0 && i < {n} ? kernel_names[i] : NULL;
}}
API const double *{{PREFIX}}_kernel_seconds(const {{PREFIX}}_model *m) {{
    return m ? m->kernel_seconds : NULL;
}}

{ERROR_FUNCTIONS}

{_metadata("input", p.inputs)}
{_metadata("output", p.outputs)}
"""
    return src.replace("{PREFIX}", p.prefix)


def glue_source(p: Library) -> str:
    launches = []
    for i, launch in enumerate(p.launches):
        args = ", ".join(a.c_expr() for a in launch.args)
        launches.append(
            f"    {{ void *const a[] = {{{args}}};\n"
            f"      double t0 = m->profiling ? kiln_now() : 0;\n"
            f"      kiln_launch(&m->pool, {launch.symbol}, a, {launch.extent}, {int(launch.parallel)}, "
            f"{'(int)(m->runs & 1)' if launch.alternate else '0'});\n"
            f"      if (m->profiling) m->kernel_seconds[{i}] += kiln_now() - t0; }}"
        )
        if launch.errors:
            cases = " ".join(
                f'case {c + 1}: return fail(m, "%s", {c_string(msg)});' for c, msg in enumerate(launch.errors)
            )
            launches.append(f"    switch (m->status) {{ case 0: break; {cases} default: return 1; }}")
    n_launch = max(len(p.launches), 1)
    kernels = sorted({launch.symbol for launch in p.launches})
    stack = max((launch.stack_bytes for launch in p.launches), default=0)
    stack_check = (
        f"    if (!kiln_stack_suffices(&m->stack, {stack}))\n"
        f"        return fail(m, \"this thread's stack (%zu KiB) is too small for the {stack // 1024} KiB of "
        f'scratch the kernels keep on it (raise ulimit -s, or call from a thread with a larger stack)",\n'
        f"                    kiln_thread_stack(&m->stack) / 1024);"
        if stack
        else ""
    )
    src = f"""/* Generated by Kiln: the C ABI around the model's kernels. */
#include <stdarg.h>

#include "kiln_runtime.h"
#include "kiln_thread_error.h"

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
    uint64_t runs; /* runs started: a launch of alternate steps reverses them on odd ones */
    kiln_stack_cache stack; /* the calling thread's stack size */
    double kernel_seconds[{n_launch}];
}} {{PREFIX}}_model;

{{COMMON}}
/* Timing costs two clock reads per kernel. */
API void {{PREFIX}}_set_profiling({{PREFIX}}_model *m, int on) {{
    if (!m) return;
    m->profiling = on;
    memset(m->kernel_seconds, 0, sizeof m->kernel_seconds);
}}

API int {{PREFIX}}_create({{PREFIX}}_model **out) {{
    if (!out) return 1;
    *out = NULL;
    {{PREFIX}}_model *m = calloc(1, sizeof *m);
    if (!m) return kiln_thread_failed("out of memory for the model instance");
    if (ARENA_BYTES && !(m->arena = kiln_alloc_arena(ARENA_BYTES, {ALIGN}))) {{
        free(m);
        return kiln_thread_failed("out of memory for the arena (%zu bytes)", (size_t)ARENA_BYTES);
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

/* Threads used by this instance from now on (1 = the calling thread only). */
API int {{PREFIX}}_set_num_threads({{PREFIX}}_model *m, int n) {{
    if (!m || n < 1) return 1;
    kiln_pool_destroy(&m->pool);
    return kiln_pool_init(&m->pool, n);
}}

API int {{PREFIX}}_num_threads(const {{PREFIX}}_model *m) {{ return m ? m->pool.nthreads : -1; }}

API int {{PREFIX}}_run({{PREFIX}}_model *m, const void *const *inputs, void *const *outputs) {{
    if (!m) return 1;
{null_checks(p)}
    m->error[0] = 0;
    m->status = 0;
    m->runs++;
{stack_check}
{chr(10).join(launches)}
    return 0;
}}
"""
    common = common_source(p, [launch.symbol for launch in p.launches])
    return src.replace("{PREFIX}", p.prefix).replace("{COMMON}", common)


def header_source(p: Library, about: str = "", api: str = "") -> str:
    """NAME.h: the API every Kiln library has, with `about` (more of the opening comment)
    and `api` (more declarations) for a library that has more."""
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
 * {p.prefix}_last_error then says what went wrong ({p.prefix}_last_error(NULL): why
 * this thread's last {p.prefix}_create failed).
{about} */
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
{api}
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


def blob_asm(symbols: list[str], blob: Path) -> str:
    """Embed a file's bytes in the library as read-only data named by each of `symbols`
    (64-byte aligned)."""
    path = str(blob).replace("\\", "\\\\").replace('"', '\\"')
    labels = "".join(f"    .globl {s}\n    .hidden {s}\n{s}:\n" for s in symbols)
    return f"""    .section .rodata
    .balign 64
{labels}    .incbin "{path}"
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
    kernels_object: bytes | None,
    workdir: Path,
    so_path: Path,
    extra_c: str | list[str] | None = None,
    extra_blobs: dict[str, bytes] | None = None,
    glue: str | list[str] | None = None,
    libs: tuple[str, ...] = (),
) -> None:
    """Write glue, header and weights beside the object, and link them into so_path.
    `extra_c` is more C compiled into the library (a wrapper API over NAME_run; several
    files of it as a list), and
    `extra_blobs` more read-only data it refers to by symbol (embedded like the weights).
    `glue` replaces the CPU glue (a CUDA library's, which has no kernels object), or is
    several programs' glue, one C file each (their statics, the runtime's among them,
    stay each file's own), and `libs` are more linker flags."""
    workdir.mkdir(parents=True, exist_ok=True)
    glues = [glue_source(p)] if glue is None else [glue] if isinstance(glue, str) else glue
    sources = []
    for i, text in enumerate(glues):
        (workdir / f"glue{i}.c").write_text(text)
        sources.append(workdir / f"glue{i}.c")
    if kernels_object is not None:
        (workdir / "kernels.o").write_bytes(kernels_object)
    named: dict[bytes, list[str]] = {}  # equal blobs (a weight set linked twice) are embedded once
    for symbol, blob in {f"{p.prefix}_weights": p.weights, **(extra_blobs or {})}.items():
        named.setdefault(blob, []).append(symbol)
    for blob, symbols in named.items():
        (workdir / f"{symbols[0]}.bin").write_bytes(blob)
        (workdir / f"{symbols[0]}.S").write_text(blob_asm(symbols, workdir / f"{symbols[0]}.bin"))
        sources.append(workdir / f"{symbols[0]}.S")
    for i, text in enumerate([extra_c] if isinstance(extra_c, str) else extra_c or []):
        (workdir / f"extra{i}.c").write_text(text)
        sources.append(workdir / f"extra{i}.c")
    cmd = [
        c_compiler(),
        "-shared",
        "-fPIC",
        "-O2",
        "-Werror=implicit-function-declaration",  # else a call to a missing helper links and fails at load
        "-fvisibility=hidden",
        "-pthread",
        f"-I{C_SOURCES}",
        *map(str, sources),
        *([str(workdir / "kernels.o")] if kernels_object is not None else []),
        "-o",
        str(so_path),
        f"-Wl,-soname,{so_path.name}",
        "-lm",
        *libs,
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
