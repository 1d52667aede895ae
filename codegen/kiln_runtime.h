/* Kiln's native runtime support, compiled into every model library.
 *
 * Everything here is static, so two Kiln models link into one program without
 * clashing. It holds the thread pool that runs a kernel's parallel loop across
 * cores: the calling thread takes the first slice and the pool's workers the
 * rest, split evenly. Idle threads spin briefly before they sleep (see
 * KILN_SPIN_SECONDS). No dependency beyond libc and pthreads. */
#ifndef KILN_RUNTIME_H
#define KILN_RUNTIME_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define KILN_MAX_THREADS 256
/* Workers' stacks at least this large: kernels keep scratch tiles on them. */
#define KILN_WORKER_STACK ((size_t)8 << 20)
/* Room a caller's stack keeps beyond the kernels' scratch, for the frames around them. */
#define KILN_STACK_SPARE ((size_t)256 << 10)

int pthread_getattr_np(pthread_t thread, pthread_attr_t *attr); /* glibc's, declared here
                                                                    without _GNU_SOURCE */

/* The stack size of the thread that last called, kept per model instance: reading
   it (pthread_getattr_np) costs a parse of /proc/self/maps on the main thread, and a
   thread-local cache would make the library depend on the dynamic loader. */
typedef struct kiln_stack_cache {
    pthread_t thread;
    size_t size; /* bytes; 0: unknown */
    int known;
} kiln_stack_cache;

/* This thread's stack size in bytes (0: unknown). */
static size_t kiln_thread_stack(kiln_stack_cache *c) {
    pthread_t self = pthread_self();
    if (c->known && pthread_equal(c->thread, self)) return c->size;
    pthread_attr_t attr;
    void *base;
    size_t size = 0;
    if (pthread_getattr_np(self, &attr) == 0) {
        if (pthread_attr_getstack(&attr, &base, &size) != 0) size = 0;
        pthread_attr_destroy(&attr);
    }
    c->thread = self;
    c->size = size;
    c->known = 1;
    return size;
}

/* Whether this thread's stack holds `scratch` bytes of kernel scratch with room to
   spare (an unknown size passes). */
static int kiln_stack_suffices(kiln_stack_cache *c, size_t scratch) {
    size_t size = kiln_thread_stack(c);
    return size == 0 || size >= scratch + KILN_STACK_SPARE;
}

/* Arenas this large or larger are aligned to it and asked for huge pages, where the OS
   gives them on request (Linux's transparent huge pages in `madvise` mode): a kernel
   that streams a large intermediate then needs a TLB entry per 2 MiB rather than per
   4 KiB (an LSTM whose 8 MB input projection one kernel writes and the next reads ran
   3.5% faster, ResNet-18 at batch 32 2%). */
#define KILN_HUGE_PAGE ((size_t)2 << 20)

/* At least `bytes` bytes aligned to `align` (a power of two) or to a huge page; NULL
   when out of memory. The advice is a hint: where it fails the pages stay small. */
static void *kiln_alloc_arena(size_t bytes, size_t align) {
    if (bytes >= KILN_HUGE_PAGE) align = KILN_HUGE_PAGE;
    size_t rounded = (bytes + align - 1) / align * align;
    void *arena = aligned_alloc(align, rounded);
#ifdef MADV_HUGEPAGE
    if (arena && align == KILN_HUGE_PAGE) madvise(arena, rounded, MADV_HUGEPAGE);
#endif
    return arena;
}

static double kiln_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef void (*kiln_kernel)(void *const *bufs, int64_t begin, int64_t end);

typedef struct kiln_pool {
    int nthreads; /* including the caller */
    pthread_t workers[KILN_MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    _Atomic uint64_t generation; /* bumped once per parallel launch */
    _Atomic int pending;         /* workers still running the current launch */
    _Atomic int sleepers;        /* threads blocked on a condition variable */
    _Atomic int stop;
    kiln_kernel fn;
    void *const *bufs;
    int64_t n;
    int reverse; /* each slice's steps last to first */
    /* A team kernel's barrier (codegen/cpu.py): word 0 counts the current round's
     * arrivals, word 8 the rounds completed, each on its own cache line. Zero at
     * start; every launch leaves the arrivals at zero again. */
    _Alignas(64) int64_t team[16];
} kiln_pool;

typedef struct kiln_worker_arg {
    kiln_pool *pool;
    int index;
} kiln_worker_arg;

/* How long an idle thread spins before it sleeps. Waking a sleeping thread costs tens
 * of microseconds on a busy machine, as much as a small kernel takes; kernels come in
 * quick succession within a run, so a short spin catches the next one. */
#define KILN_SPIN_SECONDS 100e-6

static inline void kiln_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Spins, then sleeps, until cond(p, arg) holds. */
static void kiln_wait(kiln_pool *p, pthread_cond_t *cv, int (*cond)(kiln_pool *, uint64_t), uint64_t arg) {
    double start = 0;
    for (unsigned spins = 0; !cond(p, arg); spins++) {
        kiln_relax();
        if ((spins & 255) == 255) {
            double now = kiln_now();
            if (start == 0) start = now;
            if (now - start > KILN_SPIN_SECONDS) {
                pthread_mutex_lock(&p->mu);
                atomic_fetch_add(&p->sleepers, 1);
                while (!cond(p, arg)) pthread_cond_wait(cv, &p->mu);
                atomic_fetch_sub(&p->sleepers, 1);
                pthread_mutex_unlock(&p->mu);
                return;
            }
        }
    }
}

static int kiln_has_work(kiln_pool *p, uint64_t seen) {
    return atomic_load_explicit(&p->generation, memory_order_acquire) != seen || atomic_load(&p->stop);
}

static int kiln_all_done(kiln_pool *p, uint64_t unused) {
    (void)unused;
    return atomic_load_explicit(&p->pending, memory_order_acquire) == 0;
}

/* Wakes whoever sleeps on cv (taking the lock so that no wake-up is lost). */
static void kiln_notify(kiln_pool *p, pthread_cond_t *cv) {
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(cv);
        pthread_mutex_unlock(&p->mu);
    }
}

/* Runs fn over [begin, end): in one call, or with `reverse` one step at a time, last
 * to first (a kernel's steps are independent; see kir.Kernel.alternate_steps). */
static void kiln_run_steps(kiln_kernel fn, void *const *bufs, int64_t begin, int64_t end, int reverse) {
    if (!reverse) {
        fn(bufs, begin, end);
        return;
    }
    for (int64_t i = end - 1; i >= begin; i--) fn(bufs, i, i + 1);
}

static void kiln_run_slice(kiln_pool *p, int t) {
    int64_t begin = p->n * t / p->nthreads, end = p->n * (t + 1) / p->nthreads;
    if (begin < end) kiln_run_steps(p->fn, p->bufs, begin, end, p->reverse);
}

static void *kiln_worker(void *arg) {
    kiln_worker_arg a = *(kiln_worker_arg *)arg;
    free(arg);
    kiln_pool *p = a.pool;
    uint64_t seen = 0;
    for (;;) {
        kiln_wait(p, &p->wake, kiln_has_work, seen);
        if (atomic_load(&p->stop)) break;
        seen = atomic_load_explicit(&p->generation, memory_order_acquire);
        kiln_run_slice(p, a.index);
        if (atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel) == 1) kiln_notify(p, &p->done);
    }
    return NULL;
}

static int kiln_default_threads(void) {
    const char *env = getenv("KILN_NUM_THREADS");
    long n = env ? strtol(env, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > KILN_MAX_THREADS) n = KILN_MAX_THREADS;
    return (int)n;
}

/* Starts nthreads - 1 workers. Returns 0, or -1 with no thread left running. */
static int kiln_pool_init(kiln_pool *p, int nthreads) {
    memset(p, 0, sizeof *p);
    if (nthreads < 1) nthreads = 1;
    if (nthreads > KILN_MAX_THREADS) nthreads = KILN_MAX_THREADS;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    p->nthreads = 1;
    for (int t = 1; t < nthreads; t++) {
        kiln_worker_arg *arg = malloc(sizeof *arg);
        if (!arg) break;
        arg->pool = p;
        arg->index = t;
        pthread_attr_t attr;
        size_t stack = 0;
        pthread_attr_init(&attr);
        if (pthread_attr_getstacksize(&attr, &stack) == 0 && stack < KILN_WORKER_STACK)
            pthread_attr_setstacksize(&attr, KILN_WORKER_STACK);
        int failed = pthread_create(&p->workers[t], &attr, kiln_worker, arg) != 0;
        pthread_attr_destroy(&attr);
        if (failed) {
            free(arg);
            break;
        }
        p->nthreads = t + 1;
    }
    return 0;
}

static void kiln_pool_destroy(kiln_pool *p) {
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int t = 1; t < p->nthreads; t++) pthread_join(p->workers[t], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
}

/* Runs fn over [0, n): in slices across the pool when `parallel`, else in one call;
 * with `reverse`, each slice's steps last to first. */
static void kiln_launch(kiln_pool *p, kiln_kernel fn, void *const *bufs, int64_t n, int parallel, int reverse) {
    if (!parallel || p->nthreads == 1 || n < 2) {
        kiln_run_steps(fn, bufs, 0, n, reverse);
        return;
    }
    p->fn = fn;
    p->bufs = bufs;
    p->n = n;
    p->reverse = reverse;
    atomic_store_explicit(&p->pending, p->nthreads - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release); /* publishes fn, bufs, n */
    kiln_notify(p, &p->wake);
    kiln_run_slice(p, 0);
    kiln_wait(p, &p->done, kiln_all_done, 0);
}

#endif
