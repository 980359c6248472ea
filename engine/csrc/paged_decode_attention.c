/* Decode attention straight from the block-major paged KV cache, for the CPU.
 *
 * One query token per sequence; grouped-query heads share their KV head's reads. Each (sequence,
 * KV head) pair is one OpenMP task that walks the sequence's block table and keeps an online
 * (flash-decoding style) softmax per block, so the KV is read once and never copied into a
 * gathered tensor. It is built by cpu_kernels.py with the compiler found on the machine and shares
 * torch's OpenMP runtime (torch loads libgomp.so.1 first); attention.py's torch path is the
 * reference it is tested against.
 *
 * cache layout (attention.py): [num_blocks, num_layers, block_size, 2, kv_heads, head_dim]
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* q . k over head_dim, a multiple of 16 */
static inline float dot16(const float *q, const float *k, int64_t head_dim)
{
    v16 acc = {0};
    for (int64_t d = 0; d < head_dim; d += 16) {
        v16 a, b;
        memcpy(&a, q + d, sizeof a);
        memcpy(&b, k + d, sizeof b);
        acc += a * b;
    }
    return hsum16(acc);
}

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

/* One (sequence, KV head) task. Inlined into one small function per head_dim that is a compile-time
 * constant for the common sizes (so the accumulators stay in vector registers); those are kept out of
 * line so an OpenMP thread's stack holds one task's arrays (~48 KiB), not one per variant. */
static inline __attribute__((always_inline)) void decode_task(
    const float *qs, float *os, const float *cache, const int64_t *table, int64_t len,
    int64_t group, const int64_t head_dim, int64_t block_size, int64_t token_stride,
    int64_t block_stride, int64_t layer_offset, int64_t v_offset, float scale)
{
    float acc[MAX_GROUP][MAX_HEAD_DIM];
    float m[MAX_GROUP], l[MAX_GROUP], p[MAX_GROUP][MAX_BLOCK];
    for (int64_t g = 0; g < group; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) acc[g][d] = 0.0f;
    }
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = len - start < block_size ? len - start : block_size;
        const float *kv = cache + table[start / block_size] * block_stride + layer_offset;
        if (start + block_size < len) {
            /* the KV is read from DRAM (a step's cache does not fit in L3): ask for the next block's
             * rows of this head while this block is computed */
            const float *next = cache + table[start / block_size + 1] * block_stride + layer_offset;
            for (int64_t t = 0; t < block_size; t++)
                for (int64_t d = 0; d < head_dim; d += 16) {
                    __builtin_prefetch(next + t * token_stride + d);
                    __builtin_prefetch(next + t * token_stride + v_offset + d);
                }
        }
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qs + g * head_dim;
            float block_max = -INFINITY;
            for (int64_t t = 0; t < n; t++) {
                const float *k = kv + t * token_stride;
                float dot = 0.0f;
                if (head_dim % 16 == 0) {
                    dot = dot16(qg, k, head_dim);
                } else {
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * k[d];
                }
                p[g][t] = dot * scale;
                block_max = p[g][t] > block_max ? p[g][t] : block_max;
            }
            const float new_max = block_max > m[g] ? block_max : m[g];
            const float correction = expf(m[g] - new_max);  /* 0 on the first block */
            m[g] = new_max;
#pragma omp simd
            for (int64_t t = 0; t < n; t++) p[g][t] = expf(p[g][t] - new_max);
            l[g] = l[g] * correction + sum16(p[g], n);
            float *a = acc[g];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) a[d] *= correction;
            for (int64_t t = 0; t < n; t++) {
                const float *v = kv + t * token_stride + v_offset;
                const float w = p[g][t];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) a[d] += w * v[d];
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *o = os + g * head_dim;
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++) o[d] = acc[g][d] * inv;
    }
}

#define TASK_ARGS const float *qs, float *os, const float *cache, const int64_t *table, int64_t len, \
    int64_t group, int64_t head_dim, int64_t block_size, int64_t token_stride, int64_t block_stride, \
    int64_t layer_offset, int64_t v_offset, float scale
#define TASK_CALL(D) decode_task(qs, os, cache, table, len, group, D, block_size, token_stride, \
                                 block_stride, layer_offset, v_offset, scale)
static __attribute__((noinline)) void decode_task_d64(TASK_ARGS) { (void)head_dim; TASK_CALL(64); }
static __attribute__((noinline)) void decode_task_d128(TASK_ARGS) { (void)head_dim; TASK_CALL(128); }
static __attribute__((noinline)) void decode_task_any(TASK_ARGS) { TASK_CALL(head_dim); }

void paged_decode_attention_f32(
    const float *q,           /* [num_seqs, num_heads, head_dim] */
    float *out,               /* [num_seqs, num_heads, head_dim] */
    const float *cache,
    const int64_t *block_tables, int64_t table_width,   /* [num_seqs, table_width] */
    const int64_t *context_lens,                        /* [num_seqs] */
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t num_layers, int64_t layer, float scale, int num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = 2 * num_kv_heads * head_dim;
    const int64_t layer_stride = block_size * token_stride;
    const int64_t block_stride = num_layers * layer_stride;
    const int64_t v_offset = num_kv_heads * head_dim;

#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (int64_t s = 0; s < num_seqs; s++) {
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t first = s * num_heads + h * group;
            const float *qs = q + first * head_dim;
            float *os = out + first * head_dim;
            const int64_t *table = block_tables + s * table_width;
            const int64_t layer_offset = layer * layer_stride + h * head_dim;
            void (*task)(TASK_ARGS) = head_dim == 64 ? decode_task_d64
                                      : head_dim == 128 ? decode_task_d128 : decode_task_any;
            task(qs, os, cache, table, context_lens[s], group, head_dim, block_size, token_stride,
                 block_stride, layer_offset, v_offset, scale);
        }
    }
}

/* limits the Python side checks before calling */
int64_t paged_decode_max_group(void) { return MAX_GROUP; }
int64_t paged_decode_max_head_dim(void) { return MAX_HEAD_DIM; }
int64_t paged_decode_max_block(void) { return MAX_BLOCK; }
