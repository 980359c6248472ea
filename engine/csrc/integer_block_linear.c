/* y = x W^T for the CPU with W in GGUF blocks (Q4_1 / Q8_0) and x quantized on the fly to 16- or
 * 8-bit integers, multiplied by integer dot products: the engine's `matmul_activations` int16 and
 * int8 (int8 is llama.cpp's way of multiplying these formats).
 *
 * block_linear.c multiplies float activations by the weights dequantized to float32, and from about
 * 8 rows of x on it runs near this CPU's float32 FMA peak: compute, not the weights' bytes, bounds
 * it. Here each row of x is quantized per 32-wide block to integer codes with one float scale (the
 * block's largest magnitude maps to 32767 or 127, codes rounded to nearest even), and a block of a
 * weight row times a block of x is one exact integer dot product of the codes, scaled once:
 *   q4_1 (w = d q + m):  sum_k w_k x_k ~ d dx * sum(q xq) + m * (dx * sum(xq))
 *   q8_0 (w = d q):      sum_k w_k x_k ~ d dx * sum(q xq)
 * With AVX512-VNNI one instruction does 32 (vpdpwssd, 16-bit) or 64 (vpdpbusd, 8-bit) of these
 * products, against 16 per float32 FMA. For that the weights are interleaved 16 rows at a time
 * (`interleave` in interleaved_blocks.py; rows past N are zero):
 *   q4_1: qs [G][K/32][4][16][4] uint8: byte (p, r, e) holds row r's code 8p+e in its low nibble
 *         and code 8p+4+e in its high one; d, m [G][K/32][16] float
 *   q8_0: qs [G][K/32][8][16][4] uint8: byte (c, r, e) is row r's code 4c+e plus 128 (vpdpbusd
 *         multiplies unsigned by signed bytes; the 128 sum(xq) that adds is taken off exactly);
 *         d [G][K/32][16] float
 * 8-bit: four codes of 16 rows against four of x broadcast, one vpdpbusd. 16-bit: the same bytes
 * widened to words, 8 rows x 4 codes per vector (two lanes a row), against four 16-bit codes of x
 * broadcast; the two lanes of a row are added before the block's scale.
 * Every output takes the same sequence of float operations whatever the number of rows of x, the
 * threads or the build (the integer sums are exact, and the portable path below, compiled without
 * VNNI or with -DPORTABLE, does the same fused multiply-adds in the same order), so a sequence's
 * result does not depend on what it is batched with. Against float activations the error is that
 * of the codes: about 2e-5 of a matmul's output for 16 bits, 0.6% for 8
 * (tests/test_integer_block_linear.py checks both against a reference of this arithmetic and
 * against the float matmul).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(PORTABLE)
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

/* The codes of x, per row and block: scale, the codes' sum, scale * sum, and the codes (int8_t or
 * int16_t, by bits) */
typedef struct {
    float *scale, *scaled_sum;
    int32_t *sum;
    void *codes;
} Codes;

static Codes codes_in(float *scratch, int64_t M, int64_t nb)
{
    return (Codes){scratch, scratch + M * nb, (int32_t *)(scratch + 2 * M * nb), scratch + 3 * M * nb};
}

/* x row block i (of 32) -> its codes. A scale too small to invert in float32 (a block of ~0) gives
 * all-zero codes; a block holding a NaN or an infinity gives a NaN scale (and zero codes), so the
 * outputs of its row are NaN, as float activations would make them, on either path. */
static void quantize_block(const float *x, int bits, Codes c, int64_t i)
{
    const float top = bits == 16 ? 32767.0f : 127.0f;
#if VNNI
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    const int finite = !nan && isfinite(amax);
#else
    float amax = 0.0f;
    int finite = 1;
    for (int k = 0; k < QBLOCK; k++) {
        amax = fmaxf(amax, fabsf(x[k]));
        finite &= isfinite(x[k]) != 0;
    }
#endif
    if (!finite) {
        memset((char *)c.codes + i * QBLOCK * (bits / 8), 0, QBLOCK * (bits / 8));
        c.scale[i] = c.scaled_sum[i] = NAN;
        c.sum[i] = 0;
        return;
    }
    const float d = amax / top, id = d > 1e-30f ? 1.0f / d : 0.0f;
#if VNNI
    /* cvtps rounds by MXCSR: to nearest even, as lrintf below */
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
    if (bits == 16) {
        int16_t *q = (int16_t *)c.codes + i * QBLOCK;
        _mm256_storeu_si256((__m256i *)q, _mm512_cvtsepi32_epi16(qa));
        _mm256_storeu_si256((__m256i *)(q + 16), _mm512_cvtsepi32_epi16(qb));
    } else {
        int8_t *q = (int8_t *)c.codes + i * QBLOCK;
        _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    }
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
    int32_t sum = 0;
    for (int k = 0; k < QBLOCK; k++) {
        long v = lrintf(x[k] * id);
        v = v > (long)top ? (long)top : v < -(long)top - 1 ? -(long)top - 1 : v;
        if (bits == 16) ((int16_t *)c.codes)[i * QBLOCK + k] = (int16_t)v;
        else ((int8_t *)c.codes)[i * QBLOCK + k] = (int8_t)v;
        sum += (int32_t)v;
    }
#endif
    c.scale[i] = d;
    c.sum[i] = sum;
    c.scaled_sum[i] = d * (float)sum;
}

#if VNNI
/* the block's 16 int32 sums (one per weight row) -> acc += sums * (d dx) (+ m * dx sum(xq)) */
static inline __attribute__((always_inline)) __m512 scale_block(int qtype, __m512 acc, __m512i s,
                                                                __m512 dv, const float *m, float dx,
                                                                float scaled_sum)
{
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(dx)), acc);
    if (qtype == QTYPE_Q4_1)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(m), _mm512_set1_ps(scaled_sum), acc);
    return acc;
}

/* One block of one group of 16 weight rows (blk) times block b of rows [0, MS) of x: s[r] gets row
 * r's 16 exact integer sums, one per weight row. MS is a constant in each instance (the vectors stay
 * in registers). 8-bit codes: four codes of the 16 rows against four of x broadcast, one vpdpbusd. */
static inline __attribute__((always_inline)) void block_sums8(
    int qtype, const uint8_t *blk, Codes c, int64_t K, int64_t nb, int64_t b, __m512i s[MR],
    const int MS)
{
    const int8_t *xq = c.codes;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
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
        for (int q = 0; q < 8; q++) wv[q] = _mm512_loadu_si512(blk + 64 * q);
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MS; r++) {
        int32_t xr[8];
        memcpy(xr, xq + r * K + b * QBLOCK, sizeof xr);
        /* two chains of four (the integer sum is exact in any order) */
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        _Pragma("GCC unroll 4")
        for (int q = 0; q < 4; q++) {
            s0 = _mm512_dpbusd_epi32(s0, wv[q], _mm512_set1_epi32(xr[q]));
            s1 = _mm512_dpbusd_epi32(s1, wv[q + 4], _mm512_set1_epi32(xr[q + 4]));
        }
        s[r] = _mm512_add_epi32(s0, s1);
        if (qtype == QTYPE_Q8_0)   /* the codes were stored + 128: take 128 sum(xq) back off */
            s[r] = _mm512_sub_epi32(s[r], _mm512_set1_epi32(128 * c.sum[r * nb + b]));
    }
}

/* The same with 16-bit codes of x: each 64-byte vector of four codes of 16 rows is widened to two
 * vectors of words (rows 0-7 and 8-15, a row's four codes in two int32 lanes) for vpdpwssd; a row's
 * two lanes are added at the end. */
static inline __attribute__((always_inline)) void block_sums16(
    int qtype, const uint8_t *blk, Codes c, int64_t K, int64_t nb, int64_t b, __m512i s[MR],
    const int MS)
{
    (void)nb;
    const int16_t *xq = c.codes;
    const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    __m512i s0[MR], s1[MR];   /* rows 0-7 / 8-15 of the group, two lanes a row */
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MS; r++) s0[r] = s1[r] = _mm512_setzero_si512();
    _Pragma("GCC unroll 8")
    for (int q = 0; q < 8; q++) {   /* codes 4q..4q+3 of the 16 rows */
        __m512i w0, w1;
        if (qtype == QTYPE_Q4_1) {
            const __m512i v = _mm512_loadu_si512(blk + 64 * (q / 2));
            const __m512i bytes = _mm512_and_si512(q % 2 ? _mm512_srli_epi16(v, 4) : v, low4);
            w0 = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(bytes));
            w1 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        } else {   /* back to signed codes: the 16-bit products need no correction */
            const __m512i bytes = _mm512_xor_si512(_mm512_loadu_si512(blk + 64 * q), flip);
            w0 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes));
            w1 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        }
        _Pragma("GCC unroll 8")
        for (int r = 0; r < MS; r++) {
            int64_t xr;
            memcpy(&xr, xq + r * K + b * QBLOCK + 4 * q, sizeof xr);
            const __m512i xv = _mm512_set1_epi64(xr);
            s0[r] = _mm512_dpwssd_epi32(s0[r], w0, xv);
            s1[r] = _mm512_dpwssd_epi32(s1[r], w1, xv);
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MS; r++) {
        const __m512i p0 = _mm512_add_epi32(s0[r], _mm512_srli_epi64(s0[r], 32));
        const __m512i p1 = _mm512_add_epi32(s1[r], _mm512_srli_epi64(s1[r], 32));
        s[r] = _mm512_permutex2var_epi32(p0, evens, p1);   /* rows 0..15 */
    }
}

/* rows [0, MS) of x (`bits`-bit codes) times one group of 16 weight rows; y[r][0..nr) stored */
static inline __attribute__((always_inline)) void tile(
    int bits, int qtype, const uint8_t *qs, const float *d, const float *m, int64_t nb, Codes c,
    int64_t K, float *y, int64_t N, int nr, const int MS)
{
    __m512 acc[MR];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MS; r++) acc[r] = _mm512_setzero_ps();
    const int64_t gb = group_bytes(qtype);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = qs + b * gb;
        /* the group's blocks are one sequential stream: ask for the bytes 8 blocks on into L2 */
        for (int64_t off = 0; off < gb; off += 64) __builtin_prefetch(blk + 8 * gb + off, 0, 1);
        __m512i s[MR];
        if (bits == 16) block_sums16(qtype, blk, c, K, nb, b, s, MS);
        else block_sums8(qtype, blk, c, K, nb, b, s, MS);
        const __m512 dv = _mm512_loadu_ps(d + b * GROUP);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < MS; r++)
            acc[r] = scale_block(qtype, acc[r], s[r], dv, m + b * GROUP, c.scale[r * nb + b],
                                 c.scaled_sum[r * nb + b]);
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MS; r++) _mm512_mask_storeu_ps(y + r * N, keep, acc[r]);
}

#define TILE_ARGS const uint8_t *qs, const float *d, const float *m, int64_t nb, Codes c, int64_t K, \
    float *y, int64_t N, int nr
typedef void (*tile_fn)(TILE_ARGS);
#define TILE_DEF(BITS, QT, MS) static __attribute__((noinline)) void tile##BITS##_##QT##_##MS(TILE_ARGS) \
    { tile(BITS, QT, qs, d, m, nb, c, K, y, N, nr, MS); }
#define TILES(BITS, QT) TILE_DEF(BITS, QT, 1) TILE_DEF(BITS, QT, 2) TILE_DEF(BITS, QT, 3) \
    TILE_DEF(BITS, QT, 4) TILE_DEF(BITS, QT, 5) TILE_DEF(BITS, QT, 6) TILE_DEF(BITS, QT, 7) \
    TILE_DEF(BITS, QT, 8) \
    static const tile_fn TILES##BITS##_##QT[MR + 1] = {0, tile##BITS##_##QT##_1, tile##BITS##_##QT##_2, \
        tile##BITS##_##QT##_3, tile##BITS##_##QT##_4, tile##BITS##_##QT##_5, tile##BITS##_##QT##_6, \
        tile##BITS##_##QT##_7, tile##BITS##_##QT##_8};
TILES(8, 1) TILES(8, 2) TILES(16, 1) TILES(16, 2)   /* QT: QTYPE_Q4_1, QTYPE_Q8_0 */

static void group_rows(int bits, int qtype, TILE_ARGS, int rows)
{
    const tile_fn *tiles = bits == 16 ? (qtype == QTYPE_Q4_1 ? TILES16_1 : TILES16_2)
                                      : (qtype == QTYPE_Q4_1 ? TILES8_1 : TILES8_2);
    tiles[rows](qs, d, m, nb, c, K, y, N, nr);
}
#else
/* portable: the same operations, one output at a time (fmaf is the fused multiply-add above; the
 * integer sums are the same numbers however they are formed) */
static void group_rows(int bits, int qtype, const uint8_t *qs, const float *d, const float *m,
                       int64_t nb, Codes c, int64_t K, float *y, int64_t N, int nr, int rows)
{
    const int64_t gb = group_bytes(qtype);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < nr; j++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = qs + b * gb;
                int32_t s = 0;
                for (int k = 0; k < QBLOCK; k++) {
                    const int q = k / 4, e = k % 4;
                    int w;
                    if (qtype == QTYPE_Q4_1) {
                        const uint8_t byte = blk[64 * (q / 2) + 4 * j + e];
                        w = q % 2 ? byte >> 4 : byte & 0x0F;
                    } else {
                        w = (int)blk[64 * q + 4 * j + e] - 128;
                    }
                    const int64_t at = (r * K) + b * QBLOCK + k;
                    s += w * (bits == 16 ? ((const int16_t *)c.codes)[at] : ((const int8_t *)c.codes)[at]);
                }
                const float dx = c.scale[r * nb + b];
                acc = fmaf((float)s, d[b * GROUP + j] * dx, acc);
                if (qtype == QTYPE_Q4_1) acc = fmaf(m[b * GROUP + j], c.scaled_sum[r * nb + b], acc);
            }
            y[r * N + j] = acc;
        }
}
#endif

/* Scratch floats the caller provides (4-byte aligned): x's codes, scales and sums. */
static int64_t scratch_floats(int bits, int64_t M, int64_t K)
{
    return 3 * M * (K / QBLOCK) + (M * K * (bits / 8) + 3) / 4;
}

static void integer_block_linear(int bits, int qtype, const float *x, int64_t M, int64_t K,
                                 const void *w, const float *d, const float *m, int64_t N, float *y,
                                 float *scratch, int num_threads)
{
    if (K <= 0 || K % QBLOCK || M <= 0 || N <= 0) return;
    if (num_threads < 1) num_threads = 1;
    const int64_t nb = K / QBLOCK, groups = (N + GROUP - 1) / GROUP, gb = group_bytes(qtype);
    const Codes c = codes_in(scratch, M, nb);
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * nb; i++) quantize_block(x + i * QBLOCK, bits, c, i);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int nr = N - g * GROUP < GROUP ? (int)(N - g * GROUP) : GROUP;
            const uint8_t *qs = (const uint8_t *)w + g * nb * gb;
            const float *dg = d + g * nb * GROUP, *mg = m + g * nb * GROUP;
            for (int64_t r0 = 0; r0 < M; r0 += MR) {
                const int rows = M - r0 < MR ? (int)(M - r0) : MR;
                const Codes cr = {c.scale + r0 * nb, c.scaled_sum + r0 * nb, c.sum + r0 * nb,
                                  (char *)c.codes + r0 * K * (bits / 8)};
                group_rows(bits, qtype, qs, dg, mg, nb, cr, K, y + r0 * N + g * GROUP, N, nr, rows);
            }
        }
    }
}

int64_t integer_block_linear_group(void) { return GROUP; }
int64_t integer_block_linear_qblock(void) { return QBLOCK; }
int64_t integer_block_linear_vnni(void) { return VNNI; }
int64_t int16_block_linear_scratch(int64_t M, int64_t K, int num_threads)
{
    (void)num_threads;
    return scratch_floats(16, M, K);
}
int64_t int8_block_linear_scratch(int64_t M, int64_t K, int num_threads)
{
    (void)num_threads;
    return scratch_floats(8, M, K);
}

/* y[M][N] = x[M][K] W^T, W interleaved as above; the signature of block_linear_f32 (the one-call
 * decode step calls any of them). K must be a positive multiple of QBLOCK. */
void int16_block_linear(int qtype, const float *x, int64_t M, int64_t K, const void *w,
                        const float *d, const float *m, int64_t N, float *y, float *scratch,
                        int num_threads)
{
    integer_block_linear(16, qtype, x, M, K, w, d, m, N, y, scratch, num_threads);
}

void int8_block_linear(int qtype, const float *x, int64_t M, int64_t K, const void *w,
                       const float *d, const float *m, int64_t N, float *y, float *scratch,
                       int num_threads)
{
    integer_block_linear(8, qtype, x, M, K, w, d, m, N, y, scratch, num_threads);
}
