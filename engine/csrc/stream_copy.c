/* Bulk copies of KV blocks with non-temporal (streaming) stores, for the CPU.
 *
 * A KV handoff copies tens to hundreds of MB that the copying core will not read again: a plain
 * memcpy at these sizes first reads every destination line into the cache (read-for-ownership)
 * and later writes it back, so each byte crosses the memory bus three times. Streaming stores
 * write whole lines straight to memory: two crossings, and the source stays in the cache. glibc
 * does the same only above its non-temporal threshold (a share of the L3, often hundreds of MB).
 *
 * copy_spans_nt copies n (dst, src, nbytes) spans in one call so a Python thread pays the ctypes
 * crossing once per group, not once per block. x86-64 only: elsewhere it is memcpy. Built by
 * engine/cpu_kernels.py; kv_shm.copy_spans falls back to memmove without it, and the tests check
 * both give the same bytes.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

static void stream_copy(char *d, const char *s, size_t n)
{
    size_t head = (64 - ((uintptr_t)d & 63)) & 63; /* streaming stores want aligned lines */
    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    size_t i = 0;
#if defined(__AVX512F__)
    for (; i + 256 <= n; i += 256) {
        __m512i a = _mm512_loadu_si512(s + i), b = _mm512_loadu_si512(s + i + 64);
        __m512i c = _mm512_loadu_si512(s + i + 128), e = _mm512_loadu_si512(s + i + 192);
        _mm512_stream_si512((void *)(d + i), a);
        _mm512_stream_si512((void *)(d + i + 64), b);
        _mm512_stream_si512((void *)(d + i + 128), c);
        _mm512_stream_si512((void *)(d + i + 192), e);
    }
#elif defined(__AVX__)
    for (; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(s + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(s + i + 64));
        __m256i e = _mm256_loadu_si256((const __m256i *)(s + i + 96));
        _mm256_stream_si256((__m256i *)(d + i), a);
        _mm256_stream_si256((__m256i *)(d + i + 32), b);
        _mm256_stream_si256((__m256i *)(d + i + 64), c);
        _mm256_stream_si256((__m256i *)(d + i + 96), e);
    }
#else
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
#endif
    memcpy(d + i, s + i, n - i);
}

#define FENCE() _mm_sfence() /* streaming stores are weakly ordered: publish them before return */
#else
static void stream_copy(char *d, const char *s, size_t n) { memcpy(d, s, n); }
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif

void copy_spans_nt(const uint64_t *dst, const uint64_t *src, const uint64_t *nbytes, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        stream_copy((char *)(uintptr_t)dst[i], (const char *)(uintptr_t)src[i], (size_t)nbytes[i]);
    FENCE();
}
