/* A generic C program for any Kiln model: reads each input from a raw binary file,
 * runs the model, writes each output to a raw binary file. Built against the model's
 * header with -DMODEL=<prefix> -DMODEL_HEADER='"<prefix>.h"'; it sizes every buffer
 * from the library's own metadata.
 *
 *   usage: runner in_0.bin ... in_{n-1}.bin out_0.bin ... out_{m-1}.bin
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include MODEL_HEADER

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define API(x) CAT(MODEL, x)

static size_t dtype_size(const char *dtype) {
    if (!strcmp(dtype, "float64") || !strcmp(dtype, "int64")) return 8;
    if (!strcmp(dtype, "float32") || !strcmp(dtype, "int32")) return 4;
    return 1; /* bool */
}

static size_t tensor_bytes(const char *dtype, int rank, const int64_t *shape) {
    size_t n = dtype_size(dtype);
    for (int d = 0; d < rank; d++) n *= (size_t)shape[d];
    return n;
}

int main(int argc, char **argv) {
    int ni = API(num_inputs)(), no = API(num_outputs)();
    if (argc != 1 + ni + no) {
        fprintf(stderr, "usage: %s <%d input files> <%d output files>\n", argv[0], ni, no);
        return 2;
    }
    void **ins = calloc(ni + 1, sizeof *ins), **outs = calloc(no + 1, sizeof *outs);
    size_t *out_bytes = calloc(no + 1, sizeof *out_bytes);
    int status = 1;
    API(model) *m = NULL;
    for (int i = 0; i < ni; i++) {
        size_t bytes = tensor_bytes(API(input_dtype)(i), API(input_rank)(i), API(input_shape)(i));
        FILE *f = fopen(argv[1 + i], "rb");
        if (!f) { fprintf(stderr, "cannot open %s\n", argv[1 + i]); goto done; }
        ins[i] = malloc(bytes ? bytes : 1);
        size_t got = fread(ins[i], 1, bytes, f);
        fclose(f);
        if (got != bytes) {
            fprintf(stderr, "%s: expected %zu bytes for input %s, got %zu\n", argv[1 + i], bytes,
                    API(input_name)(i), got);
            goto done;
        }
    }
    for (int o = 0; o < no; o++) {
        out_bytes[o] = tensor_bytes(API(output_dtype)(o), API(output_rank)(o), API(output_shape)(o));
        outs[o] = malloc(out_bytes[o] ? out_bytes[o] : 1);
    }
    if (API(create)(&m) != 0) { fprintf(stderr, "create failed: %s\n", API(last_error)(m)); goto done; }
    if (API(run)(m, (const void *const *)ins, outs) != 0) {
        fprintf(stderr, "run failed: %s\n", API(last_error)(m));
        goto done;
    }
    for (int o = 0; o < no; o++) {
        FILE *f = fopen(argv[1 + ni + o], "wb");
        if (!f || fwrite(outs[o], 1, out_bytes[o], f) != out_bytes[o]) {
            fprintf(stderr, "cannot write %s\n", argv[1 + ni + o]);
            if (f) fclose(f);
            goto done;
        }
        fclose(f);
    }
    status = 0;
done:
    API(destroy)(m);
    for (int i = 0; i < ni; i++) free(ins[i]);
    for (int o = 0; o < no; o++) free(outs[o]);
    free(ins);
    free(outs);
    free(out_bytes);
    return status;
}
