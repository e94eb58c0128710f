/* One split over bfloat16 planes with AVX512-BF16 (included by paged_decode.c, which it shares helpers with).
 *
 * The same online softmax as attend_split, with fewer instructions per key: scores by the CPU's bfloat16 dot
 * product (vdpbf16ps: the query was bfloat16, so its pairs are exact; products exact, sums in float32), no key
 * widened into memory; the 16 scores of a block summed across lanes in one butterfly (lane_sums16); values
 * widened in registers, 32 at a time as their even and odd elements (a shift and a mask), and shared by up to
 * four of the group's queries. The running output keeps that even/odd order and is put back in order at the
 * end of the split.
 */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BF16_SPLITS 1

static inline __attribute__((always_inline)) void attend_split_bf16(const Cache *c, const float *q, int row,
                                                                    int head, int a, int b, int dim, float *acc,
                                                                    float *top, float *total) {
    const int group = c->group, pairs = dim / 32;
    __m512bh q_pairs[group * pairs];
    float weights[group][BLOCK];
    for (int i = 0; i < group * pairs; i++)
        q_pairs[i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 32 * i + 16), _mm512_loadu_ps(q + 32 * i));
    for (int g = 0; g < group; g++) {
        top[g] = -INFINITY;
        total[g] = 0.0f;
        for (int d = 0; d < dim; d++) acc[g * dim + d] = 0.0f;
    }
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000u);
    const int64_t head_base = (int64_t)head * c->slots;
    for (int at = a; at < b;) {
        const int offset = at % BLOCK, run = (b - at < BLOCK - offset) ? b - at : BLOCK - offset;
        const int64_t slot = head_base + (int64_t)c->table[row * c->table_width + at / BLOCK] * BLOCK + offset;
        if (at + run < b)
            prefetch_block(c, head_base + (int64_t)c->table[row * c->table_width + (at + run) / BLOCK] * BLOCK, dim);
        const uint16_t *keys = (const uint16_t *)c->keys + slot * dim, *values = (const uint16_t *)c->values + slot * dim;
        const __mmask16 live = (__mmask16)((1u << run) - 1u);  /* the lanes of this run's keys */
        for (int g = 0; g < group; g++) {
            __m512 sums[BLOCK];
            for (int t = 0; t < BLOCK; t++) {
                __m512 sum = _mm512_setzero_ps();
                if (t < run)
                    for (int p = 0; p < pairs; p++)
                        sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(keys + t * dim + 32 * p),
                                               q_pairs[g * pairs + p]);
                sums[t] = sum;
            }
            const __m512 scores = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY),
                                                       _mm512_mul_ps(lane_sums16(sums), _mm512_set1_ps(c->scale)));
            const float best = fmaxf(top[g], _mm512_reduce_max_ps(scores));
            const float shrink = expf(top[g] - best);  /* exp(-inf) = 0 on the first run */
            _mm512_storeu_ps(weights[g], _mm512_sub_ps(scores, _mm512_set1_ps(best)));
            float sum = 0.0f;
            for (int t = 0; t < BLOCK; t++) {
                weights[g][t] = t < run ? exp_nonpositive(weights[g][t]) : 0.0f;
                sum += weights[g][t];
            }
            total[g] = total[g] * shrink + sum;
            top[g] = best;
            if (shrink != 1.0f)
                for (int d = 0; d < dim; d++) acc[g * dim + d] *= shrink;
        }
        for (int d = 0; d < dim; d += 32)
            for (int g0 = 0; g0 < group; g0 += 4) {
                const int count = group - g0 < 4 ? group - g0 : 4;
                __m512 even[4], odd[4];
                for (int j = 0; j < 4; j++) {
                    even[j] = j < count ? _mm512_loadu_ps(acc + (g0 + j) * dim + d) : _mm512_setzero_ps();
                    odd[j] = j < count ? _mm512_loadu_ps(acc + (g0 + j) * dim + d + 16) : _mm512_setzero_ps();
                }
                for (int t = 0; t < run; t++) {
                    const __m512i bits = _mm512_loadu_si512(values + t * dim + d);
                    const __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));  /* elements d, d+2, ... */
                    const __m512 high = _mm512_castsi512_ps(_mm512_and_si512(bits, high_half));  /* d+1, d+3, ... */
                    for (int j = 0; j < 4; j++)
                        if (j < count) {
                            const __m512 weight = _mm512_set1_ps(weights[g0 + j][t]);
                            even[j] = _mm512_fmadd_ps(weight, low, even[j]);
                            odd[j] = _mm512_fmadd_ps(weight, high, odd[j]);
                        }
                }
                for (int j = 0; j < count; j++) {
                    _mm512_storeu_ps(acc + (g0 + j) * dim + d, even[j]);
                    _mm512_storeu_ps(acc + (g0 + j) * dim + d + 16, odd[j]);
                }
            }
        at += run;
    }
    for (int g = 0; g < group; g++)  /* each 32 values as 16 even, then 16 odd: back in order */
        for (int d = 0; d < dim; d += 32) {
            float ordered[32];
            for (int i = 0; i < 16; i++) {
                ordered[2 * i] = acc[g * dim + d + i];
                ordered[2 * i + 1] = acc[g * dim + d + 16 + i];
            }
            for (int i = 0; i < 32; i++) acc[g * dim + d + i] = ordered[i];
        }
}
#endif
