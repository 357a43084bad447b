/* One single-sequence decode step of a dense Qwen3 LLM on CPU: embedding row, every block, final
 * norm, head and the logits' argmax, as ONE OpenMP parallel region with four barriers per block.
 *
 * Why by hand: a decode step is bound by reading the weights once. Compiled by inductor, a 1B step
 * streams its matvecs at ~87% of the memory bandwidth but runs every small op (norms, rope, softmax,
 * silu) as its own parallel loop, ~690 barriers per step, and lands at 71-73% of the bound in the
 * machine's fast memory regime. Here each thread owns whole kv-head groups through q/k/v, norms,
 * rope, cache write and attention (no barrier inside attention), and a contiguous block of rows of
 * every other product: 0.83-0.85 of the bound in that regime, 0.98-1.01 in the slow one (1B, 2
 * cores, bf16 copies, benchmarks/bench_core.py, 5 rounds; the compiled step 0.68-0.70 / 0.88 in the
 * same rounds). The attention reads the K/V cache at one core's bandwidth per thread.
 *
 * Numerics: fp32 throughout, as the model computes; weights are either the fp32 parameters or their
 * exact bfloat16 copies (widened as loaded, so both give the fp32 product). Sums run in another
 * order than torch's, so results match to rounding, not bit for bit.
 *
 * Measured and not used (1B, 2 cores, side by side):
 * - interleaving 2-8 weight rows per thread to reuse each load of x: under half the bandwidth (the
 *   row streams, 2-6 KB apart, defeat the hardware prefetcher); software prefetch: slower too;
 * - dynamic scheduling of rows (chunks of 32-128 rows, 512-4096 for the head) instead of the
 *   static split: 0.77-0.85 vs 0.86 of the bound;
 * - V stored transposed (as the compiled step wants it): 128 short row streams per kv head; one
 *   thread's attention over 28 layers x 4 kv heads x 600 positions took 4.8-5.9 vs 2.5-3.3 ms;
 * - libm's scalar expf in the softmax: 2.9-3.3 vs 2.5-2.6 ms with exp16 (same attention).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 64 /* slots for the threads' argmax results; kernels/decode.py mirrors it */
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, vocab, layers, slots, bf16;
    double eps;
    /* per layer (arrays of `layers` pointers) */
    const void **qkv, **o, **gate_up, **down;
    const float **in_norm, **post_norm, **q_norm, **k_norm;
    float **k_cache; /* [kv_heads, slots, head_dim] */
    float **v_cache; /* [kv_heads, slots, head_dim] */
    const float *final_norm, *embed, *cos, *sin; /* cos/sin: [slots, head_dim] */
    const void *head;                             /* [vocab, hidden] */
    /* scratch */
    float *h;       /* [hidden] residual stream */
    float *qkv_out; /* [(heads + 2 kv_heads) head_dim] */
    float *attn;    /* [heads head_dim] */
    float *act;     /* [inter] */
    float *local;   /* per thread: [hidden] normed input, [heads / kv_heads, slots] scores */
} Plan;

static inline float dot_f32(const float *w, const float *x, int64_t n) {
    int64_t k = 0;
    float s = 0.f;
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (; k + 32 <= n; k += 32) {
        a = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a);
        b = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), b);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#endif
    for (; k < n; k++) s += w[k] * x[k];
    return s;
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    int64_t k = 0;
    float s = 0.f;
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (; k + 32 <= n; k += 32) {
        __m512i v = _mm512_loadu_si512(w + k); /* one cache line: 32 values */
        __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
        __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
        a = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + k), a);
        b = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + k + 16), b);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#endif
    for (; k < n; k++) s += bf16_to_f32(w[k]) * x[k];
    return s;
}

/* row `r` of a [*, n] weight (fp32 or bf16) dotted with x */
static inline float dot_row(const Plan *p, const void *w, int64_t r, const float *x, int64_t n) {
    return p->bf16 ? dot_bf16((const uint16_t *)w + r * n, x, n) : dot_f32((const float *)w + r * n, x, n);
}

/* out = x * rsqrt(mean(x^2) + eps) * weight */
static void rms_norm(const float *x, const float *weight, float *out, int64_t n, double eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* rotate-half RoPE in place on one head */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

#ifdef __AVX512F__
/* expf over 16 lanes (Cephes' polynomial, ~1 ulp), for the softmax (see the notes above). The
 * SiLU keeps libm's expf: vectorised, 1B steps measured the same (0.872 vs 0.867 of the bound). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f)); /* exp underflows to 0 below */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* x - n ln2, ln2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}
#endif

static void softmax(float *x, int64_t n) {
    float m = -INFINITY, sum = 0.f;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) sum += (x[i] = expf(x[i] - m));
    const float inv = 1.f / sum;
    for (i = 0; i < n; i++) x[i] *= inv;
}

/* the contiguous block [lo, hi) of `n` items that thread t of nt owns */
static void block(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

/* q/k/v rows, q/k norm, rope, cache write and attention for kv head j (its `group` query heads) */
static void attend_group(const Plan *p, int64_t l, int64_t j, int64_t pos, const float *xn, float *scores) {
    const int64_t D = p->hidden, Dh = p->head_dim, H = p->heads, K = p->kv_heads, S = p->slots;
    const int64_t G = H / K;
    float *q = p->qkv_out + j * G * Dh, *k = p->qkv_out + (H + j) * Dh, *v = p->qkv_out + (H + K + j) * Dh;
    for (int64_t r = 0; r < G * Dh; r++) q[r] = dot_row(p, p->qkv[l], j * G * Dh + r, xn, D);
    for (int64_t r = 0; r < Dh; r++) k[r] = dot_row(p, p->qkv[l], (H + j) * Dh + r, xn, D);
    for (int64_t r = 0; r < Dh; r++) v[r] = dot_row(p, p->qkv[l], (H + K + j) * Dh + r, xn, D);
    const float *cos = p->cos + pos * Dh, *sin = p->sin + pos * Dh;
    for (int64_t g = 0; g < G; g++) {
        rms_norm(q + g * Dh, p->q_norm[l], q + g * Dh, Dh, p->eps);
        rope(q + g * Dh, cos, sin, Dh);
    }
    rms_norm(k, p->k_norm[l], k, Dh, p->eps);
    rope(k, cos, sin, Dh);
    float *kc = p->k_cache[l] + j * S * Dh, *vc = p->v_cache[l] + j * S * Dh;
    memcpy(kc + pos * Dh, k, Dh * sizeof(float));
    memcpy(vc + pos * Dh, v, Dh * sizeof(float));
    const float scale = 1.f / sqrtf((float)Dh);
    const int64_t n = pos + 1;
    /* the group's query heads together: each cached key and value row is read once per group */
    for (int64_t s = 0; s < n; s++)
        for (int64_t g = 0; g < G; g++) scores[g * S + s] = dot_f32(kc + s * Dh, q + g * Dh, Dh) * scale;
    for (int64_t g = 0; g < G; g++) softmax(scores + g * S, n);
    float *out = p->attn + j * G * Dh;
    memset(out, 0, G * Dh * sizeof(float));
    for (int64_t s = 0; s < n; s++)
        for (int64_t g = 0; g < G; g++) {
            const float w = scores[g * S + s], *vr = vc + s * Dh;
            float *o = out + g * Dh;
            for (int64_t d = 0; d < Dh; d++) o[d] += w * vr[d];
        }
}

/* h += W x over this thread's block of W's rows */
static void add_product(const Plan *p, const void *w, const float *x, int64_t n_in, int t, int nt) {
    int64_t lo, hi;
    block(p->hidden, t, nt, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) p->h[r] += dot_row(p, w, r, x, n_in);
}

static void block_step(const Plan *p, int64_t l, int64_t pos, int t, int nt) {
    const int64_t D = p->hidden, I = p->inter;
    float *xn = p->local + t * (D + p->heads / p->kv_heads * p->slots), *scores = xn + D;
    int64_t lo, hi;
    rms_norm(p->h, p->in_norm[l], xn, D, p->eps); /* every thread its own copy: no barrier */
    for (int64_t j = t; j < p->kv_heads; j += nt) attend_group(p, l, j, pos, xn, scores);
#pragma omp barrier
    add_product(p, p->o[l], p->attn, p->heads * p->head_dim, t, nt);
#pragma omp barrier
    rms_norm(p->h, p->post_norm[l], xn, D, p->eps);
    block(I, t, nt, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        float g = dot_row(p, p->gate_up[l], r, xn, D), u = dot_row(p, p->gate_up[l], I + r, xn, D);
        p->act[r] = g / (1.f + expf(-g)) * u;
    }
#pragma omp barrier
    add_product(p, p->down[l], p->act, I, t, nt);
#pragma omp barrier
}

/* sizeof(Plan), which the Python side checks against its mirror of the struct before any call */
int64_t plan_bytes(void) { return (int64_t)sizeof(Plan); }

/* One step for `token` at cache slot (= position) `pos`: writes its K/V there and logits [vocab];
 * returns the index of the first maximum (NaN counting as the maximum, as torch.argmax), each
 * thread scanning the head rows it computed while they are in cache. */
int64_t decode_step(const Plan *p, int64_t token, int64_t pos, float *logits, int threads) {
    memcpy(p->h, p->embed + token * p->hidden, p->hidden * sizeof(float));
    float best[MAX_THREADS];
    int64_t where[MAX_THREADS];
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t l = 0; l < p->layers; l++) block_step(p, l, pos, t, nt);
        float *xn = p->local + t * (p->hidden + p->heads / p->kv_heads * p->slots);
        rms_norm(p->h, p->final_norm, xn, p->hidden, p->eps);
        int64_t lo, hi;
        block(p->vocab, t, nt, &lo, &hi);
        float b = -INFINITY;
        int64_t at = lo;
        for (int64_t r = lo; r < hi; r++) {
            float v = logits[r] = dot_row(p, p->head, r, xn, p->hidden);
            if (v > b || (isnan(v) && !isnan(b))) b = v, at = r;
        }
        if (t < MAX_THREADS) best[t] = b, where[t] = at;
        if (t == 0) used = nt < MAX_THREADS ? nt : MAX_THREADS;
    }
    int64_t at = where[0];
    for (int t = 1; t < used; t++) /* blocks in order: a later one wins only if strictly larger */
        if (!isnan(best[0]) && (best[t] > best[0] || isnan(best[t]))) best[0] = best[t], at = where[t];
    return at;
}
