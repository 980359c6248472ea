/* y = x W^T for the CPU, with W kept in 32-wide quantized blocks (GGUF Q4_1 / Q8_0).
 *
 * A decode step multiplies a few dozen rows of activations by every weight of the model. There the
 * weights' bytes, not the arithmetic, bound the matmul (fp32 weights stream from DRAM each step, and
 * BLAS at M=32 reaches about a fifth of the FMA peak). Kept as 4.5 (Q4_1) or 8.5 (Q8_0) bits per
 * weight they are 7x / 3.8x fewer bytes. A register-blocked micro-kernel multiplies MR rows of x by
 * NR weight rows (all accumulators in vector registers), reading the weights dequantized into a small
 * buffer: a whole panel of NR rows, reused by every row tile of x, or for a single row tile (a decode
 * batch) one 32-wide block of them at a time. Fewer than SMALL_ROWS rows of x (decode batches up
 * to a few dozen, where a 32-row tile would mostly multiply padding) take a dot-product path that
 * dequantizes straight into registers and prefetches the weights ahead of itself.
 *
 * Dequantization reproduces gguf's own exactly (the float32 product is rounded before the add, as
 * numpy does it), so the kernel multiplies by bit-identical weights to the dense model's; only the
 * summation order differs from BLAS. block_quant.py packs a layer only if its blocks dequantize to
 * the dense weight bit for bit, and tests/test_block_linear.py checks the kernel against BLAS.
 *
 * Layouts (row n of W, block b = weights 32b .. 32b+31 of that row):
 *   q4_1: qs [N][K/32][16] uint8 (element i in the low nibble of byte i, element 16+i in the high),
 *         d, m [N][K/32] float; w = d * q + m
 *   q8_0: qs [N][K/32][32] int8, d [N][K/32] float; w = d * q
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16          /* floats per vector register */
#define NR 12          /* weight rows per tile: 2 x NR accumulators of 32 registers */
#elif defined(__AVX__)
#define VL 8
#define NR 6
#else                  /* NEON / SSE: 16-byte vectors */
#define VL 4
#define NR 4
#endif
#define MR (2 * VL)    /* rows of x per tile */
#define QBLOCK 32

#if defined(__x86_64__)
#define ROUNDED(v) __asm__("" : "+v"(v))   /* the compiler may not fuse across this into an FMA */
#elif defined(__aarch64__)
#define ROUNDED(v) __asm__("" : "+w"(v))
#else
#error "block_linear.c: no rounding barrier for this architecture"
#endif

enum { QTYPE_Q4_1 = 1, QTYPE_Q8_0 = 2 };

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vf_u __attribute__((vector_size(VL * 4), aligned(4)));   /* no alignment assumed */
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint8_t vu8 __attribute__((vector_size(VL)));

#define BLOCK_VECS (QBLOCK / VL)

/* block b of row `row`, dequantized into out[BLOCK_VECS] (kept in registers when inlined) */
static inline __attribute__((always_inline)) void dequant_block(
    int qtype, const void *w, const float *d, const float *m, int64_t row, int64_t nb, int64_t b,
    vf out[BLOCK_VECS])
{
    const float db = d[row * nb + b];
    if (qtype == QTYPE_Q4_1) {
        const uint8_t *qs = (const uint8_t *)w + (row * nb + b) * (QBLOCK / 2);
        const float mb = m[row * nb + b];
#if VL == 16
        /* The block's 16 possible weights d * q + m (q = 0..15, rounded as below) fill one register,
         * and each weight is looked up from it by its nibble: per block one multiply and one add
         * instead of one per 16 weights, and no int->float conversions. vpermps reads only the low
         * 4 bits of each index lane, so the byte zero-extended to 32 bits indexes its low nibble
         * as it stands, and shifted right by 4 its high one. */
        const vf iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        vf table = iota * db;
        ROUNDED(table);
        table += mb;
        __m128i bytes;
        memcpy(&bytes, qs, sizeof bytes);
        const __m512i lanes = _mm512_cvtepu8_epi32(bytes);
        out[0] = (vf)_mm512_permutexvar_ps(lanes, (__m512)table);
        out[1] = (vf)_mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 4), (__m512)table);
#else
        for (int h = 0; h < QBLOCK / 2; h += VL) {
            vu8 bytes;
            memcpy(&bytes, qs + h, sizeof bytes);
            const vu8 nib[2] = {bytes & 0x0F, bytes >> 4};
            for (int half = 0; half < 2; half++) {
                vf prod = __builtin_convertvector(__builtin_convertvector(nib[half], vi), vf) * db;
                ROUNDED(prod);
                out[(half * (QBLOCK / 2) + h) / VL] = prod + mb;
            }
        }
#endif
    } else {
        const uint8_t *qs = (const uint8_t *)w + (row * nb + b) * QBLOCK;
        for (int h = 0; h < QBLOCK; h += VL) {
            vu8 biased;  /* q + 128: gcc widens unsigned bytes in one instruction */
            memcpy(&biased, qs + h, sizeof biased);
            const vi q = __builtin_convertvector(biased ^ 0x80, vi) - 128;
            out[h / VL] = __builtin_convertvector(q, vf) * db;
        }
    }
}

/* rows [n0, n0 + nr) of W, all K, as float32 into out[nr][K] */
static void dequant_rows(int qtype, const void *w, const float *d, const float *m, int64_t n0,
                         int64_t nr, int64_t K, float *out)
{
    const int64_t nb = K / QBLOCK;
    for (int64_t j = 0; j < nr; j++) {
        float *o = out + j * K;
        for (int64_t b = 0; b < nb; b++) {
            vf v[BLOCK_VECS];
            dequant_block(qtype, w, d, m, n0 + j, nb, b, v);
            memcpy(o + b * QBLOCK, v, sizeof v);
        }
    }
}

/* ask for the blocks of rows [n0, n0 + NR) while this panel is multiplied: a panel's blocks are a
 * short burst of reads that the hardware prefetchers barely ramp up for */
static void prefetch_rows(int qtype, const void *w, const float *d, const float *m, int64_t n0,
                          int64_t N, int64_t K)
{
    const int64_t nb = K / QBLOCK, row_bytes = nb * (qtype == QTYPE_Q4_1 ? QBLOCK / 2 : QBLOCK);
    const int64_t n1 = n0 + NR < N ? n0 + NR : N;
    for (int64_t row = n0; row < n1; row++) {
        const char *q = (const char *)w + row * row_bytes;
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(q + off);
        for (int64_t off = 0; off < nb; off += 16) {
            __builtin_prefetch(d + row * nb + off);
            if (qtype == QTYPE_Q4_1) __builtin_prefetch(m + row * nb + off);
        }
    }
}

/* the same into panel[NR][K], rows nr.. zero (a tile always multiplies NR rows) */
static void dequant_panel(int qtype, const void *w, const float *d, const float *m, int64_t n0,
                          int64_t nr, int64_t K, float *panel)
{
    dequant_rows(qtype, w, d, m, n0, nr, K, panel);
    if (nr < NR) memset(panel + nr * K, 0, (NR - nr) * K * sizeof(float));
}

/* c += rows[NR][k] . xt[k][MR] for k in [0, kn); row j of W at rows + j * ld */
static inline __attribute__((always_inline)) void tile_accumulate(
    vf c0[NR], vf c1[NR], const float *restrict xt, const float *restrict rows, int64_t ld,
    int64_t kn)
{
    for (int64_t k = 0; k < kn; k++) {
        const vf a0 = *(const vf_u *)(xt + k * MR), a1 = *(const vf_u *)(xt + k * MR + VL);
        for (int j = 0; j < NR; j++) {
            const float b = rows[j * ld + k];
            c0[j] += a0 * b;
            c1[j] += a1 * b;
        }
    }
}

static inline __attribute__((always_inline)) void tile_store(const vf c0[NR], const vf c1[NR],
                                                             float *restrict out)
{
    for (int j = 0; j < NR; j++) {
        *(vf *)(out + j * MR) = c0[j];
        *(vf *)(out + j * MR + VL) = c1[j];
    }
}

/* out[NR][MR] = panel[NR][K] . xt[K][MR] */
static inline __attribute__((always_inline)) void tile(const float *restrict xt,
    const float *restrict panel, int64_t K, float *restrict out)
{
    vf c0[NR], c1[NR];
    for (int j = 0; j < NR; j++) c0[j] = c1[j] = (vf){0};
    tile_accumulate(c0, c1, xt, panel, K, K);
    tile_store(c0, c1, out);
}

/* The same for a single row tile (M <= MR, a decode batch): each weight is used once, so instead of
 * a whole dequantized panel, one block of NR rows at a time is dequantized into a small buffer that
 * stays in L1 and multiplied at once, the accumulators staying in registers throughout. */
static inline __attribute__((always_inline)) void tile_fused(
    int qtype, const float *restrict xt, const void *w, const float *d, const float *m,
    int64_t n0, int64_t nr, int64_t K, float *restrict out)
{
    const int64_t nb = K / QBLOCK;
    float buf[NR][QBLOCK] __attribute__((aligned(64)));
    vf c0[NR], c1[NR];
    for (int j = 0; j < NR; j++) c0[j] = c1[j] = (vf){0};
    for (int64_t b = 0; b < nb; b++) {
        for (int j = 0; j < NR; j++) {   /* past the last row: row n0 again, never stored */
            vf v[BLOCK_VECS];
            dequant_block(qtype, w, d, m, n0 + (j < nr ? j : 0), nb, b, v);
            memcpy(buf[j], v, sizeof v);
        }
        tile_accumulate(c0, c1, xt + b * QBLOCK * MR, &buf[0][0], QBLOCK, QBLOCK);
    }
    tile_store(c0, c1, out);
}

/* A few rows of x (batch-1/small-batch decode): the register tile above would multiply mostly
 * padding, so each weight row is instead dotted with each x row along k, dequantized block by block
 * straight into registers. MS rows of x by NS rows of W; acc[r][j] holds VL-lane partial sums.
 * Work is split over groups of SNR rows of W; a group is multiplied by 8 rows of x at a time (as two
 * 8 x 2 tiles: 16 accumulators), then by the 1-7 rows left in one tile, so each weight is
 * dequantized once per 8 rows. */
#define SNR 4
#define PF_ROWS (4 * SNR)  /* how far ahead the dot-product path prefetches (rows of W) */
#if VL == 16
#define SMALL_ROWS 28     /* fewer x rows than this take the dot-product path (from ~28 the tile wins) */
#else
#define SMALL_ROWS 0      /* (narrower vectors: too few registers for its accumulators) */
#endif

static inline float lane_sum(vf v)
{
#if VL == 16
    return _mm512_reduce_add_ps((__m512)v);   /* the same pairwise order, in registers */
#else
    float half[VL / 2];
    for (int width = VL / 2; width >= 1; width /= 2) {   /* pairwise: log2(VL) dependent adds */
        for (int l = 0; l < width; l++) half[l] = v[l] + v[l + width];
        for (int l = 0; l < width; l++) v[l] = half[l];
    }
    return v[0];
#endif
}

/* the dot-product path's prefetch for an MS-row tile (MS a constant: one branch survives) */
#define PREFETCH_SMALL(p, MS) do { if ((MS) == 1) __builtin_prefetch((p), 0, 1); \
                                   else __builtin_prefetch((p)); } while (0)

static inline __attribute__((always_inline)) void small_tile(
    int qtype, const float *x, int64_t K, const void *w, const float *d, const float *m,
    int64_t n0, int64_t nr, int64_t N, float *y, const int MS, const int NS)
{
    const int64_t nb = K / QBLOCK;
    vf acc[8][SNR];   /* fixed sizes: MS x NS of it is used (a variable-length array lives in memory) */
    _Pragma("GCC unroll 16")
    for (int r = 0; r < MS; r++)
        _Pragma("GCC unroll 16")
        for (int j = 0; j < NS; j++) acc[r][j] = (vf){0};
    /* this path is bound by the weights' latency from DRAM (one pass over each byte, few
     * instructions per byte): ask for the rows PF_ROWS ahead, block by block, as these go by.
     * One row of x: into L2 only (PREFETCH_SMALL), as the L1 prefetches queue on the L1's few miss
     * buffers there; with more rows, each weight does several rows' work and L1 prefetches did better. */
    const int64_t pf_row = n0 + PF_ROWS < N ? n0 + PF_ROWS : n0;
    const int64_t block_bytes = qtype == QTYPE_Q4_1 ? QBLOCK / 2 : QBLOCK;
    const char *pf_w = (const char *)w + pf_row * nb * block_bytes;
    for (int64_t b = 0; b < nb; b++) {
        if ((b * block_bytes) % 64 == 0)
            _Pragma("GCC unroll 16")
            for (int j = 0; j < NS; j++) PREFETCH_SMALL(pf_w + (j * nb + b) * block_bytes, MS);
        if (b % 16 == 0)
            _Pragma("GCC unroll 16")
            for (int j = 0; j < NS; j++) {
                PREFETCH_SMALL(d + (pf_row + j) * nb + b, MS);
                if (qtype == QTYPE_Q4_1) PREFETCH_SMALL(m + (pf_row + j) * nb + b, MS);
            }
        vf wv[SNR][BLOCK_VECS];
        _Pragma("GCC unroll 16")
        for (int j = 0; j < NS; j++)   /* past the last row: recompute row n0, never stored */
            dequant_block(qtype, w, d, m, n0 + (j < nr ? j : 0), nb, b, wv[j]);
        _Pragma("GCC unroll 16")
        for (int v = 0; v < BLOCK_VECS; v++)
            _Pragma("GCC unroll 16")
            for (int r = 0; r < MS; r++) {
                vf xv;
                memcpy(&xv, x + r * K + b * QBLOCK + v * VL, sizeof xv);
                _Pragma("GCC unroll 16")
                for (int j = 0; j < NS; j++) acc[r][j] += xv * wv[j][v];
            }
    }
    /* constant bounds only: an index the compiler cannot resolve would put acc in memory */
    _Pragma("GCC unroll 16")
    for (int r = 0; r < MS; r++)
        _Pragma("GCC unroll 16")
        for (int j = 0; j < NS; j++)
            if (j < nr) y[r * N + n0 + j] = lane_sum(acc[r][j]);
}

/* one function per weight type and tile shape, each loop compiled for its constants (no run-time
 * branch on the weight type inside the block loop) */
#define SMALL_ARGS const float *x, int64_t K, const void *w, const float *d, const float *m, \
    int64_t n0, int64_t nr, int64_t N, float *y
typedef void (*small_fn)(SMALL_ARGS);
#define SMALL_DEF(NAME, QT, MS, NS) static __attribute__((noinline)) void NAME(SMALL_ARGS) \
    { small_tile(QT, x, K, w, d, m, n0, nr, N, y, MS, NS); }
SMALL_DEF(q4_1_8x2, QTYPE_Q4_1, 8, 2)
SMALL_DEF(q4_1_7x2, QTYPE_Q4_1, 7, 2)
SMALL_DEF(q4_1_6x2, QTYPE_Q4_1, 6, 2)
SMALL_DEF(q4_1_5x2, QTYPE_Q4_1, 5, 2)
SMALL_DEF(q4_1_4x4, QTYPE_Q4_1, 4, SNR)
SMALL_DEF(q4_1_3x4, QTYPE_Q4_1, 3, SNR)
SMALL_DEF(q4_1_2x4, QTYPE_Q4_1, 2, SNR)
SMALL_DEF(q4_1_1x4, QTYPE_Q4_1, 1, SNR)
SMALL_DEF(q8_0_8x2, QTYPE_Q8_0, 8, 2)
SMALL_DEF(q8_0_7x2, QTYPE_Q8_0, 7, 2)
SMALL_DEF(q8_0_6x2, QTYPE_Q8_0, 6, 2)
SMALL_DEF(q8_0_5x2, QTYPE_Q8_0, 5, 2)
SMALL_DEF(q8_0_4x4, QTYPE_Q8_0, 4, SNR)
SMALL_DEF(q8_0_3x4, QTYPE_Q8_0, 3, SNR)
SMALL_DEF(q8_0_2x4, QTYPE_Q8_0, 2, SNR)
SMALL_DEF(q8_0_1x4, QTYPE_Q8_0, 1, SNR)

/* by rows of x (1-8): tiles up to 4 rows take all SNR weight rows at once, 5-8 rows two at a time
 * (their accumulators would not fit in registers four at a time) */
static const small_fn SMALL_Q4_1[9] = {0, q4_1_1x4, q4_1_2x4, q4_1_3x4, q4_1_4x4,
                                       q4_1_5x2, q4_1_6x2, q4_1_7x2, q4_1_8x2};
static const small_fn SMALL_Q8_0[9] = {0, q8_0_1x4, q8_0_2x4, q8_0_3x4, q8_0_4x4,
                                       q8_0_5x2, q8_0_6x2, q8_0_7x2, q8_0_8x2};

static void block_linear_small(int qtype, const float *x, int64_t M, int64_t K, const void *w,
                               const float *d, const float *m, int64_t N, float *y, int num_threads)
{
    const small_fn *tiles = qtype == QTYPE_Q4_1 ? SMALL_Q4_1 : SMALL_Q8_0;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n0 = 0; n0 < N; n0 += SNR) {
        const int64_t nr = N - n0 < SNR ? N - n0 : SNR;
        /* 8 rows of x at a time, then the rest in one tile of exactly that many rows: each weight
         * is dequantized once per 8 rows (a 5-row rest as 4 + 1 rows would dequantize it twice) */
        for (int64_t r0 = 0; r0 < M; r0 += 8) {
            const int64_t rows = M - r0 < 8 ? M - r0 : 8;
            const small_fn tile_fn = tiles[rows];
            if (rows <= 4)
                tile_fn(x + r0 * K, K, w, d, m, n0, nr, N, y + r0 * N);
            else
                for (int64_t j0 = 0; j0 < nr; j0 += 2)
                    tile_fn(x + r0 * K, K, w, d, m, n0 + j0, nr - j0 < 2 ? nr - j0 : 2, N,
                            y + r0 * N);
        }
    }
}

/* Scratch floats the caller provides (any alignment): the transposed x tiles and one weight panel
 * per thread; none for the dot-product path. */
int64_t block_linear_scratch(int64_t M, int64_t K, int num_threads)
{
    if (M < SMALL_ROWS) return 0;
    if (num_threads < 1) num_threads = 1;
    const int64_t tiles = (M + MR - 1) / MR;
    return tiles * K * MR + (int64_t)num_threads * NR * K;
}

int64_t block_linear_qblock(void) { return QBLOCK; }
int64_t block_linear_small_rows(void) { return SMALL_ROWS; }
int64_t block_linear_tile_rows(void) { return MR; }

/* y[M][N] = x[M][K] W^T. K must be a positive multiple of QBLOCK (the Python side checks). */
void block_linear_f32(int qtype, const float *x, int64_t M, int64_t K,
                      const void *w, const float *d, const float *m, int64_t N,
                      float *y, float *scratch, int num_threads)
{
    if (K <= 0 || K % QBLOCK || M <= 0 || N <= 0) return;
    if (num_threads < 1) num_threads = 1;   /* the scratch holds one panel per thread */
    if (M < SMALL_ROWS) {
        block_linear_small(qtype, x, M, K, w, d, m, N, y, num_threads);
        return;
    }
    const int64_t tiles = (M + MR - 1) / MR;
    float *xt = scratch;                               /* [tiles][K][MR] */
    float *panels = scratch + tiles * K * MR;          /* [threads][NR][K] */
    /* row blocks of x small enough to stay in L2 (>= 1 MiB per core) while the panels pass by */
    int64_t per_block = (1024 * 1024) / (K * MR * (int64_t)sizeof(float));
    if (per_block < 1) per_block = 1;
    const int64_t panels_n = (N + NR - 1) / NR;

#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < tiles; t++)
            for (int64_t k = 0; k < K; k++)
                for (int64_t i = 0; i < MR; i++) {
                    const int64_t row = t * MR + i;
                    xt[(t * K + k) * MR + i] = row < M ? x[row * K + k] : 0.0f;
                }
        float *panel = panels + (int64_t)omp_get_thread_num() * NR * K;
        float out[NR * MR] __attribute__((aligned(64)));
        for (int64_t t0 = 0; t0 < tiles; t0 += per_block) {
            const int64_t t1 = t0 + per_block < tiles ? t0 + per_block : tiles;
#pragma omp for schedule(static)
            for (int64_t p = 0; p < panels_n; p++) {
                const int64_t n0 = p * NR, nr = N - n0 < NR ? N - n0 : NR;
                if (p + 1 < panels_n) prefetch_rows(qtype, w, d, m, n0 + NR, N, K);
                if (tiles > 1) dequant_panel(qtype, w, d, m, n0, nr, K, panel);
                for (int64_t t = t0; t < t1; t++) {
                    if (tiles > 1) tile(xt + t * K * MR, panel, K, out);
                    else tile_fused(qtype, xt, w, d, m, n0, nr, K, out);
                    const int64_t mr = M - t * MR < MR ? M - t * MR : MR;
                    for (int64_t i = 0; i < mr; i++) {
                        float *yr = y + (t * MR + i) * N + n0;
                        for (int64_t j = 0; j < nr; j++)
                            yr[j] = out[j * MR + i];
                    }
                }
            }
        }
    }
}
