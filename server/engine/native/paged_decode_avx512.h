/* One split over bfloat16, int8 or float8 planes in AVX-512 registers (included by paged_decode.c, whose
 * helpers it uses).
 *
 * The same softmax as attend_split, with fewer instructions per key and no block waiting on the one before:
 * the split's scores first, then its weights against the split's maximum, then its values (attend_split
 * rescales its running output at each block instead: 309 against 241 us for 32 rows x 320 keys from a warm
 * cache, about the same from memory). Scores: bfloat16 keys read as they are by the CPU's bfloat16 dot
 * product (vdpbf16ps, with AVX512-BF16: the query was bfloat16, so its pairs are exact; products exact, sums
 * in float32); 8-bit codes widened in registers (int8 by conversion, float8 from its bits) once per block for
 * the whole group, multiplied in float32. A block's 16 scores are summed across lanes in one butterfly
 * (lane_sums16).
 * Values: bfloat16 values two tokens at a time by the same dot product, against each query's two weights
 * rounded to bfloat16 (as torch's own CPU flash attention rounds them; the sum of weights stays float32):
 * half the multiplies of widening them, 13 against 24 instructions a token pair for a group of three
 * (values_bf16). 8-bit values are widened in registers 32 at a time and shared by up to four of the group's
 * queries. A token's scale multiplies its score and its value's weight, once each.
 */
#ifdef __AVX512F__
#define WIDE_SPLITS 1

/* exp_nonpositive for 16 lanes: the same clamp and polynomial, 2^n applied by vscalefps */
static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
    __m512 p = _mm512_set1_ps(EXP_TAYLOR[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_TAYLOR[i]));
    return _mm512_scalef_ps(p, n);
}

/* fp8_value for 16 codes: the exponent and mantissa moved into float32's fields for a normal code, the
 * mantissa times `tiny` for a subnormal one, then the sign */
static inline __m512 fp8_values16(const uint8_t *codes, int mantissa_bits, int bias, float tiny) {
    const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes));
    const __m512i exponent = _mm512_srli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(0x7f)), mantissa_bits);
    const __m512i mantissa = _mm512_and_si512(code, _mm512_set1_epi32((1 << mantissa_bits) - 1));
    const __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exponent, _mm512_set1_epi32(127 - bias)), 23),
                                           _mm512_slli_epi32(mantissa, 23 - mantissa_bits));
    const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mantissa), _mm512_set1_ps(tiny));
    const __m512i magnitude = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(exponent, exponent),
                                                      _mm512_castps_si512(subnormal), normal);
    return _mm512_castsi512_ps(_mm512_or_si512(magnitude, _mm512_slli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(0x80)), 24)));
}

/* 32 8-bit codes of a vector from element `at`, as float32 */
static inline __attribute__((always_inline)) void wide32(const void *plane, int kind, int64_t at, __m512 *first,
                                                         __m512 *second) {
    const int8_t *codes = (const int8_t *)plane + at;
    if (kind == KIND_I8) {
        *first = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
        *second = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16))));
    } else if (kind == KIND_E4M3) {
        *first = fp8_values16((const uint8_t *)codes, E4M3);
        *second = fp8_values16((const uint8_t *)codes + 16, E4M3);
    } else {
        *first = fp8_values16((const uint8_t *)codes, E5M2);
        *second = fp8_values16((const uint8_t *)codes + 16, E5M2);
    }
}

/* q . key as 16 partial sums: a bfloat16 key read at element `at` of the plane, against the query's pairs; an
 * 8-bit key from `widened` (its float32 values, widened once for the group), against the query's vectors */
static inline __attribute__((always_inline)) __m512 key_dot(const Cache *c, int kind, const __m512 *query,
                                                            int64_t at, const float *widened, int dim) {
    __m512 sum = _mm512_setzero_ps();
#ifdef __AVX512BF16__
    if (kind == KIND_BF16) {
        for (int p = 0; p < dim / 32; p++)
            sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512((const uint16_t *)c->keys + at + 32 * p),
                                   (__m512bh)query[p]);
        return sum;
    }
#endif
    for (int p = 0; p < dim / 16; p++) sum = _mm512_fmadd_ps(_mm512_loadu_ps(widened + 16 * p), query[p], sum);
    return sum;
}

/* Ask for a run's values while its keys are scored, into L2, so the values pass finds them there: the kernel
 * reads its blocks from memory one run after another, and the hardware's prefetchers, which follow a page,
 * do not see the next run coming. In the engine, 32 rows x about 290 keys of the bundled model: 457-644
 * against 387-409 us a call (docs/engine.md). */
static inline void prefetch_values(const Cache *c, int kind, int64_t slot, int run, int dim) {
    const int size = kind == KIND_BF16 ? 2 : 1;
    const char *first = (const char *)c->values + slot * dim * size;
    for (int offset = 0; offset < run * dim * size; offset += 64) prefetch_line_l2(first + offset);
}

#ifdef __AVX512BF16__
/* values_bf16's pass: acc [group, dim] = the split's bfloat16 values weighted by `weights` [group][stride]
 * (float32, zero past the span). Two tokens at a time: their values interleaved pairwise (unpacklo/hi_epi16:
 * in each 128-bit lane, elements 0-3 of the lane's eight, then 4-7), each query's two weights rounded to a
 * bfloat16 pair, one VDPBF16PS per 16 outputs. The outputs come out in that lane order and are put back in
 * order at the end. `slots` [span + 1] holds each token's slot; an odd span pairs its last token with itself
 * at weight zero. */
static inline __attribute__((always_inline)) void values_bf16(const Cache *c, const int64_t *slots, int span,
                                                              const float *weights, int stride, int dim, float *acc) {
    const int group = c->group;
    uint16_t pairs[group][span + 2];  /* the weights as bfloat16, a zero after the last */
    for (int g = 0; g < group; g++) {
        for (int t = 0; t < span; t += LANES) {
            const __mmask16 live = span - t >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (span - t)) - 1u);
            _mm256_mask_storeu_epi16(pairs[g] + t, live, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, weights + (size_t)g * stride + t)));
        }
        pairs[g][span] = pairs[g][span + 1] = 0;
    }
    const uint16_t *values = (const uint16_t *)c->values;
    for (int g0 = 0; g0 < group; g0 += 4) {  /* up to four queries share each pair of values */
        const int count = group - g0 < 4 ? group - g0 : 4;
        for (int d = 0; d < dim; d += 32) {
            __m512 low[4], high[4];
            for (int j = 0; j < 4; j++) low[j] = high[j] = _mm512_setzero_ps();
            for (int t = 0; t < span; t += 2) {
                const __m512i first = _mm512_loadu_si512(values + slots[t] * dim + d);
                const __m512i second = _mm512_loadu_si512(values + slots[t + 1] * dim + d);
                const __m512bh lows = (__m512bh)_mm512_unpacklo_epi16(first, second);
                const __m512bh highs = (__m512bh)_mm512_unpackhi_epi16(first, second);
                for (int j = 0; j < 4; j++)
                    if (j < count) {
                        uint32_t pair;
                        memcpy(&pair, pairs[g0 + j] + t, sizeof pair);
                        const __m512bh weight = (__m512bh)_mm512_set1_epi32((int)pair);
                        low[j] = _mm512_dpbf16_ps(low[j], lows, weight);
                        high[j] = _mm512_dpbf16_ps(high[j], highs, weight);
                    }
            }
            for (int j = 0; j < count; j++) {  /* lane L of low holds outputs 8L..8L+3, of high 8L+4..8L+7 */
                float lanes_low[16], lanes_high[16], *out = acc + (g0 + j) * dim + d;
                _mm512_storeu_ps(lanes_low, low[j]);
                _mm512_storeu_ps(lanes_high, high[j]);
                for (int lane = 0; lane < 4; lane++)
                    for (int e = 0; e < 4; e++) {
                        out[8 * lane + e] = lanes_low[4 * lane + e];
                        out[8 * lane + 4 + e] = lanes_high[4 * lane + e];
                    }
            }
        }
    }
}
#endif

/* attend_split's work and results for a bfloat16 or 8-bit plane (`kind`), dim a multiple of 32; the query
 * `q` as bfloat16 for a bfloat16 plane, float32 for an 8-bit one. In three passes over the split, so no block
 * waits on the one before: every score (and each value's scale) into `work`, with a running maximum per
 * lane; then every weight, exp(score - the split's maximum); then the values. `work` holds
 * (group + 1) * (b - a + BLOCK) floats. */
static inline __attribute__((always_inline)) void attend_split_wide(const Cache *c, int kind, const void *q,
                                                                    int row, int head, int a, int b, int dim,
                                                                    float *acc, float *top, float *total,
                                                                    float *work) {
    const int group = c->group, per_query = dim / 16, span = b - a, stride = span + BLOCK;
    float *scores = work, *value_scales = work + (size_t)group * stride;  /* [group][stride], [stride] */
    __m512 queries[group * per_query];  /* per query: dim/32 bf16 pairs, or dim/16 float32 vectors for int8 */
    float widened[kind == KIND_BF16 ? 1 : BLOCK * dim];  /* a block's 8-bit keys */
    int64_t slots[kind == KIND_BF16 ? span + 1 : 1];  /* each token's slot, for values_bf16 */
    const int query_stride = kind == KIND_BF16 ? per_query / 2 : per_query;
    for (int i = 0; i < group * query_stride; i++)
        queries[i] = kind == KIND_BF16 ? _mm512_castsi512_ps(_mm512_loadu_si512((const uint16_t *)q + 32 * i))
                                       : _mm512_loadu_ps((const float *)q + 16 * i);
    const int64_t head_base = (int64_t)head * c->slots;
    __m512 highest[group];
    for (int g = 0; g < group; g++) highest[g] = _mm512_set1_ps(-INFINITY);
    for (int at = a, run; at < b; at += run) {  /* scores */
        const int64_t slot = block_run(c, row, head_base, at, b, &run);
        const __mmask16 live = (__mmask16)((1u << run) - 1u);  /* the lanes of this run's keys */
        prefetch_values(c, kind, slot, run, dim);
        if (kind == KIND_BF16)
            for (int t = 0; t < run; t++) slots[at - a + t] = slot + t;
        __m512 key_scales = _mm512_set1_ps(c->scale);
        if (c->key_scales) {  /* an 8-bit plane: each token's own scales */
            float keys_of[BLOCK] = {0.0f};
            for (int t = 0; t < run; t++) {
                keys_of[t] = scale_value(c->key_scales, c->scale_kind, slot + t) * c->scale;
                value_scales[at - a + t] = scale_value(c->value_scales, c->scale_kind, slot + t);
            }
            key_scales = _mm512_loadu_ps(keys_of);
            for (int d = 0; d < dim; d += 32)  /* 8-bit keys widened once for every query of the group */
                for (int t = 0; t < run; t++) {
                    __m512 first, second;
                    wide32(c->keys, kind, (slot + t) * dim + d, &first, &second);
                    _mm512_storeu_ps(widened + t * dim + d, first);
                    _mm512_storeu_ps(widened + t * dim + d + 16, second);
                }
        }
        for (int g = 0; g < group; g++) {
            __m512 sums[BLOCK];
            for (int t = 0; t < BLOCK; t++)
                sums[t] = t < run ? key_dot(c, kind, queries + g * query_stride, (slot + t) * dim, widened + t * dim, dim)
                                  : _mm512_setzero_ps();
            const __m512 block = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY),
                                                      _mm512_mul_ps(lane_sums16(sums), key_scales));
            highest[g] = _mm512_max_ps(highest[g], block);
            _mm512_storeu_ps(scores + (size_t)g * stride + (at - a), block);  /* the next run overwrites the dead lanes */
        }
    }
    for (int g = 0; g < group; g++) {  /* weights */
        float *own = scores + (size_t)g * stride;
        top[g] = _mm512_reduce_max_ps(highest[g]);
        const __m512 best = _mm512_set1_ps(top[g]);
        __m512 sum = _mm512_setzero_ps();
        for (int t = 0; t < span; t += LANES) {
            const __mmask16 live = span - t >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (span - t)) - 1u);
            __m512 weight = _mm512_maskz_mov_ps(live, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(own + t), best)));
            sum = _mm512_add_ps(sum, weight);
            if (c->value_scales) weight = _mm512_mul_ps(weight, _mm512_maskz_loadu_ps(live, value_scales + t));
            _mm512_storeu_ps(own + t, weight);
        }
        total[g] = _mm512_reduce_add_ps(sum);
    }
#ifdef __AVX512BF16__
    if (kind == KIND_BF16) {
        slots[span] = slots[span - 1];  /* an odd span's partner: weight zero */
        values_bf16(c, slots, span, scores, stride, dim, acc);
        return;
    }
#endif
    for (int g0 = 0; g0 < group; g0 += 4) {  /* values: up to four queries share each widened 8-bit value */
        const int count = group - g0 < 4 ? group - g0 : 4;
        for (int d = 0; d < dim; d += 32) {
            __m512 first[4], second[4];
            for (int j = 0; j < 4; j++) first[j] = second[j] = _mm512_setzero_ps();
            for (int at = a, run; at < b; at += run) {
                const int64_t slot = block_run(c, row, head_base, at, b, &run);
                for (int t = 0; t < run; t++) {
                    __m512 low, high;
                    wide32(c->values, kind, (slot + t) * dim + d, &low, &high);
                    for (int j = 0; j < 4; j++)
                        if (j < count) {
                            const __m512 weight = _mm512_set1_ps(scores[(size_t)(g0 + j) * stride + (at - a) + t]);
                            first[j] = _mm512_fmadd_ps(weight, low, first[j]);
                            second[j] = _mm512_fmadd_ps(weight, high, second[j]);
                        }
                }
            }
            for (int j = 0; j < count; j++) {
                _mm512_storeu_ps(acc + (g0 + j) * dim + d, first[j]);
                _mm512_storeu_ps(acc + (g0 + j) * dim + d + 16, second[j]);
            }
        }
    }
}

/* Whether attend_split_wide serves this plane here: 8-bit codes with AVX-512, bfloat16 with AVX512-BF16 too. */
static inline int wide_kind(int kind) {
#ifdef __AVX512BF16__
    if (kind == KIND_BF16) return 1;
#endif
    return kind == KIND_I8 || kind == KIND_E4M3 || kind == KIND_E5M2;
}
#endif
