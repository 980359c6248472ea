/* A Llama-family decoder's decode step through all its layers in one call, for the CPU.
 *
 * A decode step of a small model spends a quarter of its time in Python between the kernels: per
 * layer a dozen module calls, each checking its inputs, allocating its output and crossing ctypes.
 * Here the layer sequence (RMSNorm, qkv, rotary, KV write, attention, o, residual, RMSNorm,
 * gate/up, SiLU-and-mul, down, residual) runs in C, calling the very kernels the module path calls:
 * they come in as function pointers into their own libraries (block_linear.c, fused_ops.c,
 * paged_decode_attention.c), compiled there with their own flags. So each layer's output is the
 * module path's bit for bit (the residual adds are the same float32 adds), which is the reference
 * tests/test_decode_layers.py checks against. The Python side (engine/models/llama_decode_step.py)
 * checks every index once per step, as the module path does.
 */
#include <stdint.h>

typedef void (*linear_fn)(int qtype, const float *x, int64_t M, int64_t K, const void *w,
                          const float *d, const float *m, int64_t N, float *y, float *scratch,
                          int num_threads);
typedef void (*rms_norm_fn)(const float *x, int64_t rows, int64_t dim, int64_t x_stride,
                            const float *w, float eps, float *out);
typedef void (*silu_and_mul_fn)(const float *gu, int64_t rows, int64_t n, int64_t stride, float *out);
typedef void (*rotary_fn)(const float *x, int64_t tokens, int64_t heads, int64_t head_dim,
                          int64_t token_stride, int64_t head_stride, const float *cos,
                          const float *sin, int64_t rot_dim, float *out);
typedef void (*write_kv_fn)(void *cache, const float *k, int64_t k_stride, const float *v,
                            int64_t v_stride, int64_t tokens, int64_t entry, const int64_t *slot_blocks,
                            const int64_t *slot_offsets, int64_t num_layers, int64_t block_size,
                            int64_t layer);
typedef void (*attention_fn)(const float *q, float *out, const void *cache, const int64_t *tables,
                             int64_t table_width, const int64_t *lens, int64_t num_seqs,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, int64_t num_layers, int64_t layer, float scale,
                             int num_threads);

typedef struct {
    linear_fn linear;
    rms_norm_fn rms_norm;
    silu_and_mul_fn silu_and_mul;
    rotary_fn rotary;
    write_kv_fn write_kv;       /* for the cache's dtype */
    attention_fn attention;     /* for the cache's dtype */
} Kernels;

typedef struct {                /* one projection's weight in GGUF blocks (block_quant.BlockWeights) */
    int64_t qtype;              /* block_linear.c's: 1 q4_1, 2 q8_0 */
    const void *qs;
    const float *d, *m;         /* m: q4_1's minimum (q8_0: d again, unread) */
    int64_t n, k;               /* y = x W^T, W [n, k] */
} Blocks;

typedef struct {
    const float *input_norm, *post_norm;   /* RMSNorm weights [hidden] */
    Blocks qkv, o, gate_up, down;          /* qkv: q, k, v rows stacked; gate_up: gate, then up */
} Layer;

typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate, rot_dim;
    float eps, scale;
    const Layer *layers;        /* layer i writes and reads layer i of the cache */
} Model;

typedef struct {
    int64_t rows;                          /* decode rows (sequences, or draft positions) */
    const float *cos, *sin;                /* [rows, rot_dim]: each row's position in the tables */
    void *cache;                           /* [blocks, cache_layers, block_size, 2, kv_heads, head_dim] */
    int64_t cache_layers, block_size;
    const int64_t *slot_blocks, *slot_offsets;        /* [rows]: where each row's K and V go */
    const int64_t *tables; int64_t table_width;       /* [rows, table_width] block tables */
    const int64_t *lens;                              /* [rows] context length, the new token's included */
    float *work;                           /* decode_layers_work(model, rows) floats */
    float *linear_scratch;                 /* what block_linear_scratch asks for, at the widest K */
    int64_t num_threads;
} Step;

static void project(const Kernels *kn, const Blocks *b, const float *x, int64_t rows, float *y,
                    const Step *s)
{
    kn->linear((int)b->qtype, x, rows, b->k, b->qs, b->d, b->m, b->n, y, s->linear_scratch,
               (int)s->num_threads);
}

static void add_into(float *x, const float *y, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* Floats of work space one step of `rows` rows needs. */
int64_t decode_layers_work(const Model *m, int64_t rows)
{
    const int64_t q = m->heads * m->head_dim, kv = m->kv_heads * m->head_dim;
    return rows * (2 * m->hidden + (q + 2 * kv) + q + kv + q + 3 * m->intermediate);
}

/* x [rows, hidden]: the embedded tokens in, every layer's residual stream out (before the final
 * norm). */
void decode_layers(const Kernels *kn, const Model *m, const Step *s, float *x)
{
    const int64_t M = s->rows, H = m->hidden, hd = m->head_dim;
    const int64_t qn = m->heads * hd, kvn = m->kv_heads * hd, qkvn = qn + 2 * kvn;
    const int64_t I = m->intermediate;
    float *h = s->work;                 /* [M, H] normed input of a sublayer */
    float *qkv = h + M * H;             /* [M, qkvn] */
    float *q = qkv + M * qkvn;          /* [M, heads, hd] rotated */
    float *k = q + M * qn;              /* [M, kv_heads, hd] rotated */
    float *attn = k + M * kvn;          /* [M, qn] */
    float *proj = attn + M * qn;        /* [M, H] a sublayer's output */
    float *gu = proj + M * H;           /* [M, 2I] */
    float *act = gu + M * 2 * I;        /* [M, I] */
    for (int64_t l = 0; l < m->num_layers; l++) {
        const Layer *L = &m->layers[l];
        kn->rms_norm(x, M, H, H, L->input_norm, m->eps, h);
        project(kn, &L->qkv, h, M, qkv, s);
        kn->rotary(qkv, M, m->heads, hd, qkvn, hd, s->cos, s->sin, m->rot_dim, q);
        kn->rotary(qkv + qn, M, m->kv_heads, hd, qkvn, hd, s->cos, s->sin, m->rot_dim, k);
        kn->write_kv(s->cache, k, kvn, qkv + qn + kvn, qkvn, M, kvn, s->slot_blocks,
                     s->slot_offsets, s->cache_layers, s->block_size, l);
        kn->attention(q, attn, s->cache, s->tables, s->table_width, s->lens, M, m->heads,
                      m->kv_heads, hd, s->block_size, s->cache_layers, l, m->scale,
                      (int)s->num_threads);
        project(kn, &L->o, attn, M, proj, s);
        add_into(x, proj, M * H);
        kn->rms_norm(x, M, H, H, L->post_norm, m->eps, h);
        project(kn, &L->gate_up, h, M, gu, s);
        kn->silu_and_mul(gu, M, I, 2 * I, act);
        project(kn, &L->down, act, M, proj, s);
        add_into(x, proj, M * H);
    }
}
