/* y = x @ weight^T + bias in bfloat16 for CPUs with AVX512-BF16 (linear.py's Bf16Linear calls these;
 * c_kernels.py builds them).
 *
 * Written by hand because oneDNN's bf16 matmul is slow for the few rows of a decode step: the bundled model's
 * 121 weights (270 MB) took 12.4-14.3 ms for one row through oneDNN's packed weights, about 20 GB/s, and
 * 6.3-9.5 ms here, 28-43 GB/s, near what the memory gives (docs/engine.md has the figures). At 512 rows it is
 * about as fast as oneDNN without AMX, both at the matmul peak.
 *
 * The weight is packed once into tiles of 32 outputs: for each pair of inputs (k, k+1), the 32 outputs' two
 * weights side by side, which is what one VDPBF16PS multiplies against a broadcast pair of x. A tile holds
 * ceil(k / 2) such pairs (an odd k is padded with a zero weight), and the last tile is padded with zero
 * outputs. Up to 8 rows of x go through a tile at once, 16 float32 accumulators in registers, so the weights
 * are read once for up to 8 rows and from cache after that. Sums run in float32 in the same order for every
 * row, whatever the other rows and the threads, so a row's result does not depend on its batch; they are
 * rounded to bfloat16 once, after the bias is added, as oneDNN rounds.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define TILE 32      /* outputs per tile: two vectors of 16 */
#define ROW_BLOCK 8  /* rows of x per pass over a tile: 2 x 8 accumulators of the 32 vector registers */

/* The elements bf16_pack_weight writes for a weight [n, k]. */
int64_t bf16_packed_elements(int n, int k) { return (int64_t)((n + TILE - 1) / TILE) * ((k + 1) / 2) * TILE * 2; }

/* weight [n, k] row-major -> packed [ceil(n / 32)][ceil(k / 2)][32][2], zero-padded. */
void bf16_pack_weight(const uint16_t *weight, uint16_t *packed, int n, int k) {
    const int pairs = (k + 1) / 2, tiles = (n + TILE - 1) / TILE;
    for (int t = 0; t < tiles; t++)
        for (int p = 0; p < pairs; p++)
            for (int o = 0; o < TILE; o++)
                for (int h = 0; h < 2; h++) {
                    const int row = t * TILE + o, col = 2 * p + h;
                    packed[(((int64_t)t * pairs + p) * TILE + o) * 2 + h] =
                        row < n && col < k ? weight[(int64_t)row * k + col] : 0;
                }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

int bf16_matmul_built(void) { return 1; }

static inline __m512 widen(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

static inline __mmask16 first(int count) {
    return count >= 16 ? (__mmask16)0xffff : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

/* The pair (x[2p], x[2p + 1]) of a row of k values, broadcast to every lane; past the row's end, zero. */
static inline __m512bh pair_of(const uint16_t *row, int p, int k) {
    uint32_t pair = 0;
    if (2 * p + 1 < k) memcpy(&pair, row + 2 * p, sizeof pair);
    else pair = row[2 * p];
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

/* `rows` (a constant once inlined) rows of x through one tile; `outputs` of its 32 are stored. */
static inline __attribute__((always_inline)) void tile_rows(const uint16_t *x, int64_t x_stride, const uint16_t *w,
                                                            int k, int rows, const uint16_t *bias, uint16_t *y,
                                                            int64_t y_stride, int outputs) {
    const int pairs = (k + 1) / 2;
    __m512 acc[ROW_BLOCK][2];
    for (int r = 0; r < ROW_BLOCK; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        const __m512bh low = (__m512bh)_mm512_loadu_si512(w + (int64_t)p * 2 * TILE);
        const __m512bh high = (__m512bh)_mm512_loadu_si512(w + (int64_t)p * 2 * TILE + TILE);
        for (int r = 0; r < rows; r++) {
            const __m512bh pair = pair_of(x + r * x_stride, p, k);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], low, pair);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], high, pair);
        }
    }
    const __mmask16 low_mask = first(outputs), high_mask = first(outputs - 16);
    const __m512 low_bias = bias ? widen(_mm256_maskz_loadu_epi16(low_mask, bias)) : _mm512_setzero_ps();
    const __m512 high_bias = bias ? widen(_mm256_maskz_loadu_epi16(high_mask, bias + 16)) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        _mm256_mask_storeu_epi16(y + r * y_stride, low_mask,
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][0], low_bias)));
        _mm256_mask_storeu_epi16(y + r * y_stride + 16, high_mask,
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][1], high_bias)));
    }
}

static void tile(const uint16_t *x, int64_t x_stride, const uint16_t *w, int k, int rows, const uint16_t *bias,
                 uint16_t *y, int64_t y_stride, int outputs) {
    switch (rows) {  /* each row count compiled apart, so the accumulators stay in registers */
    case 1: tile_rows(x, x_stride, w, k, 1, bias, y, y_stride, outputs); break;
    case 2: tile_rows(x, x_stride, w, k, 2, bias, y, y_stride, outputs); break;
    case 3: tile_rows(x, x_stride, w, k, 3, bias, y, y_stride, outputs); break;
    case 4: tile_rows(x, x_stride, w, k, 4, bias, y, y_stride, outputs); break;
    case 5: tile_rows(x, x_stride, w, k, 5, bias, y, y_stride, outputs); break;
    case 6: tile_rows(x, x_stride, w, k, 6, bias, y, y_stride, outputs); break;
    case 7: tile_rows(x, x_stride, w, k, 7, bias, y, y_stride, outputs); break;
    default: tile_rows(x, x_stride, w, k, ROW_BLOCK, bias, y, y_stride, outputs); break;
    }
}

/* y [m, n] (rows n apart) = x [m, k] (rows x_stride apart) @ weight^T + bias (or none), the weight packed by
 * bf16_pack_weight. Threads take tiles, and within a tile blocks of rows, in order. */
int bf16_matmul(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias, uint16_t *y, int m,
                int n, int k, int threads) {
    const int64_t tile_size = (int64_t)((k + 1) / 2) * 2 * TILE;
    const int tiles = (n + TILE - 1) / TILE, blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int t = 0; t < tiles; t++) {
        for (int b = 0; b < blocks; b++) {
            const int r = b * ROW_BLOCK, rows = m - r < ROW_BLOCK ? m - r : ROW_BLOCK;
            const int outputs = n - t * TILE < TILE ? n - t * TILE : TILE;
            tile(x + r * x_stride, x_stride, packed + t * tile_size, k, rows, bias ? bias + t * TILE : 0,
                 y + (int64_t)r * n + t * TILE, n, outputs);
        }
    }
    return 1;
}

#else  /* no AVX512-BF16 here: linear.py keeps oneDNN or F.linear */

int bf16_matmul_built(void) { return 0; }

int bf16_matmul(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias, uint16_t *y, int m,
                int n, int k, int threads) {
    (void)x, (void)x_stride, (void)packed, (void)bias, (void)y, (void)m, (void)n, (void)k, (void)threads;
    return 0;
}

#endif
