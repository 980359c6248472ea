/* The small per-layer ops of a decode step, each fused into one pass, for the CPU.
 *
 * RMSNorm, neox rotary, SiLU(gate) * up and the KV-cache write each take several torch ops (and as
 * many dispatches and temporaries) per layer; on decode-sized inputs those dispatches, not the
 * arithmetic, are their cost. Each function here does one of them in one call, single-threaded (a
 * few thousand elements: a thread pool would cost more than it saves). The formulas are the torch
 * path's (norm.py, rotary.py, activation.py, attention.py), which is the reference they are tested
 * against; rotary and the KV write give the same bits, the norm and SiLU differ in the last bits
 * (summation order, expf).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* the torch path rounds each product before the sum; so do we (no fused multiply-add) */
#pragma GCC optimize("fp-contract=off")

/* glibc's libmvec has vector expf; see paged_decode_attention.c for why it is declared here. */
__attribute__((simd("notinbranch"))) float expf(float);

/* out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)); x rows `x_stride` apart, out contiguous. */
void rms_norm_f32(const float *x, int64_t rows, int64_t dim, int64_t x_stride, const float *w,
                  float eps, float *out)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * dim;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; i++) sum += (double)xr[i] * xr[i];
        const float inv = 1.0f / sqrtf((float)(sum / dim) + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, n + i]; gu rows `stride` apart, out contiguous [rows, n]. */
void silu_and_mul_f32(const float *gu, int64_t rows, int64_t n, int64_t stride, float *out)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * stride, *u = g + n;
        float *o = out + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* Neox rotary over the first rot_dim dims of each head: out = x * cos + rotate_half(x) * sin, the
 * other dims copied. x [tokens, heads, head_dim] with the given token and head strides (its last
 * dim contiguous); cos, sin [tokens, rot_dim] (the token's table rows); out contiguous. */
void rotary_neox_f32(const float *x, int64_t tokens, int64_t heads, int64_t head_dim,
                     int64_t token_stride, int64_t head_stride, const float *cos, const float *sin,
                     int64_t rot_dim, float *out)
{
    const int64_t half = rot_dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * rot_dim, *s = sin + t * rot_dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + t * token_stride + h * head_stride;
            float *o = out + (t * heads + h) * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++)
                o[i] = xh[i] * c[i] + (-xh[half + i]) * s[i];
#pragma omp simd
            for (int64_t i = half; i < rot_dim; i++)
                o[i] = xh[i] * c[i] + xh[i - half] * s[i];
            if (rot_dim < head_dim)
                memcpy(o + rot_dim, xh + rot_dim, (size_t)(head_dim - rot_dim) * sizeof(float));
        }
    }
}

/* This step's K and V ([tokens, entry] each, rows `k_stride` / `v_stride` apart) into their slots of
 * one layer of the cache [num_blocks, num_layers, block_size, 2, entry]. The caller has checked
 * every slot lies inside the cache. */
void write_kv_f32(float *cache, const float *k, int64_t k_stride, const float *v, int64_t v_stride,
                  int64_t tokens, int64_t entry, const int64_t *slot_blocks,
                  const int64_t *slot_offsets, int64_t num_layers, int64_t block_size, int64_t layer)
{
    const size_t bytes = (size_t)entry * sizeof(float);
    for (int64_t t = 0; t < tokens; t++) {
        float *slot = cache + (((slot_blocks[t] * num_layers + layer) * block_size + slot_offsets[t])
                               * 2 * entry);
        memcpy(slot, k + t * k_stride, bytes);
        memcpy(slot + entry, v + t * v_stride, bytes);
    }
}

/* The same write into a half-width cache, each element rounded to nearest-even as torch's .to()
 * rounds it (bfloat16: the high half of the float32, NaN kept a quiet NaN). */
static inline uint16_t to_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* write_kv_<SUF>: write_kv_f32's loop into a cache of T, each element converted by CONVERT */
#define DEFINE_WRITE_KV(T, SUF, CONVERT)                                                           \
void write_kv_##SUF(T *cache, const float *k, int64_t k_stride, const float *v, int64_t v_stride,  \
                    int64_t tokens, int64_t entry, const int64_t *slot_blocks,                     \
                    const int64_t *slot_offsets, int64_t num_layers, int64_t block_size,           \
                    int64_t layer)                                                                 \
{                                                                                                  \
    for (int64_t t = 0; t < tokens; t++) {                                                         \
        T *slot = cache + (((slot_blocks[t] * num_layers + layer) * block_size + slot_offsets[t])  \
                           * 2 * entry);                                                           \
        const float *kt = k + t * k_stride, *vt = v + t * v_stride;                                \
        _Pragma("omp simd")                                                                        \
        for (int64_t i = 0; i < entry; i++) slot[i] = CONVERT(kt[i]);                              \
        _Pragma("omp simd")                                                                        \
        for (int64_t i = 0; i < entry; i++) slot[entry + i] = CONVERT(vt[i]);                      \
    }                                                                                              \
}

DEFINE_WRITE_KV(uint16_t, bf16, to_bf16)

#ifdef __FLT16_MAX__   /* the compiler has _Float16 (GCC 12+ on x86-64); its cast rounds to nearest-even */
static inline _Float16 to_f16(float x) { return (_Float16)x; }
DEFINE_WRITE_KV(_Float16, f16, to_f16)
#endif
