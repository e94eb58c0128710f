/* A decoder layer's element-wise work in one pass each (elementwise.py calls these; c_kernels.py builds them):
 * the residual add with the RMSNorm after it, SiLU times up, the rotary rotation, the write of keys and values
 * into the cache.
 *
 * Written by hand because torch runs each as a chain of small ops: the residual add and the RMSNorm took 11
 * ops and 19.5 us for one row of the bundled model (2.9 us here), SiLU times up 3 ops, the rotation 7, the
 * cache write 2 index_copy_ and their transposes. What a decode step spends is those ops' fixed costs, not
 * their arithmetic. Each function rounds where torch rounds, so a bfloat16 result is the one torch gives, bit
 * for bit: the residual sum to the model's dtype, the normalized row to the model's dtype before the weight
 * multiplies it, SiLU to the model's dtype before up multiplies it, each product of the rotation and their
 * sum. Rows are spread over torch's OpenMP threads once there are enough of them.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

enum { ELEMENT_F32 = 0, ELEMENT_BF16 = 1 };  /* as paged_decode.c's KIND_F32, KIND_BF16 */

#define PARALLEL_ROWS 16  /* fewer rows run on the calling thread: a parallel region costs more than they do */

/* What torch stores for a float32 result in `kind`, read back as float32. */
static inline float stored(float value, int kind) {
    return kind == ELEMENT_BF16 ? bf16_to_float(float_to_bf16(value)) : value;
}

static inline float load(const void *data, int kind, int64_t at) {
    return kind == ELEMENT_BF16 ? bf16_to_float(((const uint16_t *)data)[at]) : ((const float *)data)[at];
}

static inline void store(void *data, int kind, int64_t at, float value) {
    if (kind == ELEMENT_BF16) ((uint16_t *)data)[at] = float_to_bf16(value);
    else ((float *)data)[at] = value;
}

/* exp(x) for x <= 0 in float32, vectorizable (libm's expf is not): x = n ln2 + f with |f| <= ln2 / 2 (ln2 in
 * two parts, the first exact in a few bits, so f keeps its bits for any n), 2^n from the exponent bits, e^f by
 * its Taylor series to degree 7 (relative error about 1e-8, under float32's own, so SiLU rounds as torch's
 * does; paged_decode.c keeps a cheaper one for softmax weights). Under -87 it gives about 2^-126, not 0. */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float n = rintf(clamped * 1.44269504f);
    const float f = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, clamped));  /* ln2 = 0.693359375 - 2.12194440e-4 */
    const float p = ((((((1.9841270e-4f * f + 1.3888889e-3f) * f + 8.3333338e-3f) * f + 4.1666668e-2f) * f +
                       1.6666667e-1f) * f + 0.5f) * f + 1.0f) * f + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* hidden [rows, dim] += delta (where given), rounded to the model's dtype; then out = weight * (hidden /
 * sqrt(mean(hidden^2) + eps)), the quotient rounded to the model's dtype first (transformers' RMSNorm).
 * hidden, delta, weight and out all hold `kind`. */
void add_rms_norm(void *hidden, const void *delta, const void *weight, void *out, int kind, int rows, int dim,
                  float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows >= PARALLEL_ROWS)
    for (int r = 0; r < rows; r++) {
        const int64_t base = (int64_t)r * dim;
        float squares = 0.0f;
        if (delta) {
#pragma omp simd reduction(+ : squares)
            for (int i = 0; i < dim; i++) {
                const float sum = stored(load(hidden, kind, base + i) + load(delta, kind, base + i), kind);
                store(hidden, kind, base + i, sum);
                squares += sum * sum;
            }
        } else {
#pragma omp simd reduction(+ : squares)
            for (int i = 0; i < dim; i++) {
                const float value = load(hidden, kind, base + i);
                squares += value * value;
            }
        }
        const float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
        for (int i = 0; i < dim; i++)
            store(out, kind, base + i, load(weight, kind, i) * stored(load(hidden, kind, base + i) * inverse, kind));
    }
}

/* out [rows, dim] = silu(gate) * up, where gate_up [rows, 2 * dim] holds gate then up per row; SiLU rounded
 * to the model's dtype before the product, as torch computes `act(gate) * up`. */
void silu_mul(const void *gate_up, void *out, int kind, int rows, int dim, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows >= PARALLEL_ROWS)
    for (int r = 0; r < rows; r++) {
        const int64_t in = (int64_t)r * 2 * dim, at = (int64_t)r * dim;
#pragma omp simd
        for (int i = 0; i < dim; i++) {
            const float x = load(gate_up, kind, in + i);
            const float e = exp_nonpositive(-fabsf(x));  /* exp(-|x|): x sigmoid(x) without overflow, one division */
            const float silu = (x >= 0.0f ? x : x * e) / (1.0f + e);
            store(out, kind, at + i, stored(silu, kind) * load(gate_up, kind, in + dim + i));
        }
    }
}

/* out [tokens, heads, dim] = x * cos + rotate_half(x) * sin (rotary positions, rotate-half layout: rotate_half
 * of [x1, x2] is [-x2, x1]), cos and sin [tokens, dim]: one angle per token, shared by its heads. Each product
 * and the sum rounded to the model's dtype, as torch's three ops round them. x is read through its strides
 * (q and k are views of the q/k/v projection's output); its last axis is contiguous. */
void rotate(const void *x, int64_t token_stride, int64_t head_stride, const void *cos, const void *sin, void *out,
            int kind, int tokens, int heads, int dim, int threads) {
    const int half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens >= PARALLEL_ROWS)
    for (int t = 0; t < tokens; t++)
        for (int h = 0; h < heads; h++) {
            const int64_t from = t * token_stride + h * head_stride, to = ((int64_t)t * heads + h) * dim;
            const int64_t angle = (int64_t)t * dim;
#pragma omp simd
            for (int i = 0; i < dim; i++) {
                const float turned = i < half ? -load(x, kind, from + i + half) : load(x, kind, from + i - half);
                store(out, kind, to + i, stored(load(x, kind, from + i) * load(cos, kind, angle + i), kind) +
                                         stored(turned * load(sin, kind, angle + i), kind));
            }
        }
}

/* A step's keys and values into their planes [kv_heads, plane_slots, dim] at `slots` [tokens], copied as they
 * are (elements of `element_bytes` bytes): what index_copy_ does for each plane, as one call for both. k and v
 * [tokens, heads, dim] are read through their strides (in elements); their last axis is contiguous. Returns 0,
 * or -1 (writing nothing) where a slot lies outside the planes, as index_copy_ would raise. */
int write_keys_and_values(void *keys, void *values, int64_t plane_slots, const int64_t *slots, const void *k,
                          int64_t k_token_stride, int64_t k_head_stride, const void *v, int64_t v_token_stride,
                          int64_t v_head_stride, int element_bytes, int tokens, int heads, int dim) {
    for (int t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= plane_slots) return -1;
    const size_t row_bytes = (size_t)dim * element_bytes;
    for (int t = 0; t < tokens; t++)
        for (int h = 0; h < heads; h++) {
            const int64_t to = ((int64_t)h * plane_slots + slots[t]) * dim;
            memcpy((char *)keys + to * element_bytes,
                   (const char *)k + (t * k_token_stride + h * k_head_stride) * element_bytes, row_bytes);
            memcpy((char *)values + to * element_bytes,
                   (const char *)v + (t * v_token_stride + h * v_head_stride) * element_bytes, row_bytes);
        }
    return 0;
}
