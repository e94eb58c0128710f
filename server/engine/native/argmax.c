/* The greedy token of each row of float32 logits (sampler.py calls it; c_kernels.py builds it).
 *
 * Written by hand because torch's CPU argmax runs one element at a time: 0.7-1.3 ms for 32 rows of the
 * bundled model's 49k logits, a few per cent of a decode step; this takes 0.06 ms. Each row: its maximum,
 * then the first index that holds it, both in vectors. As torch's argmax: a NaN counts as the largest value
 * (the first NaN wins), and a row of -inf gives 0.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static int64_t argmax_row(const float *x, int cols) {
    float top = -INFINITY;
    int nan = 0, c = 0;
#ifdef __AVX512F__
    __m512 best = _mm512_set1_ps(-INFINITY);
    __mmask16 unordered = 0;
    for (; c + 16 <= cols; c += 16) {
        const __m512 v = _mm512_loadu_ps(x + c);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(best, v);
    }
    nan = unordered != 0;
    top = _mm512_reduce_max_ps(best);
#endif
    for (; c < cols; c++) {
        if (x[c] != x[c]) nan = 1;
        else if (x[c] > top) top = x[c];
    }
    c = 0;
#ifdef __AVX512F__
    const __m512 wanted = _mm512_set1_ps(top);
    for (; c + 16 <= cols; c += 16) {
        const __m512 v = _mm512_loadu_ps(x + c);
        const __mmask16 found = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, wanted, _CMP_EQ_OQ);
        if (found) return c + __builtin_ctz(found);
    }
#endif
    for (; c < cols; c++)
        if (nan ? x[c] != x[c] : x[c] == top) return c;
    return 0;
}

/* out[r] = the index of the largest of logits[r, :cols], rows `row_stride` floats apart. */
void argmax_rows(const float *logits, int64_t row_stride, int rows, int cols, int64_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int r = 0; r < rows; r++) out[r] = argmax_row(logits + (int64_t)r * row_stride, cols);
}
