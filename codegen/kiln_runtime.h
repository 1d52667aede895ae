/* Kiln's native runtime support, compiled into every model library.
 *
 * Everything here is static, so two Kiln models link into one program without
 * clashing. It holds the thread pool that runs a kernel's parallel loop across
 * cores: the calling thread takes the first slice and the pool's workers the
 * rest, split evenly. No dependency beyond libc and pthreads. */
#ifndef KILN_RUNTIME_H
#define KILN_RUNTIME_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define KILN_MAX_THREADS 256

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
    uint64_t generation;
    int pending, stop;
    kiln_kernel fn;
    void *const *bufs;
    int64_t n;
} kiln_pool;

typedef struct kiln_worker_arg {
    kiln_pool *pool;
    int index;
} kiln_worker_arg;

static void kiln_run_slice(kiln_pool *p, int t) {
    int64_t begin = p->n * t / p->nthreads, end = p->n * (t + 1) / p->nthreads;
    if (begin < end) p->fn(p->bufs, begin, end);
}

static void *kiln_worker(void *arg) {
    kiln_worker_arg a = *(kiln_worker_arg *)arg;
    free(arg);
    kiln_pool *p = a.pool;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->generation == seen && !p->stop) pthread_cond_wait(&p->wake, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        kiln_run_slice(p, a.index);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
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
        if (pthread_create(&p->workers[t], NULL, kiln_worker, arg) != 0) {
            free(arg);
            break;
        }
        p->nthreads = t + 1;
    }
    return 0;
}

static void kiln_pool_destroy(kiln_pool *p) {
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int t = 1; t < p->nthreads; t++) pthread_join(p->workers[t], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
}

/* Runs fn over [0, n): in slices across the pool when `parallel`, else in one call. */
static void kiln_launch(kiln_pool *p, kiln_kernel fn, void *const *bufs, int64_t n, int parallel) {
    if (!parallel || p->nthreads == 1 || n < 2) {
        fn(bufs, 0, n);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->bufs = bufs;
    p->n = n;
    p->pending = p->nthreads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    kiln_run_slice(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

#endif
