/* Why the calling thread's last call of a function with no instance to keep a message
 * in (NAME_create, NAME_trainer_create) failed, for NAME_last_error(NULL) to read.
 * Thread-specific data rather than __thread, which would make the library depend on
 * the dynamic loader; the key's destructor is libc's free, so it stays valid after the
 * library is unloaded. Each C file that includes this has its own message. */
#ifndef KILN_THREAD_ERROR_H
#define KILN_THREAD_ERROR_H

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static pthread_key_t kiln_thread_error_key;
static pthread_once_t kiln_thread_error_once = PTHREAD_ONCE_INIT;
static int kiln_thread_error_ok;

static void kiln_thread_error_init(void) {
    kiln_thread_error_ok = pthread_key_create(&kiln_thread_error_key, free) == 0;
}

/* Keep the message (printf-style) for this thread; returns 1, the failure status. */
__attribute__((format(printf, 1, 2), unused)) static int kiln_thread_failed(const char *format, ...) {
    pthread_once(&kiln_thread_error_once, kiln_thread_error_init);
    char *buf = kiln_thread_error_ok ? pthread_getspecific(kiln_thread_error_key) : NULL;
    if (kiln_thread_error_ok && !buf && (buf = malloc(1024)) &&
        pthread_setspecific(kiln_thread_error_key, buf) != 0) {
        free(buf);
        buf = NULL;
    }
    if (buf) {
        va_list ap;
        va_start(ap, format);
        vsnprintf(buf, 1024, format, ap);
        va_end(ap);
    }
    return 1;
}

/* This thread's last message, or NULL when it has none. */
__attribute__((unused)) static const char *kiln_thread_error(void) {
    pthread_once(&kiln_thread_error_once, kiln_thread_error_init);
    return kiln_thread_error_ok ? pthread_getspecific(kiln_thread_error_key) : NULL;
}

#endif
