/* Decode attention over the paged KV cache, read in place (paged_decode.py builds and calls it).
 *
 * Written by hand because no library reads our cache layout: torch's CPU flash
 * kernel takes only bf16/float32 keys gathered into one tensor, so an 8-bit
 * cache had to be widened and scaled into a copy first (two extra passes over
 * every key a step reads), and even an unquantized cache was copied once by
 * the gather. Here each key is widened in registers as it is read, through the
 * block table, and the per-(token, head) scale is applied once per key to its
 * score and once per value to its weight, never per element.
 *
 * Layout (kv_cache.py): a plane is [kv_heads, slots, d], slot = block * 16 +
 * offset; an 8-bit plane has scales [kv_heads, slots] in bf16 or fp16. Each
 * item is one decode row of a call: its block-table row and the keys [k0, k1)
 * its band sees. The work is (item, KV head, split of the keys), run on
 * torch's own OpenMP threads, each split with an online softmax in float32;
 * splits are merged by their log-sum-exp, which is also returned. Bfloat16
 * planes (on a CPU with AVX512-BF16) and 8-bit planes (with AVX-512) take
 * paged_decode_avx512.h's split, held in registers; float32 planes, and
 * other CPUs, the plain loops below. The register split asks for each run's
 * values while it scores the run's keys (prefetch_values). A prefetch of the
 * next block, here before, was never in the build: GCC deletes a loop of
 * __builtin_prefetch calls. Written as assembly, it was slower than the
 * values' prefetch, alone or beside it (docs/engine.md).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "bf16.h"

#define BLOCK 16
#define LANES 16

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_I8 = 3, KIND_E4M3 = 4, KIND_E5M2 = 5 };

static inline float f16_value(uint16_t bits) {
#ifdef __FLT16_MAX__  /* the compiler's own half type: one instruction where the CPU has F16C */
    union { uint16_t u; _Float16 h; } x;
    x.u = bits;
    return (float)x.h;
#else
    union { uint32_t u; float f; } x;
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    if (exponent == 0) {
        float tiny = ldexpf((float)mantissa, -24);
        return sign ? -tiny : tiny;
    }
    x.u = sign | (exponent == 31 ? 0x7f800000u | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13));
    return x.f;
#endif
}

/* exp(x) for x <= 0, vectorizable (libm's expf is not, without -ffast-math): 2^n * 2^f, f in [0, 1), by its
 * Taylor series to degree 7 (relative error under 2e-6); under -87 it gives 2^-126 * 2^f, not 0. */
static const float EXP_TAYLOR[8] = {1.9841270e-4f, 1.3888889e-3f, 8.3333338e-3f, 4.1666668e-2f, 1.6666667e-1f,
                                    0.5f, 1.0f, 1.0f};  /* 1/7! .. 1/0!, highest first, for Horner's rule */

static inline float exp_nonpositive(float x) {
    const float t = (x < -87.0f ? -87.0f : x) * 1.44269504f;
    const float n = floorf(t), f = (t - n) * 0.69314718f;
    float p = EXP_TAYLOR[0];
    for (int i = 1; i < 8; i++) p = p * f + EXP_TAYLOR[i];
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* The two float8 formats, as fp8_value's last three arguments: mantissa bits, exponent bias, subnormal unit */
#define E4M3 3, 7, 0x1p-9f
#define E5M2 2, 15, 0x1p-16f

/* A float8 code by its bits (sign, exponent with `bias`, `mantissa_bits`), branch-free so a loop of them
 * vectorizes; a zero exponent is subnormal, mantissa * `tiny`. No code is inf or NaN: quantize clamps. */
static inline float fp8_value(uint8_t code, int mantissa_bits, int bias, float tiny) {
    const uint32_t sign = (uint32_t)(code & 0x80u) << 24, exponent = (code & 0x7fu) >> mantissa_bits;
    const uint32_t mantissa = code & ((1u << mantissa_bits) - 1u);
    union { uint32_t u; float f; } normal, subnormal;
    normal.u = sign | ((exponent + 127u - bias) << 23) | (mantissa << (23 - mantissa_bits));
    subnormal.f = (float)mantissa * tiny;
    subnormal.u |= sign;
    return exponent ? normal.f : subnormal.f;
}

static inline float scale_value(const void *scales, int scale_kind, int64_t at) {
    if (!scales) return 1.0f;
    uint16_t bits = ((const uint16_t *)scales)[at];
    return scale_kind == KIND_BF16 ? bf16_to_float(bits) : f16_value(bits);
}

/* `dim` values of one (token, head) vector, starting at element `at`, as float32. */
static inline void widen(const void *plane, int kind, int64_t at, int dim, float *out) {
    switch (kind) {
    case KIND_F32: {
        const float *from = (const float *)plane + at;
        for (int d = 0; d < dim; d++) out[d] = from[d];
        break;
    }
    case KIND_BF16: {
        const uint16_t *from = (const uint16_t *)plane + at;
        for (int d = 0; d < dim; d++) out[d] = bf16_to_float(from[d]);
        break;
    }
    case KIND_F16: {
        const uint16_t *from = (const uint16_t *)plane + at;
        for (int d = 0; d < dim; d++) out[d] = f16_value(from[d]);
        break;
    }
    case KIND_I8: {
        const int8_t *from = (const int8_t *)plane + at;
        for (int d = 0; d < dim; d++) out[d] = (float)from[d];
        break;
    }
    case KIND_E4M3: {
        const uint8_t *from = (const uint8_t *)plane + at;
        for (int d = 0; d < dim; d++) out[d] = fp8_value(from[d], E4M3);
        break;
    }
    default: {
        const uint8_t *from = (const uint8_t *)plane + at;
        for (int d = 0; d < dim; d++) out[d] = fp8_value(from[d], E5M2);
    }
    }
}

/* Partial sums in 16 lanes, added up once at the end: one vector of independent chains instead of a reduction
 * per step. */
static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int dim) {
    float total = 0.0f;
    if (dim % LANES == 0) {
        float lanes[LANES] = {0.0f};
        for (int d = 0; d < dim; d += LANES)
            for (int l = 0; l < LANES; l++) lanes[l] += a[d + l] * b[d + l];
        for (int l = 0; l < LANES; l++) total += lanes[l];
    } else {
        for (int d = 0; d < dim; d++) total += a[d] * b[d];
    }
    return total;
}

#ifdef __AVX512F__
/* The lane sums of 16 vectors as one vector, sum[t] = the sum of v[t]'s lanes: a four-level butterfly of 30
 * shuffles and adds, where a horizontal sum per vector would take 16 chains of them. */
static inline __m512 lane_sums16(const __m512 v[16]) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: v[2i]'s two partial sums at 0 and 2, v[2i+1]'s at 1 and 3 */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int j = 0; j < 4; j++)  /* per 128-bit lane: element e, that lane's share of v[4j + e] */
        quads[j] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int h = 0; h < 2; h++)  /* 128-bit lanes summed in pairs: [q0 + q1 of lanes 0|1, 2|3; then the next] */
        halves[h] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * h], quads[2 * h + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * h], quads[2 * h + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* scores[t] = q . keys[t] for a whole block of 16 widened keys [16][dim], dim a multiple of 16. */
static inline void block_scores(const float *q, const float *keys, int dim, float *scores) {
    __m512 sums[BLOCK];
    for (int t = 0; t < BLOCK; t++) sums[t] = _mm512_setzero_ps();
    for (int d = 0; d < dim; d += LANES) {
        const __m512 part = _mm512_loadu_ps(q + d);
        for (int t = 0; t < BLOCK; t++) sums[t] = _mm512_fmadd_ps(part, _mm512_loadu_ps(keys + t * dim + d), sums[t]);
    }
    _mm512_storeu_ps(scores, lane_sums16(sums));
}
#endif

typedef struct {
    const void *keys, *key_scales, *values, *value_scales;
    int kind, scale_kind;
    int64_t slots;  /* per KV head */
    int kv_heads, group, dim;
    const int32_t *table;
    int64_t table_width;
    float scale;
} Cache;

/* Ask for the cache line at `at` into L2. As inline assembly on x86: GCC 12 deletes a loop of
 * __builtin_prefetch calls (it keeps the first call only). */
#if defined(__x86_64__) || defined(__i386__)
static inline void prefetch_line_l2(const void *at) { __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)at)); }
#else
static inline void prefetch_line_l2(const void *at) { __builtin_prefetch(at, 0, 2); }
#endif

/* The keys of [at, b) that at's block holds: their count in *run, and the slot of the first. */
static inline int64_t block_run(const Cache *c, int row, int64_t head_base, int at, int b, int *run) {
    const int offset = at % BLOCK;
    *run = (b - at < BLOCK - offset) ? b - at : BLOCK - offset;
    return head_base + (int64_t)c->table[row * c->table_width + at / BLOCK] * BLOCK + offset;
}

/* One split: queries q [group, dim] over keys [a, b) of table row `row`, head `head`. Leaves the unnormalized
 * output in acc [group, dim], the running max in top [group] and the sum of weights in total [group]. */
static inline __attribute__((always_inline)) void attend_split(const Cache *c, const float *q, int row, int head,
                                                               int a, int b, int dim, float *acc, float *top,
                                                               float *total, float *work) {
    const int group = c->group;
    float (*widened)[dim] = (float (*)[dim])work;  /* [BLOCK][dim] */
    float (*scores)[BLOCK] = (float (*)[BLOCK])(work + BLOCK * dim);  /* [group][BLOCK] */
    for (int g = 0; g < group; g++) {  /* no maximum yet, no weight, no output */
        top[g] = -INFINITY;
        total[g] = 0.0f;
        for (int d = 0; d < dim; d++) acc[g * dim + d] = 0.0f;
    }
    const int64_t head_base = (int64_t)head * c->slots;
    for (int at = a, run; at < b; at += run) {
        const int64_t slot = block_run(c, row, head_base, at, b, &run);
        float key_scales[BLOCK], weights[BLOCK];
        for (int t = 0; t < run; t++) {
            widen(c->keys, c->kind, (slot + t) * dim, dim, widened[t]);
            key_scales[t] = scale_value(c->key_scales, c->scale_kind, slot + t) * c->scale;
        }
#ifdef __AVX512F__
        if (run == BLOCK && dim % LANES == 0) {
            for (int g = 0; g < group; g++) {
                block_scores(q + g * dim, widened[0], dim, scores[g]);
                for (int t = 0; t < BLOCK; t++) scores[g][t] *= key_scales[t];
            }
        } else
#endif
        for (int g = 0; g < group; g++)
            for (int t = 0; t < run; t++) scores[g][t] = dot(q + g * dim, widened[t], dim) * key_scales[t];
        for (int g = 0; g < group; g++) {
            float best = top[g];
            for (int t = 0; t < run; t++) best = scores[g][t] > best ? scores[g][t] : best;
            const float shrink = expf(top[g] - best);  /* exp(-inf) = 0 on the first run */
            float sum = 0.0f;
            for (int t = 0; t < run; t++) {
                scores[g][t] = exp_nonpositive(scores[g][t] - best);
                sum += scores[g][t];
            }
            total[g] = total[g] * shrink + sum;
            top[g] = best;
            if (shrink != 1.0f)
                for (int d = 0; d < dim; d++) acc[g * dim + d] *= shrink;
        }
        for (int t = 0; t < run; t++) {
            widen(c->values, c->kind, (slot + t) * dim, dim, widened[t]);
            key_scales[t] = scale_value(c->value_scales, c->scale_kind, slot + t);  /* now the values' */
        }
        for (int g = 0; g < group; g++) {
            float *out = acc + g * dim;
            for (int t = 0; t < run; t++) weights[t] = scores[g][t] * key_scales[t];
#pragma omp simd
            for (int d = 0; d < dim; d++) {  /* each output value stays in a register over the run's keys */
                float sum = out[d];
                for (int t = 0; t < run; t++) sum += weights[t] * widened[t][d];
                out[d] = sum;
            }
        }
    }
}

#include "paged_decode_avx512.h"

#define WIDE_SPLIT(kind)                                                                                    \
    do {                                                                                                    \
        if (c->dim == 64) attend_split_wide(c, kind, q, row, head, a, b, 64, acc, top, total, work);        \
        else if (c->dim == 128) attend_split_wide(c, kind, q, row, head, a, b, 128, acc, top, total, work); \
        else attend_split_wide(c, kind, q, row, head, a, b, c->dim, acc, top, total, work);                 \
    } while (0)

/* Whether run_split reads this plane's queries as bfloat16 (for the bfloat16 dot product), else as float32. */
static int bf16_queries(const Cache *c) {
#ifdef WIDE_SPLITS
    return c->kind == KIND_BF16 && wide_kind(KIND_BF16) && c->dim % 32 == 0;
#else
    return 0;
#endif
}

static void run_split(const Cache *c, const void *q, int row, int head, int a, int b, float *acc, float *top,
                      float *total, float *work) {
#ifdef WIDE_SPLITS
    if (wide_kind(c->kind) && c->dim % 32 == 0) {  /* each (kind, usual head size) compiled apart */
        switch (c->kind) {
        case KIND_BF16: WIDE_SPLIT(KIND_BF16); break;
        case KIND_I8: WIDE_SPLIT(KIND_I8); break;
        case KIND_E4M3: WIDE_SPLIT(KIND_E4M3); break;
        default: WIDE_SPLIT(KIND_E5M2);
        }
        return;
    }
#endif
    /* the usual head sizes as constants, so the loops over d unroll and vectorize fully */
    const float *query = q;
    if (c->dim == 64) attend_split(c, query, row, head, a, b, 64, acc, top, total, work);
    else if (c->dim == 128) attend_split(c, query, row, head, a, b, 128, acc, top, total, work);
    else attend_split(c, query, row, head, a, b, c->dim, acc, top, total, work);
}

/* The `count` queries as `wanted` (KIND_BF16 or KIND_F32), from `q` in `io_kind`: `q` itself, or a copy in
 * *copy (to be freed; NULL when none was needed or memory ran out). */
static const void *queries_as(int wanted, const void *q, int io_kind, size_t count, void **copy) {
    *copy = NULL;
    if (io_kind == wanted) return q;
    *copy = malloc(count * (wanted == KIND_BF16 ? sizeof(uint16_t) : sizeof(float)));
    if (!*copy) return NULL;
    for (size_t i = 0; i < count; i++) {
        if (wanted == KIND_BF16) ((uint16_t *)*copy)[i] = float_to_bf16(((const float *)q)[i]);
        else ((float *)*copy)[i] = bf16_to_float(((const uint16_t *)q)[i]);
    }
    return *copy;
}

/* q [items, kv_heads * group, dim] in `io_kind` (KIND_F32 or KIND_BF16); items [n, 3] int32: (table row, k0,
 * k1). Writes out [items, heads, dim] in `io_kind` and lse [items, heads] in float32 (a row that sees no key
 * gets 0 and -inf). Returns 0; -1 for a split or thread count under 1, or another `io_kind`; -2 when memory
 * runs out. */
int paged_decode(const void *q, int io_kind, const void *keys, const void *key_scales, const void *values,
                 const void *value_scales, int kind, int scale_kind, int64_t slots, int kv_heads,
                 int group, int dim, const int32_t *table, int64_t table_width, const int32_t *items, int n,
                 int split, float scale, void *out, float *lse, int threads) {
    if (split < 1 || threads < 1 || (io_kind != KIND_F32 && io_kind != KIND_BF16)) return -1;
    const Cache c = {keys, key_scales, values, value_scales, kind, scale_kind, slots, kv_heads, group, dim,
                     table, table_width, scale};
    const int query_kind = bf16_queries(&c) ? KIND_BF16 : KIND_F32;  /* what run_split reads */
    const size_t query_size = query_kind == KIND_BF16 ? sizeof(uint16_t) : sizeof(float);
    void *query_copy;
    const void *queries = queries_as(query_kind, q, io_kind, (size_t)n * kv_heads * group * dim, &query_copy);
    int *first_split = malloc(sizeof(int) * (n + 1));
    if (!first_split || !queries) {
        free(first_split), free(query_copy);
        return -2;
    }
    first_split[0] = 0;
    for (int i = 0; i < n; i++) {
        const int span = items[3 * i + 2] - items[3 * i + 1];
        first_split[i + 1] = first_split[i] + (span > 0 ? (span + split - 1) / split : 0);
    }
    const int splits = first_split[n], units = splits * kv_heads, per_unit = group * (dim + 2);
    float *partial = malloc(sizeof(float) * (size_t)(units > 0 ? units : 1) * per_unit);
    int *item_of_split = malloc(sizeof(int) * (splits > 0 ? splits : 1));
    const int plain_work = BLOCK * dim + group * BLOCK, wide_work = (group + 1) * (split + BLOCK);
    const int per_thread = plain_work > wide_work ? plain_work : wide_work;
    float *work = malloc(sizeof(float) * (size_t)per_thread * threads);
    if (!partial || !item_of_split || !work) {
        free(first_split), free(partial), free(item_of_split), free(work), free(query_copy);
        return -2;
    }
    for (int i = 0; i < n; i++)
        for (int s = first_split[i]; s < first_split[i + 1]; s++) item_of_split[s] = i;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int unit = 0; unit < units; unit++) {
        const int s = unit / kv_heads, head = unit % kv_heads, i = item_of_split[s];
        const int k0 = items[3 * i + 1], k1 = items[3 * i + 2];
        const int a = k0 + (s - first_split[i]) * split, b = a + split < k1 ? a + split : k1;
        float *mine = partial + (size_t)unit * per_unit;
        run_split(&c, (const char *)queries + ((size_t)i * kv_heads + head) * group * dim * query_size, items[3 * i], head, a, b, mine,
                  mine + group * dim, mine + group * (dim + 1), work + (size_t)omp_get_thread_num() * per_thread);
    }

#pragma omp parallel for schedule(static) num_threads(threads)
    for (int pair = 0; pair < n * kv_heads; pair++) {
        const int i = pair / kv_heads, head = pair % kv_heads;
        for (int g = 0; g < group; g++) {
            const size_t index = (size_t)i * kv_heads * group + head * group + g;  /* of this query's head */
            float o[dim], best = -INFINITY, total = 0.0f;
            for (int s = first_split[i]; s < first_split[i + 1]; s++) {
                const float top = partial[(size_t)(s * kv_heads + head) * per_unit + group * dim + g];
                best = top > best ? top : best;
            }
            for (int d = 0; d < dim; d++) o[d] = 0.0f;
            for (int s = first_split[i]; s < first_split[i + 1]; s++) {
                const float *mine = partial + (size_t)(s * kv_heads + head) * per_unit;
                const float weight = expf(mine[group * dim + g] - best);
                total += mine[group * (dim + 1) + g] * weight;
                for (int d = 0; d < dim; d++) o[d] += weight * mine[g * dim + d];
            }
            if (total > 0.0f)
                for (int d = 0; d < dim; d++) o[d] /= total;
            lse[index] = total > 0.0f ? best + logf(total) : -INFINITY;
            for (int d = 0; d < dim; d++) {
                if (io_kind == KIND_BF16) ((uint16_t *)out)[index * dim + d] = float_to_bf16(o[d]);
                else ((float *)out)[index * dim + d] = o[d];
            }
        }
    }
    free(first_split), free(partial), free(item_of_split), free(work), free(query_copy);
    return 0;
}
