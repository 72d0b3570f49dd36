/* The attention of short rows for models/packed/, on the packed tokens themselves.
 *
 * torch runs the attention of a packed batch as a scatter of the packed Q, K and V into a
 * padded [rows, heads, width, size] grid, copies of each into the layout its batched
 * matrix product takes, that product (a few hundred products of 30x32 by 32x30, at a
 * fraction of the GEMM's speed), a softmax, a second product, and a gather back: ~2.7 ms
 * per layer for 64 rows of 25-34 tokens on an AMD EPYC, two threads. This does it in one
 * pass over the packed Q, K and V ([tokens, 3 * hidden] as the fused Q/K/V product gives
 * them): for each (row, head), K transposed into a local block, the scores of four query
 * tokens at a time in AVX-512 registers, their softmax, and their weighted sum of V, written
 * straight into the packed [tokens, hidden] output: ~1.2 ms for the same batch.
 *
 * It is plain C with no Python API, called through ctypes (which drops the GIL for the
 * call). Its threads are OpenMP's: loaded after torch, it shares torch's libgomp (the same
 * soname), so its threads are torch's own team rather than a second one.
 *
 * Limits (the caller checks them; outside them it returns -1): float32; rows of 1 to
 * MAX_WIDTH tokens; a head size that is a multiple of 16, at most MAX_SIZE. It needs
 * AVX-512F (packed_attention_supported()); elsewhere the caller keeps torch's path.
 */
#include <stdint.h>

#define MAX_WIDTH 64
#define MAX_SIZE 128

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>

/* e^x for x <= 0 (a score minus its row's maximum) as 2^n * p(r), with r = x - n ln 2 and
 * p Cephes' expf polynomial: within 2 ulp of expf over the range a softmax uses. */
__attribute__((target("avx512f"))) static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Query tokens first..first+m-1 (m: 1-4) of one (row, head): their scores against the keys
 * in kt ([size][MAX_WIDTH], the row's n keys transposed, zero beyond n), the softmax of
 * each over the n keys, and each one's weighted sum of the n values, into out. */
__attribute__((target("avx512f"), always_inline)) static inline void query_block(
    const int m, const float *qkv, const int64_t stride, const int64_t hidden, const int64_t start,
    const int64_t first, const int64_t n, const int64_t head, const int64_t size, const float scale,
    const float *kt, float *out) {
    const int blocks = (int)((n + 15) / 16);
    __m512 s[4][MAX_WIDTH / 16];
    const float *q[4];
    for (int a = 0; a < m; a++) {
        q[a] = qkv + (start + first + a) * stride + head * size;
        for (int b = 0; b < blocks; b++) s[a][b] = _mm512_setzero_ps();
    }
    for (int64_t d = 0; d < size; d++) {
        __m512 k[MAX_WIDTH / 16];
        for (int b = 0; b < blocks; b++) k[b] = _mm512_load_ps(kt + d * MAX_WIDTH + 16 * b);
        for (int a = 0; a < m; a++) {
            const __m512 qd = _mm512_set1_ps(q[a][d]);
            for (int b = 0; b < blocks; b++) s[a][b] = _mm512_fmadd_ps(qd, k[b], s[a][b]);
        }
    }
    __attribute__((aligned(64))) float p[4][MAX_WIDTH];
    const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int a = 0; a < m; a++) {
        __mmask16 live[MAX_WIDTH / 16];
        __m512 top = ninf;
        for (int b = 0; b < blocks; b++) {
            const int64_t left = n - 16 * b;
            live[b] = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            s[a][b] = _mm512_mask_blend_ps(live[b], ninf, _mm512_mul_ps(s[a][b], vscale));
            top = _mm512_max_ps(top, s[a][b]);
        }
        const __m512 vtop = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 sum = _mm512_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            s[a][b] = _mm512_maskz_mov_ps(live[b], exp_nonpositive(_mm512_sub_ps(s[a][b], vtop)));
            sum = _mm512_add_ps(sum, s[a][b]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int b = 0; b < blocks; b++) _mm512_store_ps(p[a] + 16 * b, _mm512_mul_ps(s[a][b], inv));
    }
    for (int64_t c = 0; c < size; c += 16) {
        __m512 o[4];
        for (int a = 0; a < m; a++) o[a] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m512 v = _mm512_loadu_ps(qkv + (start + j) * stride + 2 * hidden + head * size + c);
            for (int a = 0; a < m; a++) o[a] = _mm512_fmadd_ps(_mm512_set1_ps(p[a][j]), v, o[a]);
        }
        for (int a = 0; a < m; a++) _mm512_storeu_ps(out + (start + first + a) * hidden + head * size + c, o[a]);
    }
}

__attribute__((target("avx512f"))) static void attend(const float *qkv, const int64_t *starts,
                                                      const int64_t *lengths, const int64_t rows,
                                                      const int64_t heads, const int64_t size,
                                                      const float scale, const int threads, float *out) {
    const int64_t hidden = heads * size, stride = 3 * hidden;
#pragma omp parallel for schedule(dynamic, 2) num_threads(threads)
    for (int64_t task = 0; task < rows * heads; task++) {
        const int64_t row = task / heads, head = task % heads;
        const int64_t n = lengths[row], start = starts[row];
        __attribute__((aligned(64))) float kt[MAX_SIZE * MAX_WIDTH];
        for (int64_t d = 0; d < size; d++)
            for (int64_t j = n; j < (n + 15) / 16 * 16; j++) kt[d * MAX_WIDTH + j] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float *k = qkv + (start + j) * stride + hidden + head * size;
            for (int64_t d = 0; d < size; d++) kt[d * MAX_WIDTH + j] = k[d];
        }
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) query_block(4, qkv, stride, hidden, start, i, n, head, size, scale, kt, out);
        switch (n - i) {
            case 3: query_block(3, qkv, stride, hidden, start, i, n, head, size, scale, kt, out); break;
            case 2: query_block(2, qkv, stride, hidden, start, i, n, head, size, scale, kt, out); break;
            case 1: query_block(1, qkv, stride, hidden, start, i, n, head, size, scale, kt, out); break;
        }
    }
}
#endif

/* 1 where this CPU runs the kernel (x86-64 with AVX-512F), else 0. */
int packed_attention_supported(void) {
#if defined(__x86_64__)
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
    return 0;
#endif
}

/* softmax(Q K^T * scale) V of each row's tokens over its own tokens, for every head.
 * qkv: [tokens, 3 * heads * size] float32 (per token Q, then K, then V, each head after
 * head); row r is tokens starts[r] .. starts[r] + lengths[r] - 1. out: [tokens, heads * size].
 * Returns 0, or -1 (nothing written) outside the limits above. */
int packed_attention(const float *qkv, const int64_t *starts, const int64_t *lengths, int64_t rows,
                     int64_t heads, int64_t size, float scale, int threads, float *out) {
    if (!packed_attention_supported() || size < 16 || size % 16 || size > MAX_SIZE || heads < 1 || threads < 1)
        return -1;
    for (int64_t r = 0; r < rows; r++)
        if (lengths[r] < 1 || lengths[r] > MAX_WIDTH) return -1;
#if defined(__x86_64__)
    attend(qkv, starts, lengths, rows, heads, size, scale, threads, out);
    return 0;
#else
    (void)qkv, (void)starts, (void)scale, (void)out;
    return -1;
#endif
}
