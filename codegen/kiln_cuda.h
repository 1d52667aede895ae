/* Kiln's CUDA support, compiled into every --target cuda library.
 *
 * The library is built without CUDA: it opens the driver (libcuda.so.1) with dlopen
 * when a model instance is created and resolves the few driver entry points it uses,
 * each by its current name (the `_v2` names where the driver has them). The types
 * below are the driver API's, as cuda.h declares them. Everything is static, so two
 * models link into one program; nothing here prints or aborts: every failure becomes
 * a message in the caller's buffer. */
#ifndef KILN_CUDA_H
#define KILN_CUDA_H

#include <dlfcn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;

#define KILN_CUDA_ERROR_NO_DEVICE 100
#define KILN_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define KILN_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76
#define KILN_CU_JIT_ERROR_LOG_BUFFER 5
#define KILN_CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES 6
#define KILN_CU_STREAM_NON_BLOCKING 1

/* Every driver entry point the library calls: X(symbol, parameters). */
#define KILN_CUDA_API(X)                                                                              \
    X(cuInit, (unsigned flags))                                                                       \
    X(cuDriverGetVersion, (int *version))                                                             \
    X(cuDeviceGetCount, (int *count))                                                                 \
    X(cuDeviceGet, (CUdevice * device, int ordinal))                                                  \
    X(cuDeviceGetName, (char *name, int len, CUdevice device))                                        \
    X(cuDeviceGetAttribute, (int *value, int attribute, CUdevice device))                             \
    X(cuDevicePrimaryCtxRetain, (CUcontext * ctx, CUdevice device))                                   \
    X(cuDevicePrimaryCtxRelease_v2, (CUdevice device))                                                \
    X(cuCtxPushCurrent_v2, (CUcontext ctx))                                                           \
    X(cuCtxPopCurrent_v2, (CUcontext * ctx))                                                          \
    X(cuModuleLoadDataEx, (CUmodule * module, const void *image, unsigned n, int *options, void **values)) \
    X(cuModuleUnload, (CUmodule module))                                                              \
    X(cuModuleGetFunction, (CUfunction * fn, CUmodule module, const char *name))                      \
    X(cuMemAlloc_v2, (CUdeviceptr * ptr, size_t bytes))                                               \
    X(cuMemFree_v2, (CUdeviceptr ptr))                                                                \
    X(cuMemcpyHtoD_v2, (CUdeviceptr dst, const void *src, size_t bytes))                              \
    X(cuMemcpyHtoDAsync_v2, (CUdeviceptr dst, const void *src, size_t bytes, CUstream stream))        \
    X(cuMemcpyDtoHAsync_v2, (void *dst, CUdeviceptr src, size_t bytes, CUstream stream))              \
    X(cuMemsetD32Async, (CUdeviceptr dst, unsigned value, size_t count, CUstream stream))             \
    X(cuStreamCreate, (CUstream * stream, unsigned flags))                                            \
    X(cuStreamDestroy_v2, (CUstream stream))                                                          \
    X(cuStreamSynchronize, (CUstream stream))                                                         \
    X(cuLaunchKernel, (CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, \
                       unsigned bz, unsigned shared_bytes, CUstream stream, void **params, void **extra)) \
    X(cuEventCreate, (CUevent * event, unsigned flags))                                               \
    X(cuEventRecord, (CUevent event, CUstream stream))                                                \
    X(cuEventElapsedTime, (float *ms, CUevent start, CUevent end))                                    \
    X(cuEventDestroy_v2, (CUevent event))                                                             \
    X(cuGetErrorName, (CUresult error, const char **name))                                            \
    X(cuGetErrorString, (CUresult error, const char **text))

typedef struct kiln_cuda {
    void *lib; /* the driver, from dlopen */
    char path[256];
#define KILN_CUDA_FIELD(symbol, params) CUresult(*symbol) params;
    KILN_CUDA_API(KILN_CUDA_FIELD)
#undef KILN_CUDA_FIELD
} kiln_cuda;

/* Opens the driver: $KILN_LIBCUDA if set (a stand-in driver, for tests), else
 * libcuda.so.1. RTLD_NODELETE: the driver stays mapped after kiln_cuda_close, as
 * unloading a driver that other code in the process may use is not safe. */
static int kiln_cuda_open(kiln_cuda *cu, char *err, size_t n) {
    memset(cu, 0, sizeof *cu);
    const char *path = getenv("KILN_LIBCUDA");
    snprintf(cu->path, sizeof cu->path, "%s", path && *path ? path : "libcuda.so.1");
    dlerror();
    cu->lib = dlopen(cu->path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!cu->lib) {
        const char *why = dlerror();
        snprintf(err, n, "no CUDA driver: cannot load %s (%s); is the NVIDIA driver installed?", cu->path,
                 why ? why : "unknown reason");
        return 1;
    }
#define KILN_CUDA_RESOLVE(symbol, params)                                                              \
    if (!(*(void **)&cu->symbol = dlsym(cu->lib, #symbol))) {                                          \
        snprintf(err, n, "the CUDA driver %s has no %s: it is older than this library needs (CUDA 11 or " \
                 "newer)", cu->path, #symbol);                                                          \
        dlclose(cu->lib);                                                                               \
        cu->lib = NULL;                                                                                 \
        return 1;                                                                                       \
    }
    KILN_CUDA_API(KILN_CUDA_RESOLVE)
#undef KILN_CUDA_RESOLVE
    return 0;
}

static void kiln_cuda_close(kiln_cuda *cu) {
    if (cu->lib) dlclose(cu->lib);
    cu->lib = NULL;
}

/* "CUDA_ERROR_OUT_OF_MEMORY (2): out of memory", in buf. */
static const char *kiln_cuda_describe(const kiln_cuda *cu, CUresult r, char *buf, size_t n) {
    const char *name = NULL, *text = NULL;
    if (cu->cuGetErrorName(r, &name) != 0) name = NULL;
    if (cu->cuGetErrorString(r, &text) != 0) text = NULL;
    snprintf(buf, n, "%s (%d)%s%s", name ? name : "unknown CUDA error", r, text ? ": " : "", text ? text : "");
    return buf;
}

/* One image the library embeds: a cubin for one architecture, or PTX (NUL-terminated). */
typedef struct kiln_cuda_image {
    int cubin; /* 1: a cubin, runs on its own major architecture; 0: PTX, compiled by the driver */
    int sm;    /* its architecture, e.g. 80 for sm_80 */
    const unsigned char *data;
} kiln_cuda_image;

/* The images a device of compute capability major.minor may run, best first: a cubin
 * of its major architecture at or below its minor one (the newest such), then PTX at
 * or below its capability (the newest first). $KILN_CUDA_IMAGE=cubin or =ptx keeps only
 * that kind. Returns how many indices it wrote to order. */
static int kiln_cuda_candidates(const kiln_cuda_image *images, int n, int major, int minor, int *order) {
    const char *only = getenv("KILN_CUDA_IMAGE");
    int want_cubin = !only || !*only || !strcmp(only, "cubin");
    int want_ptx = !only || !*only || !strcmp(only, "ptx");
    int cc = major * 10 + minor, count = 0;
    for (int kind = 1; kind >= 0; kind--) {
        if ((kind && !want_cubin) || (!kind && !want_ptx)) continue;
        for (int best = -1;; best = -1) {
            for (int i = 0; i < n; i++) {
                const kiln_cuda_image *im = &images[i];
                int fits = kind ? im->sm / 10 == major && im->sm % 10 <= minor : im->sm <= cc;
                int taken = 0;
                for (int j = 0; j < count; j++) taken |= order[j] == i;
                if (im->cubin == kind && fits && !taken && (best < 0 || im->sm > images[best].sm)) best = i;
            }
            if (best < 0) break;
            order[count++] = best;
        }
    }
    return count;
}

/* "cubin sm_80, cubin sm_90, PTX sm_80, PTX sm_90": what the library embeds. */
static void kiln_cuda_list_images(const kiln_cuda_image *images, int n, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < n && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%s sm_%d", i ? ", " : "",
                                 images[i].cubin ? "cubin" : "PTX", images[i].sm);
}

/* Loads the first candidate image the driver accepts into *module, keeping each
 * rejection (and a PTX's JIT error log) for the message. Returns the index loaded, or
 * -1 with err saying what the device is (`device` describes it, with its compute
 * capability), what the library embeds and why each image failed. */
static int kiln_cuda_load_module(const kiln_cuda *cu, const kiln_cuda_image *images, int n, int major,
                                 int minor, const char *device, CUmodule *module, char *err, size_t size) {
    int order[16];
    char embedded[256], why[2048] = "", reason[256];
    kiln_cuda_list_images(images, n, embedded, sizeof embedded);
    int count = kiln_cuda_candidates(images, n < 16 ? n : 16, major, minor, order);
    if (count == 0) {
        const char *only = getenv("KILN_CUDA_IMAGE");
        snprintf(err, size, "%s can run none of this library's images (%s%s%s%s)", device, embedded,
                 only && *only ? "; KILN_CUDA_IMAGE=" : "",
                 only && *only ? only : "", "; a cubin runs on its own major architecture, PTX on any "
                 "device at or above its own");
        return -1;
    }
    size_t used = 0;
    for (int c = 0; c < count; c++) {
        const kiln_cuda_image *im = &images[order[c]];
        char log[1024] = "";
        int options[] = {KILN_CU_JIT_ERROR_LOG_BUFFER, KILN_CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
        void *values[] = {log, (void *)(uintptr_t)(sizeof log - 1)};
        CUresult r = cu->cuModuleLoadDataEx(module, im->data, 2, options, values);
        if (r == 0) return order[c];
        log[sizeof log - 1] = 0;
        for (char *p = log; *p; p++)  /* one line per attempt */
            if (*p == '\n') *p = ' ';
        if (used < sizeof why)
            used += (size_t)snprintf(why + used, sizeof why - used, "; %s sm_%d: %s%s%s",
                                     im->cubin ? "cubin" : "PTX", im->sm,
                                     kiln_cuda_describe(cu, r, reason, sizeof reason), log[0] ? "; JIT log: " : "",
                                     log);
    }
    snprintf(err, size, "%s could not load any of this library's images (%s)%s", device, embedded, why);
    return -1;
}

#endif
