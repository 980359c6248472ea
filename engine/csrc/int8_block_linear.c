/* y = x W^T for the CPU with W in GGUF blocks (Q4_1 / Q8_0) and x quantized to int8 on the fly,
 * multiplied on integer dot products: the engine's `matmul_activations: int8` (llama.cpp's way of
 * multiplying these formats).
 *
 * block_linear.c multiplies float activations by the weights dequantized to float32, and from about
 * 8 rows of x on it runs near this CPU's float32 FMA peak: compute, not the weights' bytes, bounds
 * it. Here each row of x is quantized per 32-wide block to int8 codes with one float scale (the
 * block's largest magnitude maps to 127, codes rounded to nearest even), and a block of a weight row
 * times a block of x is one exact integer dot product of the codes, scaled once:
 *   q4_1 (w = d q + m):  sum_k w_k x_k ~ d dx * sum(q xq) + m * (dx * sum(xq))
 *   q8_0 (w = d q):      sum_k w_k x_k ~ d dx * sum(q xq)
 * With AVX512-VNNI, one vpdpbusd does 64 byte products: four consecutive k of 16 weight rows against
 * four codes of x broadcast. For that the weights are interleaved 16 rows at a time (`interleave` in
 * int8_blocks.py; rows past N are zero):
 *   q4_1: qs [G][K/32][4][16][4] uint8: byte (p, r, e) holds row r's code 8p+e in its low nibble
 *         and code 8p+4+e in its high one; d, m [G][K/32][16] float
 *   q8_0: qs [G][K/32][8][16][4] uint8: byte (c, r, e) is row r's code 4c+e plus 128 (vpdpbusd
 *         multiplies unsigned by signed bytes; the 128 sum(xq) it adds is taken off exactly);
 *         d [G][K/32][16] float
 * Every output takes the same sequence of float operations whatever the number of rows of x, the
 * threads or the build (the integer sums are exact, and the portable path below does the same fused
 * multiply-adds in the same order), so a sequence's result does not depend on what it is batched
 * with. The error against float activations is that of the int8 codes (about 0.4% of a matmul's
 * output here); tests/test_int8_block_linear.py checks the kernel against a torch reference of this
 * arithmetic and against the float matmul.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define VNNI 1
#else
#define VNNI 0
#endif

#define QBLOCK 32
#define GROUP 16       /* weight rows interleaved together: one vector of int32 sums */
#define MR 8           /* rows of x a tile multiplies at once */

enum { QTYPE_Q4_1 = 1, QTYPE_Q8_0 = 2 };

static int64_t group_bytes(int qtype) { return qtype == QTYPE_Q4_1 ? GROUP * QBLOCK / 2 : GROUP * QBLOCK; }

/* x row block -> 32 int8 codes, its scale, the codes' sum and scale * sum. A scale too small to
 * invert in float32 (a block of ~0) gives all-zero codes. */
static void quantize_block(const float *x, int8_t *q, float *scale, int32_t *code_sum,
                           float *scaled_sum)
{
#if VNNI
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.0f, id = d > 1e-30f ? 1.0f / d : 0.0f;
    /* cvtps rounds by MXCSR: to nearest even, as lrintf below */
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
    float amax = 0.0f;
    for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f, id = d > 1e-30f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < QBLOCK; i++) {
        long v = lrintf(x[i] * id);
        v = v > 127 ? 127 : v < -128 ? -128 : v;
        q[i] = (int8_t)v;
        sum += (int32_t)v;
    }
#endif
    *scale = d;
    *code_sum = sum;
    *scaled_sum = d * (float)sum;
}

#if VNNI
/* rows [0, MS) of x (codes xq [MS][K], scales xd/xs [MS][nb]) times one group of 16 weight rows;
 * y[r][0..nr) stored. MS is a constant in each instance (the accumulators stay in registers). */
static inline __attribute__((always_inline)) void group_tile(
    int qtype, const uint8_t *qs, const float *d, const float *m, int64_t nb, const int8_t *xq,
    const float *xd, const int32_t *xi, const float *xs, int64_t K, float *y, int64_t N, int nr,
    const int MS)
{
    __m512 acc[MR];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MS; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int64_t gb = group_bytes(qtype);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = qs + b * gb;
        /* the group's blocks are one sequential stream: ask for the bytes 8 blocks on into L2 */
        for (int64_t off = 0; off < gb; off += 64) __builtin_prefetch(blk + 8 * gb + off, 0, 1);
        __m512i wv[8];
        if (qtype == QTYPE_Q4_1) {
            _Pragma("GCC unroll 4")
            for (int p = 0; p < 4; p++) {
                const __m512i v = _mm512_loadu_si512(blk + 64 * p);
                wv[2 * p] = _mm512_and_si512(v, low4);
                wv[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
        } else {
            _Pragma("GCC unroll 8")
            for (int c = 0; c < 8; c++) wv[c] = _mm512_loadu_si512(blk + 64 * c);
        }
        const __m512 dv = _mm512_loadu_ps(d + b * GROUP);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < MS; r++) {
            int32_t xr[8];
            memcpy(xr, xq + r * K + b * QBLOCK, sizeof xr);
            /* two chains of four (the integer sum is exact in any order) */
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            _Pragma("GCC unroll 4")
            for (int c = 0; c < 4; c++) {
                s0 = _mm512_dpbusd_epi32(s0, wv[c], _mm512_set1_epi32(xr[c]));
                s1 = _mm512_dpbusd_epi32(s1, wv[c + 4], _mm512_set1_epi32(xr[c + 4]));
            }
            __m512i s = _mm512_add_epi32(s0, s1);
            const float dx = xd[r * nb + b];
            if (qtype == QTYPE_Q8_0)   /* the codes were stored + 128: take 128 sum(xq) back off */
                s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * xi[r * nb + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(dx)),
                                     acc[r]);
            if (qtype == QTYPE_Q4_1)
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(m + b * GROUP),
                                         _mm512_set1_ps(xs[r * nb + b]), acc[r]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MS; r++) _mm512_mask_storeu_ps(y + r * N, keep, acc[r]);
}

#define TILE_ARGS const uint8_t *qs, const float *d, const float *m, int64_t nb, const int8_t *xq, \
    const float *xd, const int32_t *xi, const float *xs, int64_t K, float *y, int64_t N, int nr
typedef void (*tile_fn)(TILE_ARGS);
#define TILE_DEF(NAME, QT, MS) static __attribute__((noinline)) void NAME(TILE_ARGS) \
    { group_tile(QT, qs, d, m, nb, xq, xd, xi, xs, K, y, N, nr, MS); }
TILE_DEF(q4_1_1, QTYPE_Q4_1, 1) TILE_DEF(q4_1_2, QTYPE_Q4_1, 2) TILE_DEF(q4_1_3, QTYPE_Q4_1, 3)
TILE_DEF(q4_1_4, QTYPE_Q4_1, 4) TILE_DEF(q4_1_5, QTYPE_Q4_1, 5) TILE_DEF(q4_1_6, QTYPE_Q4_1, 6)
TILE_DEF(q4_1_7, QTYPE_Q4_1, 7) TILE_DEF(q4_1_8, QTYPE_Q4_1, 8)
TILE_DEF(q8_0_1, QTYPE_Q8_0, 1) TILE_DEF(q8_0_2, QTYPE_Q8_0, 2) TILE_DEF(q8_0_3, QTYPE_Q8_0, 3)
TILE_DEF(q8_0_4, QTYPE_Q8_0, 4) TILE_DEF(q8_0_5, QTYPE_Q8_0, 5) TILE_DEF(q8_0_6, QTYPE_Q8_0, 6)
TILE_DEF(q8_0_7, QTYPE_Q8_0, 7) TILE_DEF(q8_0_8, QTYPE_Q8_0, 8)
static const tile_fn TILES_Q4_1[MR + 1] = {0, q4_1_1, q4_1_2, q4_1_3, q4_1_4, q4_1_5, q4_1_6,
                                           q4_1_7, q4_1_8};
static const tile_fn TILES_Q8_0[MR + 1] = {0, q8_0_1, q8_0_2, q8_0_3, q8_0_4, q8_0_5, q8_0_6,
                                           q8_0_7, q8_0_8};
#else
/* portable: the same operations, one output at a time (fmaf is the fused multiply-add above) */
static void group_rows(int qtype, const uint8_t *qs, const float *d, const float *m, int64_t nb,
                       const int8_t *xq, const float *xd, const int32_t *xi, const float *xs,
                       int64_t K, float *y, int64_t N, int nr, int rows)
{
    const int64_t gb = group_bytes(qtype);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < nr; j++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = qs + b * gb;
                const int8_t *x = xq + r * K + b * QBLOCK;
                int32_t s = 0;
                for (int k = 0; k < QBLOCK; k++) {
                    const int c = k / 4, e = k % 4;
                    int w;
                    if (qtype == QTYPE_Q4_1) {
                        const uint8_t byte = blk[64 * (c / 2) + 4 * j + e];
                        w = c % 2 ? byte >> 4 : byte & 0x0F;
                    } else {
                        w = blk[64 * c + 4 * j + e];
                    }
                    s += w * x[k];
                }
                const float dx = xd[r * nb + b];
                if (qtype == QTYPE_Q8_0) s -= 128 * xi[r * nb + b];
                acc = fmaf((float)s, d[b * GROUP + j] * dx, acc);
                if (qtype == QTYPE_Q4_1) acc = fmaf(m[b * GROUP + j], xs[r * nb + b], acc);
            }
            y[r * N + j] = acc;
        }
}
#endif

/* Scratch floats the caller provides (4-byte aligned): x's codes, scales and sums. */
int64_t int8_block_linear_scratch(int64_t M, int64_t K, int num_threads)
{
    (void)num_threads;
    const int64_t nb = K / QBLOCK;
    return 3 * M * nb + (M * K + 3) / 4;
}

int64_t int8_block_linear_group(void) { return GROUP; }
int64_t int8_block_linear_qblock(void) { return QBLOCK; }
int64_t int8_block_linear_vnni(void) { return VNNI; }

/* y[M][N] = x[M][K] W^T, W interleaved as above; the same signature as block_linear_f32 (the
 * one-call decode step calls either). K must be a positive multiple of QBLOCK. */
void int8_block_linear(int qtype, const float *x, int64_t M, int64_t K, const void *w,
                       const float *d, const float *m, int64_t N, float *y, float *scratch,
                       int num_threads)
{
    if (K <= 0 || K % QBLOCK || M <= 0 || N <= 0) return;
    if (num_threads < 1) num_threads = 1;
    const int64_t nb = K / QBLOCK, groups = (N + GROUP - 1) / GROUP, gb = group_bytes(qtype);
    float *xd = scratch, *xs = scratch + M * nb;
    int32_t *xi = (int32_t *)(scratch + 2 * M * nb);
    int8_t *xq = (int8_t *)(scratch + 3 * M * nb);
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * nb; i++)
            quantize_block(x + i * QBLOCK, xq + i * QBLOCK, xd + i, xi + i, xs + i);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int nr = N - g * GROUP < GROUP ? (int)(N - g * GROUP) : GROUP;
            const uint8_t *qs = (const uint8_t *)w + g * nb * gb;
            const float *dg = d + g * nb * GROUP, *mg = m + g * nb * GROUP;
            for (int64_t r0 = 0; r0 < M; r0 += MR) {
                const int rows = M - r0 < MR ? (int)(M - r0) : MR;
#if VNNI
                const tile_fn tile = (qtype == QTYPE_Q4_1 ? TILES_Q4_1 : TILES_Q8_0)[rows];
                tile(qs, dg, mg, nb, xq + r0 * K, xd + r0 * nb, xi + r0 * nb, xs + r0 * nb, K,
                     y + r0 * N + g * GROUP, N, nr);
#else
                group_rows(qtype, qs, dg, mg, nb, xq + r0 * K, xd + r0 * nb, xi + r0 * nb,
                           xs + r0 * nb, K,
                           y + r0 * N + g * GROUP, N, nr, rows);
#endif
            }
        }
    }
}
