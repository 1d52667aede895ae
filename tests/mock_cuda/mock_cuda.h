/* The table of kernels a cuda-sim library built for the mock driver exports: each GPU
 * kernel's name (as in the PTX), its CPU entry point (which runs blocks [begin, end) of
 * the grid), the grid and block it was scheduled for, and the bytes of each of its
 * buffer arguments. tests/mock_cuda/__init__.py writes it; mock_cuda.c reads it. */
#ifndef KILN_MOCK_CUDA_H
#define KILN_MOCK_CUDA_H

#include <stdint.h>

typedef struct kiln_mock_kernel {
    const char *name;
    void (*fn)(void *const *bufs, int64_t begin, int64_t end);
    unsigned grid[3], block[3];
    int nparams;
    const int64_t *param_bytes;
} kiln_mock_kernel;

#endif
