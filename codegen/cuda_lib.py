"""The --target cuda library: C glue over the CUDA driver API, around embedded GPU images.

The library has the CPU library's ABI (codegen.cabi writes the parts they share:
metadata, errors, kernel names, the header) and runs the same memory plan on a GPU:

- create opens the driver with dlopen (codegen/kiln_cuda.h; no CUDA at link time),
  takes the device's primary context, loads the best image it embeds for the device
  (a cubin of its architecture, else PTX compiled by the driver), looks up every
  kernel, makes a stream, allocates the arena, the weights, one status word per kernel
  with checks, and uploads the weights;
- run copies the host inputs in (to a device buffer per input and output, made by the
  first run: an instance driven by run_device alone, a train step whose weights
  stay on the GPU, spends no device memory on them), launches every kernel in order on the instance's
  stream with the grid and block it was scheduled for, copies the outputs out,
  synchronizes, and reads back the status words; run_device does the same on the
  caller's device buffers and stream, without the copies;
- alloc / free / upload / download give a host program device memory in the
  instance's context (state kept on the GPU between runs: a train step's weights and
  optimizer slots) without a CUDA library of its own; destroy frees what is left;
- every driver call is checked; a failure becomes last_error, naming the kernel
  (with its graph nodes), the input or output, or the step of create that failed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from codegen.cabi import (
    BufferRef,
    Library,
    Space,
    TensorSpec,
    c_string,
    common_source,
    header_source,
    null_checks,
)
from ir.errors import CompileError


@dataclass(frozen=True)
class GpuLaunch:
    """One kernel launch: the kernel's name in the images, its arguments, its grid and
    block (x, y, z), the graph nodes it computes, and its checks' messages."""

    entry: str
    args: tuple[BufferRef, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    where: str
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Image:
    """Code for the GPU: a cubin for one architecture, or PTX the driver compiles."""

    cubin: bool
    arch: str  # "sm_80"
    data: bytes

    @property
    def sm(self) -> int:
        return int(self.arch.removeprefix("sm_"))

    @property
    def symbol(self) -> str:
        return f"{'cubin' if self.cubin else 'ptx'}_{self.arch}"


def cubin(ptx: str, arch: str) -> bytes:
    """ptxas's cubin of a PTX module for one architecture."""
    exe = shutil.which("ptxas")
    if exe is None:
        raise CompileError("ptxas not found: install it (pip install nvidia-cuda-nvcc) to embed cubins")
    with tempfile.TemporaryDirectory(prefix="kiln-ptxas-") as d:
        src, out = Path(d) / "kernels.ptx", Path(d) / "kernels.cubin"
        src.write_text(ptx)
        result = subprocess.run(
            [exe, f"-arch={arch}", str(src), "-o", str(out)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise CompileError(f"ptxas ({arch}) rejected the PTX:\n{result.stderr}")
        return out.read_bytes()


def ptxas_version() -> str:
    """What cubins depend on (the ptxas release), or "" without ptxas."""
    exe = shutil.which("ptxas")
    if exe is None:
        return ""
    return subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()


def _device_expr(ref: BufferRef, status_index: int) -> str:
    if ref.space is Space.INPUT:
        return f"in[{ref.index}]"
    if ref.space is Space.OUTPUT:
        return f"out[{ref.index}]"
    if ref.space is Space.ARENA:
        return f"m->arena + {ref.index}"
    if ref.space is Space.WEIGHTS:
        return f"m->weights + {ref.index}"
    return f"m->status + {4 * status_index}"


def glue_source(p: Library, launches: list[GpuLaunch], images: list[Image]) -> str:
    n = len(launches)
    ni, no = len(p.inputs), len(p.outputs)
    checked = [i for i, launch in enumerate(launches) if launch.errors]
    symbols = [f"{p.prefix}_{launch.entry}" for launch in launches]
    table = ",\n".join(
        f"    {{{c_string(launch.entry)}, {c_string(launch.where)}, "
        f"{{{', '.join(map(str, launch.grid))}}}, {{{', '.join(map(str, launch.block))}}}}}"
        for launch in launches
    )
    enqueue = []
    for i, launch in enumerate(launches):
        status = checked.index(i) if launch.errors else 0
        args = ", ".join(_device_expr(a, status) for a in launch.args)
        params = ", ".join(f"&a[{j}]" for j in range(len(launch.args)))
        enqueue.append(
            f"    {{ CUdeviceptr a[] = {{{args}}};\n"
            f"      void *p[] = {{{params}}};\n"
            f"      if (launch(m, {i}, p, s)) return 1; }}"
            if launch.args
            else f"    if (launch(m, {i}, NULL, s)) return 1;"
        )
    status_checks = []
    for j, i in enumerate(checked):
        cases = " ".join(
            f'case {c + 1}: return fail(m, "%s", {c_string(msg)});'
            for c, msg in enumerate(launches[i].errors)
        )
        status_checks.append(
            f"    switch (m->status_host[{j}]) {{ case 0: break; {cases}\n"
            f'      default: return fail(m, "kernel %s set the unknown status %d", kernels[{i}].name, '
            f"(int)m->status_host[{j}]); }}"
        )
    image_decls = "\n".join(f"extern const unsigned char {{PREFIX}}_{im.symbol}[];" for im in images)
    image_table = (
        ",\n".join(f"    {{{int(im.cubin)}, {im.sm}, {{PREFIX}}_{im.symbol}}}" for im in images)
        or "    {0, 0, NULL}"
    )
    input_bytes = ", ".join(str(_nbytes(t)) for t in p.inputs) or "0"
    output_bytes = ", ".join(str(_nbytes(t)) for t in p.outputs) or "0"
    src = f"""/* Generated by Kiln: the C ABI around the model's GPU kernels, over the CUDA driver
 * API opened at run time (kiln_cuda.h). */
#include <pthread.h>

#include "kiln_cuda.h"
#include "kiln_thread_error.h"

#define API __attribute__((visibility("default")))
#define ARENA_BYTES {p.arena_bytes}ULL
#define WEIGHT_BYTES {len(p.weights)}ULL
#define NUM_KERNELS {n}
#define NUM_STATUS {len(checked)} /* one status word per kernel with checks */
#define NUM_IMAGES {len(images)}

extern const unsigned char {{PREFIX}}_weights[];
{image_decls}

/* The images, as kiln_cuda_load_module picks among them. */
static const kiln_cuda_image images[] = {{
{image_table}
}};

/* Each kernel: its name in the images, the graph nodes it computes, grid and block. */
static const struct {{
    const char *name, *where;
    unsigned grid[3], block[3];
}} kernels[] = {{
{table or '    {"", "", {0, 0, 0}, {0, 0, 0}}'}
}};

static const size_t input_bytes[] = {{{input_bytes}}};
static const size_t output_bytes[] = {{{output_bytes}}};

typedef struct {{PREFIX}}_model {{
    kiln_cuda cu;
    CUdevice device;
    CUcontext context; /* the device's primary context, retained */
    CUmodule module;
    CUstream stream;
    CUfunction fn[NUM_KERNELS + 1];
    CUdeviceptr arena, weights, status; /* device memory */
    CUdeviceptr in[{max(ni, 1)}], out[{max(no, 1)}]; /* staging for run's host buffers (its first call) */
    int32_t status_host[NUM_STATUS + 1];
    CUdeviceptr *owned; /* the caller's buffers ({{PREFIX}}_alloc), freed by {{PREFIX}}_free or destroy */
    int n_owned, cap_owned;
    CUevent events[NUM_KERNELS + 1]; /* made by the first set_profiling(m, 1) */
    int profiling, threads;
    char description[384];
    char reason[256]; /* the last driver error, described */
    char error[4096];
    double kernel_seconds[NUM_KERNELS + 1];
}} {{PREFIX}}_model;

{{COMMON}}
static const char *describe({{PREFIX}}_model *m, CUresult r) {{
    return kiln_cuda_describe(&m->cu, r, m->reason, sizeof m->reason);
}}

/* The instance's context is current on the calling thread between push and pop, so
 * instances may be used from any thread (one thread at a time per instance). */
static int push({{PREFIX}}_model *m) {{
    CUresult r = m->cu.cuCtxPushCurrent_v2(m->context);
    return r ? fail(m, "cuCtxPushCurrent: %s", describe(m, r)) : 0;
}}

static void pop({{PREFIX}}_model *m) {{
    CUcontext unused;
    m->cu.cuCtxPopCurrent_v2(&unused);
}}

static void release({{PREFIX}}_model *m) {{
    if (m->cu.lib && m->context && m->cu.cuCtxPushCurrent_v2(m->context) == 0) {{
        if (m->stream) m->cu.cuStreamSynchronize(m->stream);
        for (int i = 0; i < m->n_owned; i++) m->cu.cuMemFree_v2(m->owned[i]);
        for (int i = 0; i < NUM_KERNELS + 1; i++)
            if (m->events[i]) m->cu.cuEventDestroy_v2(m->events[i]);
        CUdeviceptr *bufs[] = {{&m->arena, &m->weights, &m->status}};
        for (int i = 0; i < 3; i++)
            if (*bufs[i]) m->cu.cuMemFree_v2(*bufs[i]);
        for (int i = 0; i < {ni}; i++)
            if (m->in[i]) m->cu.cuMemFree_v2(m->in[i]);
        for (int i = 0; i < {no}; i++)
            if (m->out[i]) m->cu.cuMemFree_v2(m->out[i]);
        if (m->stream) m->cu.cuStreamDestroy_v2(m->stream);
        if (m->module) m->cu.cuModuleUnload(m->module);
        pop(m);
        m->cu.cuDevicePrimaryCtxRelease_v2(m->device);
    }}
    free(m->owned);
    m->owned = NULL;
    m->n_owned = 0;
    kiln_cuda_close(&m->cu);
}}

static int alloc({{PREFIX}}_model *m, CUdeviceptr *ptr, size_t bytes, const char *what) {{
    CUresult r = m->cu.cuMemAlloc_v2(ptr, bytes ? bytes : 1);
    if (r) {{
        *ptr = 0;
        return fail(m, "allocating %s (%zu bytes) on %s: cuMemAlloc: %s", what, bytes, m->description,
                    describe(m, r));
    }}
    return 0;
}}

/* Everything create does once the driver is open; fails into m->error. */
static int setup({{PREFIX}}_model *m, int ordinal) {{
    char text[256];
    CUresult r = m->cu.cuInit(0);
    if (r == KILN_CUDA_ERROR_NO_DEVICE)
        return fail(m, "no CUDA device: the driver (%s) finds none (cuInit: %s)", m->cu.path, describe(m, r));
    if (r) return fail(m, "the CUDA driver (%s) failed to start: cuInit: %s", m->cu.path, describe(m, r));
    int version = 0, count = 0, major = 0, minor = 0;
    if ((r = m->cu.cuDriverGetVersion(&version))) return fail(m, "cuDriverGetVersion: %s", describe(m, r));
    if ((r = m->cu.cuDeviceGetCount(&count))) return fail(m, "cuDeviceGetCount: %s", describe(m, r));
    if (count == 0) return fail(m, "no CUDA device: the driver (%s) finds none", m->cu.path);
    if (ordinal < 0 || ordinal >= count)
        return fail(m, "no CUDA device %d: the driver sees %d (0 to %d)", ordinal, count, count - 1);
    if ((r = m->cu.cuDeviceGet(&m->device, ordinal)))
        return fail(m, "cuDeviceGet(%d): %s", ordinal, describe(m, r));
    CUdevice dev = m->device;
    if ((r = m->cu.cuDeviceGetName(text, sizeof text, dev)))
        return fail(m, "cuDeviceGetName: %s", describe(m, r));
    text[sizeof text - 1] = 0;
    if ((r = m->cu.cuDeviceGetAttribute(&major, KILN_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) ||
        (r = m->cu.cuDeviceGetAttribute(&minor, KILN_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)))
        return fail(m, "cuDeviceGetAttribute (compute capability): %s", describe(m, r));
    snprintf(m->description, sizeof m->description, "device %d, %s (compute capability %d.%d, driver %d.%d)",
             ordinal, text, major, minor, version / 1000, version % 1000 / 10);
    if ((r = m->cu.cuDevicePrimaryCtxRetain(&m->context, m->device))) {{
        m->context = NULL;
        return fail(m, "cuDevicePrimaryCtxRetain on %s: %s", m->description, describe(m, r));
    }}
    if (push(m)) {{
        m->cu.cuDevicePrimaryCtxRelease_v2(m->device);
        m->context = NULL;
        return 1;
    }}
    int rc = 1;
    int chosen = kiln_cuda_load_module(&m->cu, images, NUM_IMAGES, major, minor, m->description, &m->module,
                                       m->error, sizeof m->error);
    if (chosen < 0) {{
        m->module = NULL;
        goto done;
    }}
    size_t used = strlen(m->description);
    snprintf(m->description + used, sizeof m->description - used, ", running %s sm_%d",
             images[chosen].cubin ? "cubin" : "PTX", images[chosen].sm);
    for (int i = 0; i < NUM_KERNELS; i++)
        if ((r = m->cu.cuModuleGetFunction(&m->fn[i], m->module, kernels[i].name))) {{
            fail(m, "kernel %s (%s) is not in the loaded image: cuModuleGetFunction: %s", kernels[i].name,
                 kernels[i].where, describe(m, r));
            goto done;
        }}
    if ((r = m->cu.cuStreamCreate(&m->stream, KILN_CU_STREAM_NON_BLOCKING))) {{
        m->stream = NULL;
        fail(m, "cuStreamCreate: %s", describe(m, r));
        goto done;
    }}
    if ((ARENA_BYTES && alloc(m, &m->arena, ARENA_BYTES, "the arena")) ||
        (WEIGHT_BYTES && alloc(m, &m->weights, WEIGHT_BYTES, "the weights")) ||
        (NUM_STATUS && alloc(m, &m->status, 4 * NUM_STATUS, "the status words")))
        goto done;
    if (WEIGHT_BYTES && (r = m->cu.cuMemcpyHtoD_v2(m->weights, {{PREFIX}}_weights, WEIGHT_BYTES))) {{
        fail(m, "uploading the weights (%llu bytes): cuMemcpyHtoD: %s", WEIGHT_BYTES, describe(m, r));
        goto done;
    }}
    rc = 0;
done:
    pop(m);
    return rc;
}}

/* An instance on CUDA device `ordinal`. */
API int {{PREFIX}}_create_device({{PREFIX}}_model **out, int ordinal) {{
    if (!out) return kiln_thread_failed("out is NULL");
    *out = NULL;
    {{PREFIX}}_model *m = calloc(1, sizeof *m);
    if (!m) return kiln_thread_failed("out of memory for the model instance");
    m->threads = 1;
    if (kiln_cuda_open(&m->cu, m->error, sizeof m->error) || setup(m, ordinal)) {{
        kiln_thread_failed("%s", m->error);
        release(m);
        free(m);
        return 1;
    }}
    *out = m;
    return 0;
}}

API int {{PREFIX}}_create({{PREFIX}}_model **out) {{ return {{PREFIX}}_create_device(out, 0); }}

API void {{PREFIX}}_destroy({{PREFIX}}_model *m) {{
    if (!m) return;
    release(m);
    free(m);
}}

/* The device, the driver and the image this instance runs. */
API const char *{{PREFIX}}_device(const {{PREFIX}}_model *m) {{ return m ? m->description : NULL; }}

/* Accepted for the CPU library's API: the GPU runs the kernels, whatever n is. */
API int {{PREFIX}}_set_num_threads({{PREFIX}}_model *m, int n) {{
    if (!m || n < 1) return 1;
    m->threads = n;
    return 0;
}}

API int {{PREFIX}}_num_threads(const {{PREFIX}}_model *m) {{ return m ? m->threads : -1; }}

/* Timing records an event before each kernel and one after the last (on the GPU). */
API void {{PREFIX}}_set_profiling({{PREFIX}}_model *m, int on) {{
    if (!m) return;
    m->error[0] = 0;
    memset(m->kernel_seconds, 0, sizeof m->kernel_seconds);
    if (on && !m->events[0]) {{
        if (push(m)) return;
        for (int i = 0; i < NUM_KERNELS + 1; i++) {{
            CUresult r = m->cu.cuEventCreate(&m->events[i], 0);
            if (r) {{
                m->events[i] = NULL;
                fail(m, "profiling needs events: cuEventCreate: %s", describe(m, r));
                on = 0;
                break;
            }}
        }}
        pop(m);
    }}
    m->profiling = on && m->events[NUM_KERNELS];
}}

static int launch({{PREFIX}}_model *m, int k, void **params, CUstream s) {{
    const unsigned *g = kernels[k].grid, *b = kernels[k].block;
    CUresult r;
    if (m->profiling && (r = m->cu.cuEventRecord(m->events[k], s)))
        return fail(m, "kernel %s (%s): cuEventRecord: %s", kernels[k].name, kernels[k].where,
                    describe(m, r));
    r = m->cu.cuLaunchKernel(m->fn[k], g[0], g[1], g[2], b[0], b[1], b[2], 0, s, params, NULL);
    if (r)
        return fail(m, "kernel %s (%s): cuLaunchKernel: %s", kernels[k].name, kernels[k].where,
                    describe(m, r));
    return 0;
}}

/* Every kernel, in order, on stream s; in and out: the inputs' and outputs' device addresses. */
static int enqueue({{PREFIX}}_model *m, const CUdeviceptr *in, const CUdeviceptr *out, CUstream s) {{
    (void)in;
    (void)out;
    CUresult r;
    if (NUM_STATUS && (r = m->cu.cuMemsetD32Async(m->status, 0, NUM_STATUS, s)))
        return fail(m, "clearing the status words: cuMemsetD32Async: %s", describe(m, r));
{chr(10).join(enqueue)}
    if (m->profiling && (r = m->cu.cuEventRecord(m->events[NUM_KERNELS], s)))
        return fail(m, "cuEventRecord: %s", describe(m, r));
    if (NUM_STATUS && (r = m->cu.cuMemcpyDtoHAsync_v2(m->status_host, m->status, 4 * NUM_STATUS, s)))
        return fail(m, "reading the status words: cuMemcpyDtoHAsync: %s", describe(m, r));
    return 0;
}}

/* Waits for stream s (always: after a failure too, so that no copy into the caller's
 * buffers is still in flight when run returns), then reports what the kernels' checks
 * found and adds up the kernels' times. */
static int finish({{PREFIX}}_model *m, CUstream s, int rc) {{
    CUresult r = m->cu.cuStreamSynchronize(s);
    if (rc) return rc;
    if (r) return fail(m, "running the kernels: cuStreamSynchronize: %s", describe(m, r));
{chr(10).join(status_checks)}
    if (m->profiling)
        for (int k = 0; k < NUM_KERNELS; k++) {{
            float ms = 0;
            if ((r = m->cu.cuEventElapsedTime(&ms, m->events[k], m->events[k + 1])))
                return fail(m, "kernel %s: cuEventElapsedTime: %s", kernels[k].name, describe(m, r));
            m->kernel_seconds[k] += 1e-3 * ms;
        }}
    return 0;
}}

/* run's device buffers for its host inputs and outputs, made by its first call. */
static int stage({{PREFIX}}_model *m) {{
    for (int i = 0; i < {ni}; i++)
        if (!m->in[i] && alloc(m, &m->in[i], input_bytes[i], {p.prefix}_input_name(i))) return 1;
    for (int i = 0; i < {no}; i++)
        if (!m->out[i] && alloc(m, &m->out[i], output_bytes[i], {p.prefix}_output_name(i))) return 1;
    return 0;
}}

static int copy_in({{PREFIX}}_model *m, const void *const *inputs) {{
    for (int i = 0; i < {ni}; i++) {{
        CUresult r = m->cu.cuMemcpyHtoDAsync_v2(m->in[i], inputs[i], input_bytes[i], m->stream);
        if (r)
            return fail(m, "copying input %d (%s, %zu bytes) to the device: cuMemcpyHtoDAsync: %s", i,
                        {p.prefix}_input_name(i), input_bytes[i], describe(m, r));
    }}
    return 0;
}}

static int copy_out({{PREFIX}}_model *m, void *const *outputs) {{
    for (int i = 0; i < {no}; i++) {{
        CUresult r = m->cu.cuMemcpyDtoHAsync_v2(outputs[i], m->out[i], output_bytes[i], m->stream);
        if (r)
            return fail(m, "copying output %d (%s, %zu bytes) from the device: cuMemcpyDtoHAsync: %s", i,
                        {p.prefix}_output_name(i), output_bytes[i], describe(m, r));
    }}
    return 0;
}}

/* Host buffers in and out: copies to and from the instance's device buffers. */
API int {{PREFIX}}_run({{PREFIX}}_model *m, const void *const *inputs, void *const *outputs) {{
    if (!m) return 1;
{null_checks(p)}
    m->error[0] = 0;
    if (push(m)) return 1;
    if (stage(m)) {{
        pop(m);
        return 1;
    }}
    int rc = copy_in(m, inputs) || enqueue(m, m->in, m->out, m->stream) || copy_out(m, outputs);
    rc = finish(m, m->stream, rc);
    pop(m);
    return rc;
}}

/* Device buffers in and out (CUdeviceptr values, as pointers), on `stream` (a CUstream;
 * NULL: the instance's own); returns once the stream has finished the outputs. */
API int {{PREFIX}}_run_device(
    {{PREFIX}}_model *m, const void *const *dev_inputs, void *const *dev_outputs, void *stream) {{
    if (!m) return 1;
{null_checks(p, "dev_inputs", "dev_outputs")}
    m->error[0] = 0;
    CUdeviceptr in[{max(ni, 1)}] = {{0}}, out[{max(no, 1)}] = {{0}};
    for (int i = 0; i < {ni}; i++) in[i] = (CUdeviceptr)(uintptr_t)dev_inputs[i];
    for (int i = 0; i < {no}; i++) out[i] = (CUdeviceptr)(uintptr_t)dev_outputs[i];
    CUstream s = stream ? (CUstream)stream : m->stream;
    if (push(m)) return 1;
    int rc = finish(m, s, enqueue(m, in, out, s));
    pop(m);
    return rc;
}}

/* Device memory for the caller, in the instance's context (valid for every instance on
 * the same device: they share its primary context); freed by {{PREFIX}}_free, or by
 * destroy. */
API int {{PREFIX}}_alloc({{PREFIX}}_model *m, size_t bytes, void **dev) {{
    if (!m) return 1;
    if (!dev) return fail(m, "alloc: dev is NULL");
    *dev = NULL;
    m->error[0] = 0;
    if (m->n_owned == m->cap_owned) {{
        int cap = m->cap_owned ? 2 * m->cap_owned : 16;
        CUdeviceptr *more = realloc(m->owned, (size_t)cap * sizeof *more);
        if (!more) return fail(m, "alloc: out of host memory for the list of device buffers");
        m->owned = more;
        m->cap_owned = cap;
    }}
    if (push(m)) return 1;
    CUdeviceptr ptr = 0;
    int rc = alloc(m, &ptr, bytes, "a device buffer");
    pop(m);
    if (rc) return 1;
    m->owned[m->n_owned++] = ptr;
    *dev = (void *)(uintptr_t)ptr;
    return 0;
}}

/* Frees a buffer from {{PREFIX}}_alloc of this instance (NULL: nothing to do). */
API int {{PREFIX}}_free({{PREFIX}}_model *m, void *dev) {{
    if (!m) return 1;
    m->error[0] = 0;
    if (!dev) return 0;
    CUdeviceptr ptr = (CUdeviceptr)(uintptr_t)dev;
    int i = 0;
    while (i < m->n_owned && m->owned[i] != ptr) i++;
    if (i == m->n_owned)
        return fail(m, "free: 0x%llx is not a live buffer of this instance ({{PREFIX}}_alloc's)", ptr);
    m->owned[i] = m->owned[--m->n_owned]; /* gone from the list, whatever the driver says */
    if (push(m)) return 1;
    CUresult r = m->cu.cuMemFree_v2(ptr);
    pop(m);
    return r ? fail(m, "freeing device buffer 0x%llx: cuMemFree: %s", ptr, describe(m, r)) : 0;
}}

/* Copies `bytes` between host and device memory on the instance's stream, after what it
 * has queued; they return once the bytes have arrived. */
API int {{PREFIX}}_upload({{PREFIX}}_model *m, void *dev, const void *host, size_t bytes) {{
    if (!m) return 1;
    m->error[0] = 0;
    if (!dev || !host) return fail(m, "upload: %s is NULL", dev ? "host" : "dev");
    if (!bytes) return 0;
    if (push(m)) return 1;
    CUresult r = m->cu.cuMemcpyHtoDAsync_v2((CUdeviceptr)(uintptr_t)dev, host, bytes, m->stream);
    CUresult s = m->cu.cuStreamSynchronize(m->stream);
    pop(m);
    if (r)
        return fail(m, "copying %zu bytes to the device (at %p): cuMemcpyHtoDAsync: %s", bytes, dev,
                    describe(m, r));
    if (s)
        return fail(m, "copying %zu bytes to the device: cuStreamSynchronize: %s", bytes, describe(m, s));
    return 0;
}}

API int {{PREFIX}}_download({{PREFIX}}_model *m, void *host, const void *dev, size_t bytes) {{
    if (!m) return 1;
    m->error[0] = 0;
    if (!dev || !host) return fail(m, "download: %s is NULL", dev ? "host" : "dev");
    if (!bytes) return 0;
    if (push(m)) return 1;
    CUresult r = m->cu.cuMemcpyDtoHAsync_v2(host, (CUdeviceptr)(uintptr_t)dev, bytes, m->stream);
    CUresult s = m->cu.cuStreamSynchronize(m->stream);
    pop(m);
    if (r)
        return fail(m, "copying %zu bytes from the device (at %p): cuMemcpyDtoHAsync: %s", bytes, dev,
                    describe(m, r));
    if (s)
        return fail(m, "copying %zu bytes from the device: cuStreamSynchronize: %s", bytes, describe(m, s));
    return 0;
}}
"""
    common = common_source(p, symbols)
    return src.replace("{PREFIX}", p.prefix).replace("{COMMON}", common)


def _nbytes(spec: TensorSpec) -> int:
    return int(np.dtype(spec.dtype).itemsize) * prod(spec.shape)


def header(p: Library) -> str:
    """NAME.h of a CUDA library: the CPU library's API, plus running on device buffers."""
    about = f""" *
 * This library runs on an NVIDIA GPU through the CUDA driver, which {p.prefix}_create
 * opens (libcuda.so.1, with dlopen: nothing of CUDA is needed to link against it). The
 * environment variable KILN_LIBCUDA names another driver library instead (a stand-in
 * driver, for tests); KILN_CUDA_IMAGE=cubin or =ptx keeps only that kind of embedded
 * image. Each instance has its own device memory and stream; {p.prefix}_run takes host
 * buffers and copies them, {p.prefix}_run_device device ones.
"""
    api = f"""
/* an instance on CUDA device `ordinal` ({p.prefix}_create: device 0) */
int {p.prefix}_create_device({p.prefix}_model **out, int ordinal);
/* inputs and outputs in device memory (CUdeviceptr values), run on `stream` (a CUstream;
 * NULL: the instance's own stream); returns when the outputs are written */
int {p.prefix}_run_device(
    {p.prefix}_model *m, const void *const *dev_inputs, void *const *dev_outputs, void *stream);
/* the device, driver and image the instance runs, e.g. "device 0, NVIDIA H200 (compute
 * capability 9.0, driver 12.8), running cubin sm_90" */
const char *{p.prefix}_device(const {p.prefix}_model *m);
/* device memory in the instance's context, for state kept on the GPU between runs (a
 * train step's weights): *dev receives its address; {p.prefix}_free frees it, destroy
 * frees what is left */
int {p.prefix}_alloc({p.prefix}_model *m, size_t bytes, void **dev);
int {p.prefix}_free({p.prefix}_model *m, void *dev);
/* copies between host and device memory on the instance's stream; they return when done */
int {p.prefix}_upload({p.prefix}_model *m, void *dev, const void *host, size_t bytes);
int {p.prefix}_download({p.prefix}_model *m, void *host, const void *dev, size_t bytes);
"""
    return header_source(p, about, api)
