/* Decode attention straight from the block-major paged KV cache, for the CPU.
 *
 * One query token per sequence; grouped-query heads share their KV head's reads. Each (sequence,
 * KV head) pair is one OpenMP task that walks the sequence's block table and keeps an online
 * (flash-decoding style) softmax per block, so the KV is read once and never copied into a
 * gathered tensor. It is built by cpu_kernels.py with the compiler found on the machine and shares
 * torch's OpenMP runtime (torch loads libgomp.so.1 first); attention.py's torch path is the
 * reference it is tested against.
 *
 * cache layout (attention.py): [num_blocks, num_layers, block_size, 2, kv_heads, head_dim], of
 * float32, float16 or bfloat16 (the cache's own dtype; each element is widened to float32 as it is
 * read, q and the arithmetic stay float32). A half-width cache halves the bytes a step reads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* glibc's libmvec has vector expf; math.h only declares it under -ffast-math, whose crtfastmath.o
 * would switch the whole process to flush-to-zero. Declare it here instead (linked with -lmvec). */
__attribute__((simd("notinbranch"))) float expf(float);

#define MAX_GROUP 32     /* query heads per KV head */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 128    /* tokens per block */

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* The 16 lanes added pairwise. (An `omp simd` reduction is summed lane by lane in order without
 * -ffast-math: a 16-add chain, which for a 64-wide q . k cost more than the products.) */
static inline float hsum16(v16 acc)
{
#ifdef __AVX512F__   /* the same order in registers (the copies below go through the stack) */
    __m512 a;
    memcpy(&a, &acc, sizeof a);
    return _mm512_reduce_add_ps(a);
#endif
    v8 lo, hi;
    memcpy(&lo, &acc, sizeof lo);
    memcpy(&hi, (const char *)&acc + sizeof lo, sizeof hi);
    const v8 s8 = lo + hi;
    v4 a4, b4;
    memcpy(&a4, &s8, sizeof a4);
    memcpy(&b4, (const char *)&s8 + sizeof a4, sizeof b4);
    const v4 s4 = a4 + b4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* The cache's element types, each read as float32: one element (load1_*) or 16 (load16_*). */
typedef uint16_t bf16_t;   /* bfloat16: the high half of a float32 */
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

static inline float load1_f32(const float *p) { return *p; }
static inline v16 load16_f32(const float *p)
{
    v16 a;
    memcpy(&a, p, sizeof a);
    return a;
}

static inline float load1_bf16(const bf16_t *p)
{
    const uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline v16 load16_bf16(const bf16_t *p)
{
    u16x16 h;
    memcpy(&h, p, sizeof h);
    const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
    v16 f;
    memcpy(&f, &w, sizeof f);
    return f;
}

#ifdef __F16C__   /* float16 through the x86 half-precision conversions (a vector of _Float16
                    * converted with __builtin_convertvector is done element by element by GCC 12) */
#include <immintrin.h>
#define HAVE_F16 1
typedef uint16_t f16_t;
static inline float load1_f16(const f16_t *p) { return _cvtsh_ss(*p); }
static inline v16 load16_f16(const f16_t *p)
{
    v16 f;
#ifdef __AVX512F__
    const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    memcpy(&f, &wide, sizeof f);
#else
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    memcpy(&f, &lo, sizeof lo);
    memcpy((char *)&f + sizeof lo, &hi, sizeof hi);
#endif
    return f;
}
#else
#define HAVE_F16 0
#endif

/* x[0] + ... + x[n-1] */
static inline float sum16(const float *x, int64_t n)
{
    v16 acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16 a;
        memcpy(&a, x + i, sizeof a);
        acc += a;
    }
    float sum = hsum16(acc);
    for (; i < n; i++) sum += x[i];
    return sum;
}

/* One (sequence, KV head) task, for a cache of T read through load1_##SUF / load16_##SUF. Inlined
 * into one small function per head_dim that is a compile-time constant for the common sizes (so the
 * accumulators stay in vector registers); those are kept out of line so an OpenMP thread's stack
 * holds one task's arrays (~48 KiB), not one per variant. */
#define TASK_ARGS(T) const float *qs, float *os, const T *cache, const int64_t *table, int64_t len, \
    int64_t group, int64_t head_dim, int64_t block_size, int64_t token_stride, int64_t block_stride, \
    int64_t layer_offset, int64_t v_offset, float scale
#define TASK_CALL(SUF, D) decode_task_##SUF(qs, os, cache, table, len, group, D, block_size, \
                                            token_stride, block_stride, layer_offset, v_offset, scale)

#define DEFINE_DECODE(T, SUF)                                                                      \
static inline float dot16_##SUF(const float *q, const T *k, int64_t head_dim)                     \
{   /* q . k over head_dim, a multiple of 16 */                                                    \
    v16 acc = {0};                                                                                 \
    for (int64_t d = 0; d < head_dim; d += 16) acc += load16_f32(q + d) * load16_##SUF(k + d);     \
    return hsum16(acc);                                                                            \
}                                                                                                  \
                                                                                                   \
static inline __attribute__((always_inline)) void decode_task_##SUF(TASK_ARGS(T))                 \
{                                                                                                  \
    float acc[MAX_GROUP][MAX_HEAD_DIM];                                                            \
    float m[MAX_GROUP], l[MAX_GROUP], p[MAX_GROUP][MAX_BLOCK];                                     \
    for (int64_t g = 0; g < group; g++) {                                                          \
        m[g] = -INFINITY;                                                                          \
        l[g] = 0.0f;                                                                               \
        for (int64_t d = 0; d < head_dim; d++) acc[g][d] = 0.0f;                                   \
    }                                                                                              \
    for (int64_t start = 0; start < len; start += block_size) {                                    \
        const int64_t n = len - start < block_size ? len - start : block_size;                     \
        const T *kv = cache + table[start / block_size] * block_stride + layer_offset;             \
        if (start + block_size < len) {                                                            \
            /* the KV is read from DRAM (a step's cache does not fit in L3): ask for the next      \
             * block's rows of this head while this block is computed, into L2 (locality 1): a     \
             * block's worth of L1 prefetches (128 lines for head_dim 64) overflows the L1's few   \
             * miss buffers, and did hardly better than none (README, CPU kernels) */              \
            const T *next = cache + table[start / block_size + 1] * block_stride + layer_offset;   \
            for (int64_t t = 0; t < block_size; t++)                                               \
                for (int64_t d = 0; d < head_dim; d += 64 / (int64_t)sizeof(T)) {                   \
                    __builtin_prefetch(next + t * token_stride + d, 0, 1);                         \
                    __builtin_prefetch(next + t * token_stride + v_offset + d, 0, 1);              \
                }                                                                                  \
        }                                                                                          \
        for (int64_t g = 0; g < group; g++) {                                                      \
            const float *qg = qs + g * head_dim;                                                   \
            float block_max = -INFINITY;                                                           \
            for (int64_t t = 0; t < n; t++) {                                                      \
                const T *k = kv + t * token_stride;                                                \
                float dot = 0.0f;                                                                  \
                if (head_dim % 16 == 0) {                                                          \
                    dot = dot16_##SUF(qg, k, head_dim);                                            \
                } else {                                                                           \
                    _Pragma("omp simd reduction(+ : dot)")                                         \
                    for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * load1_##SUF(k + d);      \
                }                                                                                  \
                p[g][t] = dot * scale;                                                             \
                block_max = p[g][t] > block_max ? p[g][t] : block_max;                             \
            }                                                                                      \
            const float new_max = block_max > m[g] ? block_max : m[g];                             \
            const float correction = expf(m[g] - new_max);  /* 0 on the first block */             \
            m[g] = new_max;                                                                        \
            _Pragma("omp simd")                                                                    \
            for (int64_t t = 0; t < n; t++) p[g][t] = expf(p[g][t] - new_max);                     \
            l[g] = l[g] * correction + sum16(p[g], n);                                             \
            float *a = acc[g];                                                                     \
            _Pragma("omp simd")                                                                    \
            for (int64_t d = 0; d < head_dim; d++) a[d] *= correction;                             \
            for (int64_t t = 0; t < n; t++) {                                                      \
                const T *v = kv + t * token_stride + v_offset;                                     \
                const float w = p[g][t];                                                           \
                if (head_dim % 16 == 0) {                                                          \
                    for (int64_t d = 0; d < head_dim; d += 16) {                                   \
                        const v16 sum = load16_f32(a + d) + w * load16_##SUF(v + d);               \
                        memcpy(a + d, &sum, sizeof sum);                                           \
                    }                                                                              \
                } else {                                                                           \
                    _Pragma("omp simd")                                                            \
                    for (int64_t d = 0; d < head_dim; d++) a[d] += w * load1_##SUF(v + d);         \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int64_t g = 0; g < group; g++) {                                                          \
        float *o = os + g * head_dim;                                                              \
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;                                        \
        for (int64_t d = 0; d < head_dim; d++) o[d] = acc[g][d] * inv;                             \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
static __attribute__((noinline)) void decode_##SUF##_d64(TASK_ARGS(T))                            \
{ (void)head_dim; TASK_CALL(SUF, 64); }                                                            \
static __attribute__((noinline)) void decode_##SUF##_d128(TASK_ARGS(T))                           \
{ (void)head_dim; TASK_CALL(SUF, 128); }                                                           \
static __attribute__((noinline)) void decode_##SUF##_any(TASK_ARGS(T)) { TASK_CALL(SUF, head_dim); } \
                                                                                                   \
void paged_decode_attention_##SUF(                                                                 \
    const float *q,           /* [num_seqs, num_heads, head_dim] */                                \
    float *out,               /* [num_seqs, num_heads, head_dim] */                                \
    const T *cache,                                                                                \
    const int64_t *block_tables, int64_t table_width,   /* [num_seqs, table_width] */              \
    const int64_t *context_lens,                        /* [num_seqs] */                           \
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,                   \
    int64_t block_size, int64_t num_layers, int64_t layer, float scale, int num_threads)           \
{                                                                                                  \
    const int64_t group = num_heads / num_kv_heads;                                                \
    const int64_t token_stride = 2 * num_kv_heads * head_dim;                                      \
    const int64_t layer_stride = block_size * token_stride;                                        \
    const int64_t block_stride = num_layers * layer_stride;                                        \
    const int64_t v_offset = num_kv_heads * head_dim;                                              \
    /* tasks taken as threads come free: one long context (a newcomer's prompt) beside short ones  \
     * would leave a static split's other thread idle */                                          \
    _Pragma("omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)")             \
    for (int64_t s = 0; s < num_seqs; s++) {                                                       \
        for (int64_t h = 0; h < num_kv_heads; h++) {                                               \
            const int64_t first = s * num_heads + h * group;                                       \
            const float *qs = q + first * head_dim;                                                \
            float *os = out + first * head_dim;                                                    \
            const int64_t *table = block_tables + s * table_width;                                 \
            const int64_t layer_offset = layer * layer_stride + h * head_dim;                      \
            void (*task)(TASK_ARGS(T)) = head_dim == 64 ? decode_##SUF##_d64                       \
                                       : head_dim == 128 ? decode_##SUF##_d128 : decode_##SUF##_any; \
            task(qs, os, cache, table, context_lens[s], group, head_dim, block_size, token_stride, \
                 block_stride, layer_offset, v_offset, scale);                                     \
        }                                                                                          \
    }                                                                                              \
}

DEFINE_DECODE(float, f32)
DEFINE_DECODE(bf16_t, bf16)
#if HAVE_F16
DEFINE_DECODE(f16_t, f16)
#endif

/* limits the Python side checks before calling */
int64_t paged_decode_max_group(void) { return MAX_GROUP; }
int64_t paged_decode_max_head_dim(void) { return MAX_HEAD_DIM; }
int64_t paged_decode_max_block(void) { return MAX_BLOCK; }
