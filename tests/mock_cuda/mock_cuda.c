/* A stand-in for the CUDA driver (libcuda.so.1) on machines without a GPU.
 *
 * It exports the driver entry points a Kiln --target cuda library resolves (and the few
 * more benchmarks/gpu.py uses), so that the library's real host code runs end to end:
 * "device" memory is host memory; a launch runs the CPU build of the same GPU-scheduled
 * kernel (a cuda-sim library exporting the table of mock_cuda.h, named by
 * KILN_MOCK_KERNELS) over every block of its grid. It
 * checks what a driver would not forgive: every device pointer a copy or a kernel
 * argument uses lies inside a live allocation (for the kernel's whole buffer), the grid
 * and block of a launch are those the kernel was scheduled for, a context is current,
 * images suit the device (a cubin its architecture, PTX at or below its capability).
 * A broken rule returns an error and prints one line starting "mock_cuda:" to stderr.
 *
 * Configured by the environment, read at each call:
 *   KILN_MOCK_DEVICES   devices the driver sees (default 1; 0: cuInit fails as with none)
 *   KILN_MOCK_CC        the devices' compute capability as major*10+minor (default 80)
 *   KILN_MOCK_KERNELS   the cuda-sim library holding the kernel table; or, for a process
 *                       running several CUDA libraries, LIB=TABLE pairs separated by ':'
 *                       (each image's table is that of the library holding the image)
 *   KILN_MOCK_FAIL      calls to fail: NAME (every call), NAME@N (the Nth call of NAME since
 *                       the mock was loaded), either with =CODE (the CUresult; else a
 *                       typical one for NAME); several, separated by commas
 *   KILN_MOCK_THREADS   threads a launch splits its blocks across (default: the CPUs)
 *   KILN_MOCK_CHECK_EXIT=1  report driver objects still live when the process exits
 * kiln_mock_calls(NAME) counts calls; kiln_mock_live() counts the allocations, modules,
 * streams, events and primary-context references still live.
 */
#define _GNU_SOURCE /* dladdr */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mock_cuda.h"

#define API __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct mock_module *CUmodule;
typedef struct mock_function *CUfunction;
typedef struct mock_stream *CUstream;
typedef struct mock_event *CUevent;
typedef struct mock_context *CUcontext;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    NO_BINARY_FOR_GPU = 209,
    INVALID_PTX = 218,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_FAILED = 719,
    UNKNOWN = 999,
};

static const struct {
    int code;
    const char *name, *text;
} errors[] = {
    {SUCCESS, "CUDA_SUCCESS", "no error"},
    {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {NO_BINARY_FOR_GPU, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {INVALID_PTX, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

/* ------------------------------------------------------------------ state */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

typedef struct block {
    CUdeviceptr base;
    size_t size;
    struct block *next;
} block;
static block *blocks; /* live "device" allocations */

struct mock_stream { int magic; };
struct mock_event { int magic; int recorded; double seconds; };
struct mock_context { int magic; };
struct mock_function {
    const kiln_mock_kernel *k;
};
struct mock_module {
    void *kernels_lib; /* the cuda-sim library */
    const kiln_mock_kernel *table;
    int n;
    struct mock_function *functions; /* one per kernel of the table, owned by the module */
    int cubin;
    const char *image;
    size_t image_size;
};

#define MAGIC 0x6b696c6e
static struct mock_context primary = {MAGIC};
static int initialized, primary_refs, live_modules, live_streams, live_events;
static __thread int context_depth; /* contexts pushed on this thread */

#define MAX_NAMES 64
static struct {
    char name[48];
    long calls;
} counters[MAX_NAMES];

__attribute__((format(printf, 1, 2))) static void complain(const char *format, ...) {
    char line[512];
    va_list ap;
    va_start(ap, format);
    vsnprintf(line, sizeof line, format, ap);
    va_end(ap);
    fprintf(stderr, "mock_cuda: %s\n", line);
}

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

static CUresult typical_failure(const char *fn) {
    if (!strcmp(fn, "cuMemAlloc_v2")) return OUT_OF_MEMORY;
    if (!strcmp(fn, "cuModuleLoadDataEx")) return INVALID_PTX;
    if (!strcmp(fn, "cuLaunchKernel")) return LAUNCH_FAILED;
    if (!strcmp(fn, "cuStreamSynchronize")) return ILLEGAL_ADDRESS;
    if (!strncmp(fn, "cuMemcpy", 8) || !strncmp(fn, "cuMemset", 8)) return ILLEGAL_ADDRESS;
    if (!strcmp(fn, "cuInit")) return NO_DEVICE;
    return UNKNOWN;
}

/* Counts the call, and says whether KILN_MOCK_FAIL wants it to fail (with which code). */
static CUresult injected(const char *fn) {
    long count = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_NAMES; i++) {
        if (!counters[i].name[0]) snprintf(counters[i].name, sizeof counters[i].name, "%s", fn);
        if (!strcmp(counters[i].name, fn)) {
            count = ++counters[i].calls;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    const char *spec = getenv("KILN_MOCK_FAIL");
    if (!spec || !*spec) return SUCCESS;
    size_t len = strlen(fn);
    for (const char *p = spec; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        if (strncmp(p, fn, len) != 0 || (p[len] && !strchr(",@=", p[len]))) continue;
        const char *q = p + len;
        if (*q == '@') {
            char *end;
            long nth = strtol(q + 1, &end, 10);
            q = end;
            if (nth != count) continue;
        }
        return *q == '=' ? (CUresult)atoi(q + 1) : typical_failure(fn);
    }
    return SUCCESS;
}

#define ENTER(fn)                                  \
    do {                                           \
        CUresult injected_ = injected(fn);         \
        if (injected_) return injected_;           \
    } while (0)

#define NEED_CONTEXT(fn)                                                   \
    do {                                                                   \
        if (!initialized) return NOT_INITIALIZED;                          \
        if (context_depth <= 0) {                                          \
            complain("%s called with no current context", fn);       \
            return INVALID_CONTEXT;                                        \
        }                                                                  \
    } while (0)

/* Whether [ptr, ptr + bytes) lies inside one live allocation. */
static int inside(CUdeviceptr ptr, size_t bytes) {
    int ok = 0;
    pthread_mutex_lock(&lock);
    for (block *b = blocks; b && !ok; b = b->next)
        ok = ptr >= b->base && ptr - b->base <= b->size && bytes <= b->size - (ptr - b->base);
    pthread_mutex_unlock(&lock);
    return ok;
}

static CUresult check_range(const char *fn, CUdeviceptr ptr, size_t bytes) {
    if (inside(ptr, bytes)) return SUCCESS;
    complain("%s: [0x%llx, +%zu) is outside every device allocation", fn, ptr, bytes);
    return INVALID_VALUE;
}

static int valid_stream(CUstream s) { return !s || s->magic == MAGIC; }

/* ------------------------------------------------------------------ introspection */
API long kiln_mock_calls(const char *fn) {
    long n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_NAMES; i++)
        if (!strcmp(counters[i].name, fn)) n = counters[i].calls;
    pthread_mutex_unlock(&lock);
    return n;
}

/* Allocations, modules, streams, events and primary-context references still live. */
API int kiln_mock_live(void) {
    int n = 0;
    pthread_mutex_lock(&lock);
    for (block *b = blocks; b; b = b->next) n++;
    n += live_modules + live_streams + live_events + primary_refs;
    pthread_mutex_unlock(&lock);
    return n;
}

/* With KILN_MOCK_CHECK_EXIT=1, what is still live when the process exits is reported. */
__attribute__((destructor)) static void report_leaks(void) {
    if (env_int("KILN_MOCK_CHECK_EXIT", 0) != 1) return;
    int live = kiln_mock_live();
    if (live) complain("%d driver objects still live at exit", live);
}

/* ------------------------------------------------------------------ errors, devices, contexts */
API CUresult cuGetErrorName(CUresult e, const char **name) {
    for (size_t i = 0; i < sizeof errors / sizeof *errors; i++)
        if (errors[i].code == e) return *name = errors[i].name, SUCCESS;
    *name = NULL;
    return INVALID_VALUE;
}

API CUresult cuGetErrorString(CUresult e, const char **text) {
    for (size_t i = 0; i < sizeof errors / sizeof *errors; i++)
        if (errors[i].code == e) return *text = errors[i].text, SUCCESS;
    *text = NULL;
    return INVALID_VALUE;
}

API CUresult cuInit(unsigned flags) {
    ENTER("cuInit");
    if (flags) return INVALID_VALUE;
    if (env_int("KILN_MOCK_DEVICES", 1) <= 0) return NO_DEVICE;
    initialized = 1;
    return SUCCESS;
}

API CUresult cuDriverGetVersion(int *version) {
    ENTER("cuDriverGetVersion");
    *version = 12080;
    return SUCCESS;
}

API CUresult cuDeviceGetCount(int *count) {
    ENTER("cuDeviceGetCount");
    if (!initialized) return NOT_INITIALIZED;
    *count = env_int("KILN_MOCK_DEVICES", 1);
    return SUCCESS;
}

API CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    ENTER("cuDeviceGet");
    if (!initialized) return NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= env_int("KILN_MOCK_DEVICES", 1)) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

API CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    ENTER("cuDeviceGetName");
    if (device < 0 || device >= env_int("KILN_MOCK_DEVICES", 1)) return INVALID_DEVICE;
    snprintf(name, (size_t)len, "Kiln mock GPU");
    return SUCCESS;
}

API CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    ENTER("cuDeviceGetAttribute");
    if (device < 0 || device >= env_int("KILN_MOCK_DEVICES", 1)) return INVALID_DEVICE;
    int cc = env_int("KILN_MOCK_CC", 80);
    if (attribute == 75) *value = cc / 10;
    else if (attribute == 76) *value = cc % 10;
    else return INVALID_VALUE;
    return SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
    ENTER("cuDeviceTotalMem_v2");
    if (device < 0 || device >= env_int("KILN_MOCK_DEVICES", 1)) return INVALID_DEVICE;
    *bytes = (size_t)16 << 30;
    return SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) {
    ENTER("cuDevicePrimaryCtxRetain");
    if (!initialized) return NOT_INITIALIZED;
    if (device < 0 || device >= env_int("KILN_MOCK_DEVICES", 1)) return INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    primary_refs++;
    pthread_mutex_unlock(&lock);
    *ctx = &primary;
    return SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    ENTER("cuDevicePrimaryCtxRelease_v2");
    (void)device;
    CUresult r = SUCCESS;
    pthread_mutex_lock(&lock);
    if (primary_refs > 0) primary_refs--;
    else r = INVALID_CONTEXT;
    pthread_mutex_unlock(&lock);
    if (r) complain("cuDevicePrimaryCtxRelease_v2: the primary context was not retained");
    return r;
}

API CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    ENTER("cuCtxPushCurrent_v2");
    if (ctx != &primary) return INVALID_CONTEXT;
    context_depth++;
    return SUCCESS;
}

API CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
    ENTER("cuCtxPopCurrent_v2");
    if (context_depth <= 0) {
        complain("cuCtxPopCurrent_v2: no context is current");
        return INVALID_CONTEXT;
    }
    context_depth--;
    if (ctx) *ctx = &primary;
    return SUCCESS;
}

/* ------------------------------------------------------------------ modules */
static void jit_log(unsigned n, const int *options, void **values, const char *message) {
    char *buf = NULL;
    size_t size = 0;
    for (unsigned i = 0; i < n; i++) {
        if (options[i] == 5) buf = values[i];
        if (options[i] == 6) size = (size_t)(uintptr_t)values[i];
    }
    if (buf && size) snprintf(buf, size, "%s", message);
}

/* A cubin's architecture from its ELF header (e_flags: bits 8-15 from ELF ABI version 8 on, else 0-7). */
static int cubin_sm(const unsigned char *elf) {
    uint32_t flags;
    memcpy(&flags, elf + 48, 4);
    return elf[8] >= 8 ? (int)(flags >> 8 & 0xff) : (int)(flags & 0xff);
}

/* The kernel table for an image, into `table` ("" for none): KILN_MOCK_KERNELS itself,
 * or from its LIB=TABLE pairs the one whose LIB holds the image (found with dladdr). */
static int kernels_for(const void *image, char *table, size_t n) {
    const char *spec = getenv("KILN_MOCK_KERNELS");
    table[0] = 0;
    if (!spec || !*spec) return 0;
    if (!strchr(spec, '=')) {
        snprintf(table, n, "%s", spec);
        return 0;
    }
    Dl_info info;
    char lib[PATH_MAX], entry[PATH_MAX], wanted[PATH_MAX];
    if (!dladdr(image, &info) || !info.dli_fname || !realpath(info.dli_fname, lib)) {
        complain("cannot tell which library holds the image at %p (dladdr)", image);
        return 1;
    }
    for (const char *p = spec; p && *p; p = strchr(p, ':') ? strchr(p, ':') + 1 : NULL) {
        size_t len = strchr(p, ':') ? (size_t)(strchr(p, ':') - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        if (!eq || len >= sizeof entry) continue;
        snprintf(entry, (size_t)(eq - p) + 1, "%s", p);
        if (realpath(entry, wanted) && !strcmp(wanted, lib)) {
            snprintf(table, n, "%.*s", (int)(len - (size_t)(eq + 1 - p)), eq + 1);
            return 0;
        }
    }
    complain("KILN_MOCK_KERNELS names no kernel table for %s", lib);
    return 1;
}

API CUresult cuModuleLoadDataEx(CUmodule *module, const void *image, unsigned n, int *options, void **values) {
    NEED_CONTEXT("cuModuleLoadDataEx");
    CUresult r = injected("cuModuleLoadDataEx");
    if (r) {
        jit_log(n, options, values, "ptxas fatal   : the mock driver was told to fail (KILN_MOCK_FAIL)");
        return r;
    }
    int cc = env_int("KILN_MOCK_CC", 80);
    const unsigned char *bytes = image;
    struct mock_module m = {0};
    if (!memcmp(bytes, "\177ELF", 4)) {
        int sm = cubin_sm(bytes);
        if (sm / 10 != cc / 10 || sm % 10 > cc % 10) return NO_BINARY_FOR_GPU;
        uint64_t shoff;
        uint16_t shentsize, shnum;
        memcpy(&shoff, bytes + 40, 8);
        memcpy(&shentsize, bytes + 58, 2);
        memcpy(&shnum, bytes + 60, 2);
        m.cubin = 1;
        m.image_size = shoff + (size_t)shentsize * shnum;
    } else {
        const char *text = image, *target = strstr(text, ".target sm_");
        if (!target || !strstr(text, ".version")) return INVALID_IMAGE;
        if (atoi(target + 11) > cc) {
            jit_log(n, options, values, "ptxas fatal   : SM version specified by .target is higher than default");
            return INVALID_PTX;
        }
        m.image_size = strlen(text);
    }
    m.image = image;
    char table[PATH_MAX];
    const char *path = NULL;
    if (kernels_for(image, table, sizeof table)) return INVALID_IMAGE;
    if (table[0]) path = table;
    if (path) {
        if (!(m.kernels_lib = dlopen(path, RTLD_NOW | RTLD_LOCAL))) {
            complain("cannot load KILN_MOCK_KERNELS=%s: %s", path, dlerror());
            return INVALID_IMAGE;
        }
        m.table = dlsym(m.kernels_lib, "kiln_mock_kernels");
        const int *count = dlsym(m.kernels_lib, "kiln_mock_num_kernels");
        if (!m.table || !count) {
            complain("%s has no kiln_mock_kernels table", path);
            dlclose(m.kernels_lib);
            return INVALID_IMAGE;
        }
        m.n = *count;
    }
    m.functions = calloc((size_t)m.n + 1, sizeof *m.functions);
    if (!m.functions || !(*module = malloc(sizeof m))) {
        free(m.functions);
        if (m.kernels_lib) dlclose(m.kernels_lib);
        return OUT_OF_MEMORY;
    }
    for (int i = 0; i < m.n; i++) m.functions[i].k = &m.table[i];
    **module = m;
    pthread_mutex_lock(&lock);
    live_modules++;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

API CUresult cuModuleUnload(CUmodule module) {
    NEED_CONTEXT("cuModuleUnload");
    ENTER("cuModuleUnload");
    if (!module) return INVALID_HANDLE;
    if (module->kernels_lib) dlclose(module->kernels_lib);
    free(module->functions);
    free(module);
    pthread_mutex_lock(&lock);
    live_modules--;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

/* Whether the image has an entry point `name`. */
static int image_has(const CUmodule m, const char *name) {
    size_t len = strlen(name);
    if (!m->cubin) {
        for (const char *p = m->image; (p = strstr(p, ".entry ")); p += 7)
            if (!strncmp(p + 7, name, len) && p[7 + len] == '(') return 1;
        return 0;
    }
    for (size_t i = 1; i + len < m->image_size; i++)  /* a NUL-delimited string of the ELF */
        if (m->image[i - 1] == 0 && !memcmp(m->image + i, name, len + 1)) return 1;
    return 0;
}

API CUresult cuModuleGetFunction(CUfunction *fn, CUmodule module, const char *name) {
    NEED_CONTEXT("cuModuleGetFunction");
    ENTER("cuModuleGetFunction");
    if (!module) return INVALID_HANDLE;
    if (!image_has(module, name)) return NOT_FOUND;
    for (int i = 0; i < module->n; i++)
        if (!strcmp(module->table[i].name, name)) {
            *fn = &module->functions[i];
            return SUCCESS;
        }
    complain("kernel %s is in the image but not in KILN_MOCK_KERNELS", name);
    return NOT_FOUND;
}

/* ------------------------------------------------------------------ memory */
API CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes) {
    NEED_CONTEXT("cuMemAlloc_v2");
    ENTER("cuMemAlloc_v2");
    if (!bytes) return INVALID_VALUE;
    block *b = malloc(sizeof *b);
    void *mem = aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (!b || !mem) {
        free(b);
        free(mem);
        return OUT_OF_MEMORY;
    }
    b->base = (CUdeviceptr)(uintptr_t)mem;
    b->size = bytes;
    pthread_mutex_lock(&lock);
    b->next = blocks;
    blocks = b;
    pthread_mutex_unlock(&lock);
    *ptr = b->base;
    return SUCCESS;
}

API CUresult cuMemFree_v2(CUdeviceptr ptr) {
    NEED_CONTEXT("cuMemFree_v2");
    ENTER("cuMemFree_v2");
    block *found = NULL;
    pthread_mutex_lock(&lock);
    for (block **b = &blocks; *b; b = &(*b)->next)
        if ((*b)->base == ptr) {
            found = *b;
            *b = found->next;
            break;
        }
    pthread_mutex_unlock(&lock);
    if (!found) {
        complain("cuMemFree_v2: 0x%llx is not an allocation", ptr);
        return INVALID_VALUE;
    }
    free((void *)(uintptr_t)found->base);
    free(found);
    return SUCCESS;
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t bytes) {
    NEED_CONTEXT("cuMemcpyHtoD_v2");
    ENTER("cuMemcpyHtoD_v2");
    CUresult r = check_range("cuMemcpyHtoD_v2", dst, bytes);
    if (!r) memcpy((void *)(uintptr_t)dst, src, bytes);
    return r;
}

API CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t bytes) {
    NEED_CONTEXT("cuMemcpyDtoH_v2");
    ENTER("cuMemcpyDtoH_v2");
    CUresult r = check_range("cuMemcpyDtoH_v2", src, bytes);
    if (!r) memcpy(dst, (const void *)(uintptr_t)src, bytes);
    return r;
}

API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    NEED_CONTEXT("cuMemcpyDtoD_v2");
    ENTER("cuMemcpyDtoD_v2");
    CUresult r = check_range("cuMemcpyDtoD_v2", dst, bytes);
    if (!r) r = check_range("cuMemcpyDtoD_v2", src, bytes);
    if (!r) memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, bytes);
    return r;
}

API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t bytes, CUstream s) {
    NEED_CONTEXT("cuMemcpyHtoDAsync_v2");
    ENTER("cuMemcpyHtoDAsync_v2");
    if (!valid_stream(s)) return INVALID_HANDLE;
    CUresult r = check_range("cuMemcpyHtoDAsync_v2", dst, bytes);
    if (!r) memcpy((void *)(uintptr_t)dst, src, bytes);
    return r;
}

API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t bytes, CUstream s) {
    NEED_CONTEXT("cuMemcpyDtoHAsync_v2");
    ENTER("cuMemcpyDtoHAsync_v2");
    if (!valid_stream(s)) return INVALID_HANDLE;
    CUresult r = check_range("cuMemcpyDtoHAsync_v2", src, bytes);
    if (!r) memcpy(dst, (const void *)(uintptr_t)src, bytes);
    return r;
}

API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t count, CUstream s) {
    NEED_CONTEXT("cuMemsetD32Async");
    ENTER("cuMemsetD32Async");
    if (!valid_stream(s)) return INVALID_HANDLE;
    CUresult r = check_range("cuMemsetD32Async", dst, 4 * count);
    for (size_t i = 0; !r && i < count; i++) ((uint32_t *)(uintptr_t)dst)[i] = value;
    return r;
}

/* ------------------------------------------------------------------ streams, events */
API CUresult cuStreamCreate(CUstream *s, unsigned flags) {
    NEED_CONTEXT("cuStreamCreate");
    ENTER("cuStreamCreate");
    (void)flags;
    if (!(*s = malloc(sizeof **s))) return OUT_OF_MEMORY;
    (*s)->magic = MAGIC;
    pthread_mutex_lock(&lock);
    live_streams++;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

API CUresult cuStreamDestroy_v2(CUstream s) {
    NEED_CONTEXT("cuStreamDestroy_v2");
    ENTER("cuStreamDestroy_v2");
    if (!s || s->magic != MAGIC) return INVALID_HANDLE;
    s->magic = 0;
    free(s);
    pthread_mutex_lock(&lock);
    live_streams--;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

API CUresult cuCtxSynchronize(void) {
    NEED_CONTEXT("cuCtxSynchronize");
    ENTER("cuCtxSynchronize");
    return SUCCESS;
}

API CUresult cuStreamSynchronize(CUstream s) {
    NEED_CONTEXT("cuStreamSynchronize");
    ENTER("cuStreamSynchronize");
    return valid_stream(s) ? SUCCESS : INVALID_HANDLE;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

API CUresult cuEventCreate(CUevent *e, unsigned flags) {
    NEED_CONTEXT("cuEventCreate");
    ENTER("cuEventCreate");
    (void)flags;
    if (!(*e = calloc(1, sizeof **e))) return OUT_OF_MEMORY;
    (*e)->magic = MAGIC;
    pthread_mutex_lock(&lock);
    live_events++;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

API CUresult cuEventRecord(CUevent e, CUstream s) {
    NEED_CONTEXT("cuEventRecord");
    ENTER("cuEventRecord");
    if (!e || e->magic != MAGIC || !valid_stream(s)) return INVALID_HANDLE;
    e->recorded = 1;
    e->seconds = now();
    return SUCCESS;
}

API CUresult cuEventElapsedTime(float *ms, CUevent start, CUevent end) {
    NEED_CONTEXT("cuEventElapsedTime");
    ENTER("cuEventElapsedTime");
    if (!start || !end || start->magic != MAGIC || end->magic != MAGIC) return INVALID_HANDLE;
    if (!start->recorded || !end->recorded) return INVALID_HANDLE;
    *ms = (float)(1e3 * (end->seconds - start->seconds));
    return SUCCESS;
}

API CUresult cuEventSynchronize(CUevent e) {
    NEED_CONTEXT("cuEventSynchronize");
    ENTER("cuEventSynchronize");
    return e && e->magic == MAGIC ? SUCCESS : INVALID_HANDLE;
}

API CUresult cuEventDestroy_v2(CUevent e) {
    NEED_CONTEXT("cuEventDestroy_v2");
    ENTER("cuEventDestroy_v2");
    if (!e || e->magic != MAGIC) return INVALID_HANDLE;
    e->magic = 0;
    free(e);
    pthread_mutex_lock(&lock);
    live_events--;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

/* ------------------------------------------------------------------ launches */
typedef struct slice {
    const kiln_mock_kernel *k;
    void *const *bufs;
    int64_t begin, end;
} slice;

static void *run_slice(void *arg) {
    slice *s = arg;
    if (s->begin < s->end) s->k->fn(s->bufs, s->begin, s->end);
    return NULL;
}

/* Every block of the grid, split across KILN_MOCK_THREADS threads (default: the CPUs):
 * a GPU runs blocks in any order and at once, and the simulated kernel runs any range
 * of blocks, so the split changes nothing but the time. */
static void run_blocks(const kiln_mock_kernel *k, void *const *bufs, int64_t blocks) {
    enum { MAX_THREADS = 64 };
    int n = env_int("KILN_MOCK_THREADS", (int)sysconf(_SC_NPROCESSORS_ONLN));
    n = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
    if (n > blocks) n = (int)blocks;
    slice slices[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < n; t++) {
        slices[t] = (slice){k, bufs, blocks * t / n, blocks * (t + 1) / n};
        if (t > 0) started[t] = pthread_create(&threads[t], NULL, run_slice, &slices[t]) == 0;
        if (t > 0 && !started[t]) run_slice(&slices[t]);
    }
    if (n > 0) run_slice(&slices[0]);
    for (int t = 1; t < n; t++)
        if (started[t]) pthread_join(threads[t], NULL);
}

API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned shared, CUstream s, void **params, void **extra) {
    NEED_CONTEXT("cuLaunchKernel");
    ENTER("cuLaunchKernel");
    if (!f || !valid_stream(s)) return INVALID_HANDLE;
    const kiln_mock_kernel *k = f->k;
    unsigned got[6] = {gx, gy, gz, bx, by, bz};
    for (int i = 0; i < 6; i++)
        if (got[i] != (i < 3 ? k->grid[i] : k->block[i - 3])) {
            complain("kernel %s launched with grid (%u, %u, %u), block (%u, %u, %u); it was scheduled for "
                     "(%u, %u, %u), (%u, %u, %u)", k->name, gx, gy, gz, bx, by, bz, k->grid[0], k->grid[1],
                     k->grid[2], k->block[0], k->block[1], k->block[2]);
            return INVALID_VALUE;
        }
    if (shared || extra || (k->nparams && !params)) {
        complain("kernel %s: unexpected dynamic shared memory, extra or missing params", k->name);
        return INVALID_VALUE;
    }
    void *bufs[64];
    if (k->nparams > 64) return INVALID_VALUE;
    for (int i = 0; i < k->nparams; i++) {
        CUdeviceptr p;
        memcpy(&p, params[i], sizeof p);
        if (!inside(p, (size_t)k->param_bytes[i])) {
            complain("kernel %s: argument %d ([0x%llx, +%lld)) is outside every device allocation", k->name, i, p,
                     (long long)k->param_bytes[i]);
            return ILLEGAL_ADDRESS;
        }
        bufs[i] = (void *)(uintptr_t)p;
    }
    run_blocks(k, bufs, (int64_t)gx * gy * gz);
    return SUCCESS;
}
