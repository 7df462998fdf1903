/* One transformer block of a small generation step in a single call (fp32, CPU, no gradients): RMSNorm,
 * q / kv projections, QK-norm, RoPE, the KV-cache write, masked attention over the held and new slots,
 * output projection, RMSNorm, then a shared / dense SwiGLU and the routed experts. The eager path pays
 * per op (about 90 aten calls a block); a step of a few rows does little arithmetic, so here it is one
 * call. omniar/backbone/fused.py calls it (tests/test_fused.py checks it against the eager block).
 * The bf16 decoder's GroupNorm + SiLU and Winograd convs (omniar/tokenizers/causal3d.py) are here too. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int B, L, D, H, KVH, HD, held, cap; /* held: slots in the cache before this step; cap: its capacity */
    int E, top_k, hidden, shared_hidden, sigmoid; /* E: active routed experts (0: none) */
    float eps_attn, eps_q, eps_k, eps_ffn;
    const float *attn_norm, *wq, *wkv, *wo, *q_norm, *k_norm; /* nn.Linear weights: (out, in) */
    const float *ffn_norm, *router, *bias, *w_in, *w_out; /* experts: w_in (E, D, 2h), w_out (E, h, D) */
    const float *s_in, *s_out; /* shared / dense SwiGLU, (2 hs, D) and (D, hs); NULL: none */
    const float *cos, *sin; /* (L, HD / 2) */
    const unsigned char *key_ok; /* (B, cap): real tokens among the slots */
    float *keys, *values; /* (B, KVH, cap, HD) */
    float *x; /* (B, L, D), updated in place */
    float *queries; /* (B, H, L, HD): the rotated queries, or NULL */
    int threads; /* up to this many parts of the batch at once, a thread each (last: earlier kernels ignore it) */
    int causal; /* 0: every query sees every held and new slot (a next-scale step); 1: new token l sees the held
                 * slots and the new ones through its own (the prompt pass) */
    int bf16; /* 1: the cache, queries and attention outputs are bf16 (omniar_attention only) */
} Step;

/* The products are register-blocked on GCC / clang vectors of 16 floats (AVX-512 here, narrower vectors or
 * scalars elsewhere): a tile of output rows x columns stays in registers while the shared dimension streams. */
typedef float v16 __attribute__((vector_size(64)));
#define VL 16

static inline v16 vload(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* keeps a loaded vector in a register: otherwise GCC folds its load into each FMA that uses it (one load per FMA,
 * which makes the tiles load-bound) */
#if defined(__x86_64__) && defined(__GNUC__)
#define KEEP(v) __asm__("" : "+v"(v))
#else
#define KEEP(v) (void)0
#endif

static inline float hsum(v16 v) {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else
    float t = 0.f;
    for (int i = 0; i < VL; i++) t += v[i];
    return t;
#endif
}

/* rb x nb outputs of x W^T (dot form, K a multiple of VL); inlined with constants for the full 4 x 4 tile */
static inline __attribute__((always_inline)) void dot_tile(int rb, int nb, int K, const float *x, const float *W,
                                                           float *y, int ldy) {
    v16 acc[4][4];
    for (int i = 0; i < rb; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = (v16){0};
    for (int k = 0; k < K; k += VL) {
        v16 a[4], w[4];
        for (int i = 0; i < rb; i++) a[i] = vload(x + (size_t)i * K + k);
        for (int i = 0; i < rb; i++) KEEP(a[i]);
        for (int j = 0; j < nb; j++) w[j] = vload(W + (size_t)j * K + k);
        for (int i = 0; i < rb; i++)
            for (int j = 0; j < nb; j++) acc[i][j] += a[i] * w[j];
    }
    for (int i = 0; i < rb; i++)
        for (int j = 0; j < nb; j++) y[(size_t)i * ldy + j] = hsum(acc[i][j]);
}

/* rb rows x nv vectors of y += x W (outer-product form); inlined with constants for the full tiles */
static inline __attribute__((always_inline)) void outer_tile(int rb, int nv, int K, const float *x, int ldx,
                                                             const float *W, int ldw, float *y, int ldy) {
    v16 acc[4][4];
    for (int i = 0; i < rb; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = vload(y + (size_t)i * ldy + v * VL);
    for (int k = 0; k < K; k++) {
        v16 w[4];
        for (int v = 0; v < nv; v++) {
            w[v] = vload(W + (size_t)k * ldw + v * VL);
            KEEP(w[v]);
        }
        for (int i = 0; i < rb; i++) {
            const float a = x[(size_t)i * ldx + k];
            for (int v = 0; v < nv; v++) acc[i][v] += a * w[v];
        }
    }
    for (int i = 0; i < rb; i++)
        for (int v = 0; v < nv; v++) vstore(y + (size_t)i * ldy + v * VL, acc[i][v]);
}

/* y (R, N) += x (R, K) W (K, N), with row strides. Up to 4 rows W streamed by rows (as in mm_nt); more in tiles of
 * 4 rows x 64, 32 or 16 columns, the last columns (N mod 16) by a plain loop. */
static void mm_nn_acc(int R, int K, int N, const float *x, int ldx, const float *W, int ldw, float *y, int ldy) {
    if (R <= 4) {
        for (int k = 0; k < K; k++)
            for (int r = 0; r < R; r++) {
                const float a = x[(size_t)r * ldx + k];
                float *o = y + (size_t)r * ldy;
                const float *w = W + (size_t)k * ldw;
#pragma omp simd
                for (int j = 0; j < N; j++) o[j] += a * w[j];
            }
        return;
    }
    int n = 0;
    for (int nv = 4; nv >= 1; nv /= 2)
        for (; N - n >= nv * VL; n += nv * VL)
            for (int r = 0; r < R; r += 4) {
                const int rb = R - r < 4 ? R - r : 4;
                const float *a = x + (size_t)r * ldx, *w = W + n;
                float *o = y + (size_t)r * ldy + n;
                switch (rb * 8 + nv) { /* constant tile sizes: the tile's accumulators stay in registers */
#define TILE(rb, nv)                                                                                                   \
    case rb * 8 + nv: outer_tile(rb, nv, K, a, ldx, w, ldw, o, ldy); break;
#define TILES(rb) TILE(rb, 4) TILE(rb, 2) TILE(rb, 1)
                    TILES(4) TILES(3) TILES(2) TILES(1)
#undef TILES
#undef TILE
                }
            }
    for (int r = 0; r < R; r++)
        for (int k = 0; k < K; k++) {
            const float a = x[(size_t)r * ldx + k];
            for (int j = n; j < N; j++) y[(size_t)r * ldy + j] += a * W[(size_t)k * ldw + j];
        }
}

/* y (R, N) = x (R, K) W^T, W (N, K) as nn.Linear keeps it. Up to 4 rows a dot product per output, which streams
 * each weight row once (such steps are bound by reading the weights); from 16 rows y^T = W x^T in outer-product
 * form (about twice the dot form's rate); in between tiles of 4 rows x 4 weight rows in dot form. */
static void mm_nt(int R, int K, int N, const float *x, const float *W, float *y) {
    if (R <= 4 || K % VL) {
        for (int n = 0; n < N; n++)
            for (int r = 0; r < R; r++) {
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int k = 0; k < K; k++) acc += x[(size_t)r * K + k] * W[(size_t)n * K + k];
                y[(size_t)r * N + n] = acc;
            }
        return;
    }
    /* x^T's rows padded with zeros to whole vectors, which leaves mm_nn_acc no scalar tail columns */
    const int Rp = (R + VL - 1) / VL * VL;
    float *t = R >= VL ? calloc((size_t)Rp * (K + N), sizeof(float)) : NULL;
    if (t) {
        float *xt = t, *yt = t + (size_t)Rp * K;
        for (int r = 0; r < R; r++)
            for (int k = 0; k < K; k++) xt[(size_t)k * Rp + r] = x[(size_t)r * K + k];
        mm_nn_acc(N, K, Rp, W, K, xt, Rp, yt, Rp);
        for (int r = 0; r < R; r++)
            for (int n = 0; n < N; n++) y[(size_t)r * N + n] = yt[(size_t)n * Rp + r];
        free(t);
        return;
    }
    for (int n = 0; n < N; n += 4) {
        const int nb = N - n < 4 ? N - n : 4;
        for (int r = 0; r < R; r += 4) {
            const int rb = R - r < 4 ? R - r : 4;
            const float *a = x + (size_t)r * K, *w = W + (size_t)n * K;
            float *o = y + (size_t)r * N + n;
            switch (nb == 4 ? rb : 0) { /* constant tile sizes, as in mm_nn_acc */
            case 4: dot_tile(4, 4, K, a, w, o, N); break;
            case 3: dot_tile(3, 4, K, a, w, o, N); break;
            case 2: dot_tile(2, 4, K, a, w, o, N); break;
            case 1: dot_tile(1, 4, K, a, w, o, N); break;
            default: dot_tile(rb, nb, K, a, w, o, N);
            }
        }
    }
}

static void rms_norm(int n, const float *x, const float *w, float eps, float *out) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float s = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * s * w[i];
}

/* pair k is (v[k], v[k + half]), as omniar.backbone.rope.apply_rope */
static void rope(int half, float *v, const float *c, const float *s) {
    for (int k = 0; k < half; k++) {
        const float a = v[k], b = v[k + half];
        v[k] = a * c[k] - b * s[k];
        v[k + half] = b * c[k] + a * s[k];
    }
}

/* exp as 2^n exp(r), r = x - n ln2 (ln2 in two parts, n rounded by the 1.5 * 2^23 trick), exp(r) by a degree-7
 * polynomial: within 1e-7 relative, and unlike glibc's expf or floorf it vectorises in the loops below. 0 below
 * -87 (masked slots come as -inf), clamped above 88. */
static inline float exp_(float x) {
    const float c = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = (c * 1.44269504f + 12582912.f) - 12582912.f;
    const float r = c - n * 0.693359375f + n * 2.12194440e-4f, z = r * r;
    const float p = ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
                       + 1.6666665459e-1f) * r + 5.0000001201e-1f) * z + r + 1.f);
    union { int i; float f; } scale = {.i = ((int)n + 127) << 23};
    return x < -87.f ? 0.f : p * scale.f;
}

static inline float silu(float g) { return g / (1.f + exp_(-g)); }

/* h (R, 2 hid) -> (R, hid): silu(gate) * up, written over the first hid columns of each row's output */
static void swiglu(int R, int hid, const float *h, float *out) {
    for (int r = 0; r < R; r++) {
        const float *gate = h + (size_t)r * 2 * hid, *up = gate + hid;
        float *o = out + (size_t)r * hid;
#pragma omp simd
        for (int j = 0; j < hid; j++) o[j] = silu(gate[j]) * up[j];
    }
}

/* The attention's per-token work of a step (inside omniar_block_step, or for an eager step omniar_qk_prep): QK-norm
 * and RoPE of the queries, written head-major into q_out (B, H, L, HD), and of the keys, written with the values into
 * the cache's slots [held, held + L). q: the q projection's rows (B, L, H, HD); kv: the kv projection's
 * (B, L, 2, KVH, HD). */
static void qk_prep(int B, int L, int H, int KVH, int HD, int held, int cap, float eps_q, float eps_k, const float *q,
                    const float *kv, const float *q_norm, const float *k_norm, const float *cos, const float *sin,
                    float *q_out, float *keys, float *values) {
    const int half = HD / 2;
    for (int b = 0; b < B; b++)
        for (int l = 0; l < L; l++) {
            const size_t r = (size_t)b * L + l;
            const float *c = cos + (size_t)l * half, *sn = sin + (size_t)l * half;
            for (int h = 0; h < H; h++) {
                float *o = q_out + (((size_t)b * H + h) * L + l) * HD;
                rms_norm(HD, q + (r * H + h) * HD, q_norm, eps_q, o);
                rope(half, o, c, sn);
            }
            for (int g = 0; g < KVH; g++) {
                const size_t slot = (((size_t)b * KVH + g) * cap + held + l) * HD;
                rms_norm(HD, kv + (r * 2 * KVH + g) * HD, k_norm, eps_k, keys + slot);
                rope(half, keys + slot, c, sn);
                memcpy(values + slot, kv + (r * 2 * KVH + KVH + g) * HD, sizeof(float) * HD);
            }
        }
}

/* bf16 <-> fp32: a bf16 is the high half of an fp32; rounding to nearest even, as torch does (no NaNs here) */
typedef unsigned short bf16;
static inline float from_bf16(bf16 h) {
    union { unsigned u; float f; } v = {.u = (unsigned)h << 16};
    return v.f;
}
static inline bf16 to_bf16(float f) {
    union { float f; unsigned u; } v = {.f = f};
    return (bf16)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* RMSNorm of the rows x (R, D) into y, in fp32, or (is_bf16) of bf16 rows computed in fp32 and rounded once: the final
 * norm of a fused step, a block's norms in an eager one; from 64 rows split over up to `threads` OpenMP threads */
void omniar_rms_norm(int threads, int is_bf16, int R, int D, float eps, const void *x, const void *w, void *y) {
#pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if (R >= 64)
    for (int r = 0; r < R; r++) {
        if (!is_bf16) {
            rms_norm(D, (const float *)x + (size_t)r * D, w, eps, (float *)y + (size_t)r * D);
            continue;
        }
        const bf16 *row = (const bf16 *)x + (size_t)r * D, *wb = w;
        bf16 *out = (bf16 *)y + (size_t)r * D;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < D; i++) ss += from_bf16(row[i]) * from_bf16(row[i]);
        const float s = 1.f / sqrtf(ss / D + eps);
#pragma omp simd
        for (int i = 0; i < D; i++) out[i] = to_bf16(from_bf16(row[i]) * s * from_bf16(wb[i]));
    }
}

static void widen(size_t n, const bf16 *x, float *y) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) y[i] = from_bf16(x[i]);
}

static void narrow(size_t n, const float *x, bf16 *y) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) y[i] = to_bf16(x[i]);
}

/* qk_prep of bf16 tensors: a batch entry's tokens, up to 16 at a time, widened to fp32, qk_prep's fp32 work (into a
 * cache of their slots alone), the results rounded once to bf16 and written where qk_prep writes them. Nonzero if
 * its work space failed. */
static int qk_prep_bf16(int B, int L, int H, int KVH, int HD, int held, int cap, float eps_q, float eps_k,
                        const bf16 *q, const bf16 *kv, const bf16 *q_norm,
                        const bf16 *k_norm, const bf16 *cos, const bf16 *sin,
                        bf16 *q_out, bf16 *keys, bf16 *values) {
    enum { T = 16 };
    const size_t half = HD / 2, QD = (size_t)H * HD, KVD = (size_t)2 * KVH * HD;
    float *w = malloc(sizeof(float) * (2 * HD + 2 * L * half + 2 * T * (QD + KVD)));
    if (!w) return 1;
    float *qn = w, *kn = qn + HD, *c = kn + HD, *sn = c + L * half, *qf = sn + L * half, *kvf = qf + T * QD;
    float *qo = kvf + T * KVD, *ko = qo + T * QD, *vo = ko + T * KVD / 2;
    widen(HD, q_norm, qn), widen(HD, k_norm, kn), widen(L * half, cos, c), widen(L * half, sin, sn);
    for (int b = 0; b < B; b++)
        for (int l0 = 0; l0 < L; l0 += T) {
            const int n = L - l0 < T ? L - l0 : T;
            const size_t r = (size_t)b * L + l0;
            widen(n * QD, q + r * QD, qf), widen(n * KVD, kv + r * KVD, kvf);
            qk_prep(1, n, H, KVH, HD, 0, n, eps_q, eps_k, qf, kvf, qn, kn, c + l0 * half, sn + l0 * half, qo, ko, vo);
            for (int h = 0; h < H; h++)
                narrow((size_t)n * HD, qo + (size_t)h * n * HD, q_out + (((size_t)b * H + h) * L + l0) * HD);
            for (int g = 0; g < KVH; g++) {
                const size_t slot = (((size_t)b * KVH + g) * cap + held + l0) * HD;
                narrow((size_t)n * HD, ko + (size_t)g * n * HD, keys + slot);
                narrow((size_t)n * HD, vo + (size_t)g * n * HD, values + slot);
            }
        }
    free(w);
    return 0;
}

/* Work space of ffn_rows for R rows: this many floats, then ffn_ints ints. */
static size_t ffn_floats(const Step *s, int R) {
    const int wide = s->hidden > s->shared_hidden ? s->hidden : s->shared_hidden, K1 = s->top_k > 0 ? s->top_k : 1;
    return (size_t)R * (3 * wide + s->D + 1 + K1) + (s->E > 0 ? s->E : 1);
}
static size_t ffn_ints(const Step *s, int R) { return (size_t)R * (1 + (s->top_k > 0 ? s->top_k : 1)); }

/* y (R, D) = the FFN of the normed rows xn (R, D): the shared (or dense) SwiGLU, then each routed expert over the
 * rows that chose it (as MoELayer.forward in eval). work: ffn_floats floats, then ffn_ints ints. */
static void ffn_rows(const Step *s, int R, const float *xn, float *y, float *work) {
    const int D = s->D, hid = s->hidden, shid = s->shared_hidden;
    const int wide = hid > shid ? hid : shid, K1 = s->top_k > 0 ? s->top_k : 1;
    float *h2 = work, *h1 = h2 + (size_t)R * 2 * wide, *rows = h1 + (size_t)R * wide, *scale = rows + (size_t)R * D;
    float *gate = scale + R, *logits = gate + (size_t)R * K1;
    int *members = (int *)(logits + (s->E > 0 ? s->E : 1)), *chosen = members + R;
    memset(y, 0, sizeof(float) * R * D);
    if (s->s_in) {
        mm_nt(R, D, 2 * shid, xn, s->s_in, h2);
        swiglu(R, shid, h2, h1);
        mm_nt(R, shid, D, h1, s->s_out, y);
    }
    if (s->E > 0) {
        const int E = s->E, k = s->top_k;
        for (int r = 0; r < R; r++) {
            const float *a = xn + (size_t)r * D;
            float mx = -INFINITY, total = 0.f;
            for (int e = 0; e < E; e++) {
                float acc = 0.f;
                const float *w = s->router + (size_t)e * D;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < D; i++) acc += a[i] * w[i];
                logits[e] = acc;
                if (acc > mx) mx = acc;
            }
            for (int e = 0; e < E; e++) {
                logits[e] = s->sigmoid ? 1.f / (1.f + exp_(-logits[e])) : exp_(logits[e] - mx);
                total += logits[e];
            }
            if (!s->sigmoid)
                for (int e = 0; e < E; e++) logits[e] /= total;
            /* top-k of score + bias (first index wins a tie); the weights renormalise the scores alone */
            float sum = 0.f;
            for (int t = 0; t < k; t++) {
                int best = -1;
                for (int e = 0; e < E; e++) {
                    int taken = 0;
                    for (int u = 0; u < t; u++) taken |= chosen[r * k + u] == e;
                    if (!taken && (best < 0 || logits[e] + s->bias[e] > logits[best] + s->bias[best])) best = e;
                }
                chosen[r * k + t] = best;
                gate[r * k + t] = logits[best];
                sum += logits[best];
            }
            for (int t = 0; t < k; t++) gate[r * k + t] /= sum;
        }
        for (int e = 0; e < E; e++) {
            int m = 0;
            for (int r = 0; r < R; r++)
                for (int t = 0; t < k; t++)
                    if (chosen[r * k + t] == e) {
                        members[m] = r;
                        scale[m] = gate[r * k + t];
                        memcpy(rows + (size_t)m * D, xn + (size_t)r * D, sizeof(float) * D);
                        m++;
                    }
            if (!m) continue;
            memset(h2, 0, sizeof(float) * m * 2 * hid);
            mm_nn_acc(m, D, 2 * hid, rows, D, s->w_in + (size_t)e * D * 2 * hid, 2 * hid, h2, 2 * hid);
            swiglu(m, hid, h2, h1);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < hid; j++) h1[(size_t)i * hid + j] *= scale[i];
            memset(rows, 0, sizeof(float) * m * D);
            mm_nn_acc(m, hid, D, h1, hid, s->w_out + (size_t)e * hid * D, D, rows, D);
            for (int i = 0; i < m; i++) {
                float *o = y + (size_t)members[i] * D;
                const float *src = rows + (size_t)i * D;
                for (int j = 0; j < D; j++) o[j] += src[j];
            }
        }
    }
}

/* Work space of attend: this many floats. */
static size_t attend_floats(const Step *s) {
    const size_t n_pad = ((size_t)s->held + s->L + VL - 1) / VL * VL, nq = (size_t)s->H / s->KVH * s->L;
    return n_pad * (1 + nq + s->HD) + nq * (s->HD + 1);
}

/* att (B, L, H * HD) = the attention of the rotated queries qh (B, H, L, HD) over the cache's held slots and this
 * step's new ones: a query sees the real slots among its visible ones (-inf on the others; none: zeros). Per batch
 * row and kv head, its heads' queries (nq, HD) at once: scores S = Q K^T, softmax, O = S V. */
static void attend(const Step *s, const float *qh, float *att, float *work) {
    const int H = s->H, G = s->KVH, HD = s->HD, QD = H * HD, groups = H / G, n_slots = s->held + s->L;
    const int nq = groups * s->L; /* queries per batch row and kv head */
    /* the transposed keys' and the scores' rows padded to whole vectors in the outer-product form: aligned loads,
     * no scalar tail (the padding keys are zeros, their scores never read) */
    const int ld = nq >= 8 ? (n_slots + VL - 1) / VL * VL : n_slots;
    const float attn_scale = 1.f / sqrtf((float)HD);
    float *bias = work, *S = bias + ld, *Kt = S + (size_t)nq * ld, *O = Kt + (size_t)HD * ld;
    float *inv = O + (size_t)nq * HD;
    for (int b = 0; b < s->B; b++) {
        const unsigned char *ok = s->key_ok + (size_t)b * s->cap;
        for (int j = 0; j < n_slots; j++) bias[j] = ok[j] ? 0.f : -INFINITY;
        for (int g = 0; g < G; g++) {
            const float *Q = qh + ((size_t)b * H + (size_t)g * groups) * s->L * HD;
            const float *K = s->keys + ((size_t)b * G + g) * s->cap * HD;
            const float *V = s->values + ((size_t)b * G + g) * s->cap * HD;
            if (nq >= 8) { /* enough queries to pay for one transposed copy of the keys (outer-product form) */
                for (int d = 0; d < HD; d++) {
                    float *row = Kt + (size_t)d * ld;
                    for (int j = 0; j < n_slots; j++) row[j] = K[(size_t)j * HD + d];
                    for (int j = n_slots; j < ld; j++) row[j] = 0.f;
                }
                memset(S, 0, sizeof(float) * nq * ld);
                mm_nn_acc(nq, HD, ld, Q, HD, Kt, ld, S, ld);
            } else {
                mm_nt(nq, HD, n_slots, Q, K, S);
            }
            for (int i = 0; i < nq; i++) {
                float *p = S + (size_t)i * ld, mx = -INFINITY, total = 0.f;
                const int seen = s->causal ? s->held + i % s->L + 1 : n_slots;
#pragma omp simd reduction(max : mx)
                for (int j = 0; j < n_slots; j++) {
                    p[j] = j < seen ? p[j] * attn_scale + bias[j] : -INFINITY;
                    mx = p[j] > mx ? p[j] : mx;
                }
                if (mx == -INFINITY) { /* no real key visible (padding before any token) */
                    memset(p, 0, sizeof(float) * n_slots);
                    inv[i] = 0.f;
                    continue;
                }
#pragma omp simd reduction(+ : total)
                for (int j = 0; j < n_slots; j++) {
                    p[j] = exp_(p[j] - mx);
                    total += p[j];
                }
                inv[i] = 1.f / total;
            }
            memset(O, 0, sizeof(float) * nq * HD);
            mm_nn_acc(nq, n_slots, HD, S, ld, V, HD, O, HD);
            for (int i = 0; i < nq; i++) { /* query i is head g * groups + i / L at token i % L */
                float *o = att + ((size_t)b * s->L + i % s->L) * QD + (size_t)(g * groups + i / s->L) * HD;
                for (int d = 0; d < HD; d++) o[d] = O[(size_t)i * HD + d] * inv[i];
            }
        }
    }
}

static int block_rows(const Step *s) {
    const int R = s->B * s->L, D = s->D, H = s->H, G = s->KVH, HD = s->HD;
    const int QD = H * HD, KVD = 2 * G * HD;
    /* one work buffer, carved below: the block's own floats, the attention's and the FFN's work space, the queries */
    const size_t floats = (size_t)R * (2 * D + 2 * QD + KVD) + attend_floats(s) + ffn_floats(s, R) + ffn_ints(s, R) +
                          (size_t)R * QD;
    float *work = malloc(sizeof(float) * floats);
    if (!work) return 1;
    float *xn = work, *q = xn + (size_t)R * D, *kv = q + (size_t)R * QD, *att = kv + (size_t)R * KVD;
    float *y = att + (size_t)R * QD, *aw = y + (size_t)R * D, *fw = aw + attend_floats(s);
    /* the rotated queries, head-major (B, H, L, HD): the caller's buffer where it keeps them (NACL) */
    float *qh = s->queries ? s->queries : fw + ffn_floats(s, R) + ffn_ints(s, R);

    /* attention: projections, QK-norm, RoPE, cache write */
    for (int r = 0; r < R; r++) rms_norm(D, s->x + (size_t)r * D, s->attn_norm, s->eps_attn, xn + (size_t)r * D);
    mm_nt(R, D, QD, xn, s->wq, q);
    mm_nt(R, D, KVD, xn, s->wkv, kv);
    qk_prep(s->B, s->L, H, G, HD, s->held, s->cap, s->eps_q, s->eps_k, q, kv, s->q_norm, s->k_norm, s->cos, s->sin, qh,
            s->keys, s->values);
    attend(s, qh, att, aw);
    mm_nt(R, QD, D, att, s->wo, y);
    for (size_t i = 0; i < (size_t)R * D; i++) s->x[i] += y[i];

    /* FFN */
    for (int r = 0; r < R; r++) rms_norm(D, s->x + (size_t)r * D, s->ffn_norm, s->eps_ffn, xn + (size_t)r * D);
    ffn_rows(s, R, xn, y, fw);
    for (size_t i = 0; i < (size_t)R * D; i++) s->x[i] += y[i];
    free(work);
    return 0;
}

/* the output head of a fused step: y (R, N) = x (R, D) W^T */
void omniar_linear(int R, int K, int N, const float *x, const float *W, float *y) { mm_nt(R, K, N, x, W, y); }

/* Batch entries never meet inside a block: up to s->threads parts of the batch run at once, on torch's OpenMP
 * threads (this library's libgomp.so.1 resolves to the runtime torch has loaded), each part as one call would:
 * run(part, row of its first batch entry, ctx) for each; nonzero if any part failed. */
static int over_parts(const Step *s, int (*run)(const Step *, int, void *), void *ctx) {
    const int parts = s->threads < s->B ? (s->threads > 1 ? s->threads : 1) : s->B;
    const size_t bytes = s->bf16 ? 2 : 4; /* of a cache or query element */
    int rc = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(| : rc)
    for (int i = 0; i < parts; i++) {
        const int b0 = s->B * i / parts;
        const size_t kv_offset = (size_t)b0 * s->KVH * s->cap * s->HD * bytes;
        Step q = *s;
        q.B = s->B * (i + 1) / parts - b0;
        if (q.key_ok) q.key_ok += (size_t)b0 * s->cap;
        if (q.keys) q.keys = (float *)((char *)q.keys + kv_offset);
        if (q.values) q.values = (float *)((char *)q.values + kv_offset);
        if (q.x) q.x += (size_t)b0 * s->L * s->D;
        if (q.queries) q.queries = (float *)((char *)q.queries + (size_t)b0 * s->H * s->L * s->HD * bytes);
        rc |= run(&q, b0, ctx);
    }
    return rc;
}

/* a part's input and output arrays (fp32 or bf16, as the run reads them), offset by the part's first entry inside
 * its run */
typedef struct {
    const void *in;
    void *out;
} InOut;

/* the q and kv projections' rows of an eager step (fp32 or bf16), offset by the part's first entry inside its run */
typedef struct {
    const void *q, *kv;
} Projections;

static int qk_prep_part(const Step *p, int b0, void *ctx) {
    const Projections *in = ctx;
    const size_t bytes = p->bf16 ? 2 : 4, row = (size_t)b0 * p->L;
    const char *q = (const char *)in->q + row * p->H * p->HD * bytes;
    const char *kv = (const char *)in->kv + row * 2 * p->KVH * p->HD * bytes;
    if (p->bf16)
        return qk_prep_bf16(p->B, p->L, p->H, p->KVH, p->HD, p->held, p->cap, p->eps_q, p->eps_k, (const bf16 *)q,
                            (const bf16 *)kv, (const bf16 *)p->q_norm, (const bf16 *)p->k_norm, (const bf16 *)p->cos,
                            (const bf16 *)p->sin, (bf16 *)p->queries, (bf16 *)p->keys, (bf16 *)p->values);
    qk_prep(p->B, p->L, p->H, p->KVH, p->HD, p->held, p->cap, p->eps_q, p->eps_k, (const float *)q, (const float *)kv,
            p->q_norm, p->k_norm, p->cos, p->sin, p->queries, p->keys, p->values);
    return 0;
}

/* qk_prep for an eager step, in fp32 or (s->bf16) in bf16, from the projections q (B, L, H * HD) and kv
 * (B, L, 2 * KVH * HD) into s->queries and the cache: s holds B, L, H, KVH, HD, held, cap, eps_q, eps_k, q_norm,
 * k_norm, cos, sin, keys, values, queries, threads; the batch in parts (over_parts). */
int omniar_qk_prep(const Step *s, const void *q, const void *kv) {
    Projections in = {q, kv};
    return over_parts(s, qk_prep_part, &in);
}

#ifdef __AVX512BF16__
#include <immintrin.h>
#include <stdint.h>

/* exp of 16 lanes for the bf16 attention, whose probabilities are rounded to bf16 (8 bits): exp_'s reduction with
 * a degree-5 polynomial (2.4e-6 relative); lanes below -87 (masked slots come as -inf) give 0 */
static inline __m512 exp16(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 120), r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(live, p, n);
}

/* 16 bf16 widened to fp32 */
static inline __m512 load16_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

/* Per-channel sums over the S rows of C channels x (C = 16 nv), of x itself (mean NULL) or of its squared deviations
 * from mean (C floats), into sums (C doubles): fp32 lanes, flushed every 256 rows */
static void channel_sums(int S, int nv, const bf16 *x, const float *mean, double *sums) {
    __m512 acc[nv];
    memset(sums, 0, sizeof(double) * 16 * nv);
    for (int s0 = 0; s0 < S; s0 += 256) {
        for (int v = 0; v < nv; v++) acc[v] = _mm512_setzero_ps();
        for (int s = s0; s < S && s < s0 + 256; s++)
            for (int v = 0; v < nv; v++) {
                const __m512 a = load16_bf16(x + ((size_t)s * nv + v) * 16);
                if (!mean) {
                    acc[v] = _mm512_add_ps(acc[v], a);
                } else {
                    const __m512 d = _mm512_sub_ps(a, _mm512_loadu_ps(mean + v * 16));
                    acc[v] = _mm512_fmadd_ps(d, d, acc[v]);
                }
            }
        for (int v = 0; v < nv; v++) {
            float lanes[16];
            _mm512_storeu_ps(lanes, acc[v]);
            for (int j = 0; j < 16; j++) sums[v * 16 + j] += lanes[j];
        }
    }
}

/* Per-channel mean of groups of Cg channels: each channel gets its group's sum of sums / n */
static void group_means(int C, int Cg, double n, const double *sums, float *out) {
    for (int c0 = 0; c0 < C; c0 += Cg) {
        double t = 0.;
        for (int c = c0; c < c0 + Cg; c++) t += sums[c];
        for (int c = c0; c < c0 + Cg; c++) out[c] = (float)(t / n);
    }
}

/* GroupNorm (G groups of C / G channels, affine w and b in fp32) then SiLU of channels-last bf16 x into y: `items`
 * blocks of S rows of C channels (C a multiple of 16, at most 4096), each block's statistics its own, in fp32 (the
 * mean, then the squared deviations from it), the output rounded once; blocks split over up to `threads` OpenMP
 * threads. 1 (nothing done) for shapes outside these bounds. */
int omniar_group_norm_silu(int threads, int items, int S, int C, int G, float eps, const void *x, const float *w,
                           const float *b, void *y) {
    if (C % 16 || C > 4096 || G < 1 || C % G || S < 1) return 1;
    const int nv = C / 16, Cg = C / G;
#pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if (items >= 2)
    for (int i = 0; i < items; i++) {
        const bf16 *in = (const bf16 *)x + (size_t)i * S * C;
        bf16 *out = (bf16 *)y + (size_t)i * S * C;
        double sums[C];
        float mean[C], var[C], scale[C], shift[C];
        channel_sums(S, nv, in, NULL, sums);
        group_means(C, Cg, (double)S * Cg, sums, mean);
        channel_sums(S, nv, in, mean, sums);
        group_means(C, Cg, (double)S * Cg, sums, var);
        for (int c = 0; c < C; c++) {
            scale[c] = w[c] / sqrtf(var[c] + eps);
            shift[c] = b[c] - mean[c] * scale[c];
        }
        for (int s = 0; s < S; s++)
            for (int v = 0; v < nv; v++) {
                const size_t at = ((size_t)s * nv + v) * 16;
                const __m512 h = _mm512_fmadd_ps(load16_bf16(in + at), _mm512_loadu_ps(scale + v * 16),
                                                 _mm512_loadu_ps(shift + v * 16));
                /* h / (1 + exp(-h)); rcp14's 2^-14 relative error is far inside bf16's 2^-9 */
                const __m512 g = _mm512_mul_ps(h, _mm512_rcp14_ps(_mm512_add_ps(
                    _mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), h)))));
                _mm256_storeu_si256((void *)(out + at), (__m256i)_mm512_cvtneps_pbh(g));
            }
    }
    return 0;
}

/* Work space of attend_bf16, in 4-byte words. */
static size_t attend_bf16_words(const Step *s) {
    const size_t n32 = ((size_t)s->held + s->L + 31) / 32 * 32, nq = (size_t)s->H / s->KVH * s->L;
    return n32 * (1 + s->HD) + nq * n32 * 3 / 2 + nq;
}

/* S (rb, nv * 16) = Q K^T for rb query rows (ldq words apart) over nv vectors of packed keys */
static inline __attribute__((always_inline)) void qk_tile(int rb, int nv, int pairs, const uint32_t *q, int ldq,
                                                          const uint32_t *kp, int n32, float *S) {
    __m512 acc[4][4];
    for (int i = 0; i < rb; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = _mm512_setzero_ps();
    for (int c = 0; c < pairs; c++) {
        __m512bh k[4];
        for (int v = 0; v < nv; v++) k[v] = (__m512bh)_mm512_loadu_si512(kp + (size_t)c * n32 + v * 16);
        for (int i = 0; i < rb; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)q[(size_t)i * ldq + c]);
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, k[v]);
        }
    }
    for (int i = 0; i < rb; i++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(S + (size_t)i * n32 + v * 16, acc[i][v]);
}

/* C (m, N) fp32 = A B for m rows of A (`pairs` bf16 pairs each, lda words apart) and B packed as (pairs, N) pairs
 * along the summed dimension, N a multiple of 32; C's and B's rows are N apart. Tiles of 4 rows by 64 columns. */
static void gemm_bf16(int m, int N, int pairs, const uint32_t *A, int lda, const uint32_t *B, float *C) {
    for (int i = 0; i < m; i += 4) {
        const int rb = m - i < 4 ? m - i : 4;
        for (int n = 0; n < N; n += 64) {
            const int nv = N - n >= 64 ? 4 : 2;
            const uint32_t *a = A + (size_t)i * lda;
            float *c = C + (size_t)i * N + n;
            switch (rb * 8 + nv) { /* constant tile sizes: the accumulators stay in registers */
#define TILE(rb, nv)                                                                                                   \
    case rb * 8 + nv: qk_tile(rb, nv, pairs, a, lda, B + n, N, c); break;
                TILE(4, 4) TILE(4, 2) TILE(3, 4) TILE(3, 2) TILE(2, 4) TILE(2, 2) TILE(1, 4) TILE(1, 2)
#undef TILE
            }
        }
    }
}

/* Winograd F(2 x 2, 3 x 3)'s 1D transform of a 4 x 4 tile's line r[0], r[s], r[2 s], r[3 s], in place: B^T d */
static inline void winograd_line(__m512 *r, int s) {
    const __m512 a = r[0], b = r[s], c = r[2 * s], d = r[3 * s];
    r[0] = a - c;
    r[s] = b + c;
    r[2 * s] = c - b;
    r[3 * s] = b - d;
}

#define WINOGRAD_TILES 8 /* 2 x 2 output tiles a product block */

/* 3 x 3 convolution (stride 1, zero padding 1) of N channels-last bf16 images x (H, W, C), H and W even, C a multiple
 * of 32, into y (N, H, W, K), K a multiple of 32, by Winograd F(2 x 2, 3 x 3): each 2 x 2 output tile from the
 * transform B^T d B of its 4 x 4 input tile d (fp32 sums of the bf16 inputs, rounded to bf16), 16 products with the
 * transformed weights u ((16, C / 2, K) bf16 pairs: G g G^T of each 3 x 3 kernel g) accumulated in fp32, and the
 * output transform A^T m A plus the fp32 bias (or none) in fp32, rounded once: 4 x 4 instead of 9 x 4 products a
 * tile. Rows of tiles split over up to `threads` OpenMP threads. 1 (nothing done) outside these bounds. */
int omniar_winograd_bf16(int threads, int N, int H, int W, int C, int K, const void *x, const void *u,
                         const float *bias, void *y) {
    if (C % 32 || K % 32 || H % 2 || W % 2 || N < 1 || H < 2 || W < 2) return 1;
    const int th = H / 2, tw = W / 2, pairs = C / 2, T = WINOGRAD_TILES;
    int rc = 0;
#pragma omp parallel num_threads(threads > 1 ? threads : 1) reduction(| : rc)
    {
        uint32_t *V = malloc(sizeof(uint32_t) * 16 * T * pairs);
        float *M = malloc(sizeof(float) * 16 * T * K);
        rc = !V || !M;
#pragma omp for schedule(static)
        for (long task = 0; task < (long)N * th; task++) {
            if (rc) continue;
            const int n = (int)(task / th), ty = (int)(task % th);
            const bf16 *img = (const bf16 *)x + (size_t)n * H * W * C;
            bf16 *out = (bf16 *)y + (size_t)n * H * W * K;
            for (int t0 = 0; t0 < tw; t0 += T) {
                const int tiles = tw - t0 < T ? tw - t0 : T;
                for (int t = 0; t < tiles; t++)
                    for (int c = 0; c < C; c += 32) {
                        __m512 d[2][16];
                        for (int i = 0; i < 4; i++)
                            for (int j = 0; j < 4; j++) {
                                const int r = 2 * ty - 1 + i, col = 2 * (t0 + t) - 1 + j;
                                const int inside = r >= 0 && r < H && col >= 0 && col < W;
                                for (int h = 0; h < 2; h++)
                                    d[h][i * 4 + j] = inside ? load16_bf16(img + ((size_t)r * W + col) * C + c + 16 * h)
                                                             : _mm512_setzero_ps();
                            }
                        for (int h = 0; h < 2; h++) {
                            for (int j = 0; j < 4; j++) winograd_line(d[h] + j, 4); /* down the columns */
                            for (int i = 0; i < 4; i++) winograd_line(d[h] + 4 * i, 1); /* along the rows */
                        }
                        for (int e = 0; e < 16; e++)
                            _mm512_storeu_si512(V + ((size_t)e * T + t) * pairs + c / 2,
                                                (__m512i)_mm512_cvtne2ps_pbh(d[1][e], d[0][e]));
                    }
                for (int e = 0; e < 16; e++)
                    gemm_bf16(tiles, K, pairs, V + (size_t)e * T * pairs, pairs,
                              (const uint32_t *)u + (size_t)e * pairs * K, M + (size_t)e * T * K);
                for (int t = 0; t < tiles; t++)
                    for (int k = 0; k < K; k += 16) {
                        __m512 m[16], s[8];
                        for (int e = 0; e < 16; e++) m[e] = _mm512_loadu_ps(M + ((size_t)e * T + t) * K + k);
                        for (int j = 0; j < 4; j++) { /* A^T m: rows 0 + 1 + 2 and 1 - 2 - 3 */
                            s[j] = m[j] + m[4 + j] + m[8 + j];
                            s[4 + j] = m[4 + j] - m[8 + j] - m[12 + j];
                        }
                        const __m512 b = bias ? _mm512_loadu_ps(bias + k) : _mm512_setzero_ps();
                        for (int a = 0; a < 2; a++) { /* then A: columns alike */
                            const __m512 *r = s + 4 * a, o[2] = {r[0] + r[1] + r[2] + b, r[1] - r[2] - r[3] + b};
                            bf16 *at = out + ((size_t)(2 * ty + a) * W + 2 * (t0 + t)) * K + k;
                            for (int q = 0; q < 2; q++)
                                _mm256_storeu_si256((void *)(at + (size_t)q * K), (__m256i)_mm512_cvtneps_pbh(o[q]));
                        }
                    }
            }
        }
        free(V);
        free(M);
    }
    return rc;
}

/* out rows (rb of them, nv * 16 head dims) = scale x P V for rb rows of bf16 probabilities (ldp words apart) over
 * the packed values (HD words a slot pair), rounded to bf16 */
static inline __attribute__((always_inline)) void pv_tile(int rb, int nv, int pairs, const uint32_t *p, int ldp,
                                                          const uint32_t *vp, int HD, bf16 *const *out,
                                                          const float *scale) {
    __m512 acc[8][4];
    for (int i = 0; i < rb; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = _mm512_setzero_ps();
    for (int t = 0; t < pairs; t++) {
        __m512bh w[4];
        for (int v = 0; v < nv; v++) w[v] = (__m512bh)_mm512_loadu_si512(vp + (size_t)t * HD + v * 16);
        for (int i = 0; i < rb; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)p[(size_t)i * ldp + t]);
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, w[v]);
        }
    }
    for (int i = 0; i < rb; i++)
        for (int v = 0; v < nv; v++)
            _mm256_storeu_si256((__m256i *)(out[i] + v * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][v], _mm512_set1_ps(scale[i]))));
}

/* The bf16 form of attend (a next-scale step, or with s->causal the prompt pass), on AVX-512 BF16's pair dot
 * products (two bf16 products summed into an fp32 lane): scores S = Q K^T and O = P V accumulate in fp32, the
 * softmax runs in fp32, the probabilities go into O = P V rounded to bf16 (as torch's CPU flash kernel does), and
 * O is scaled by 1 / sum before its bf16 rounding. Both products need their operands as pairs along the summed
 * dimension: the keys are copied once per batch row and kv head as (HD / 2, slots) pairs of head dims, the values
 * as (slots / 2, HD) pairs of slots, both padded with zeros to whole tiles of 32 slots.
 * att (B, L, H * HD) bf16 = attend's result for the bf16 rotated queries qh (B, H, L, HD) and the bf16 cache. */
static void attend_bf16(const Step *s, const bf16 *qh, bf16 *att, uint32_t *work) {
    const int H = s->H, G = s->KVH, HD = s->HD, QD = H * HD, groups = H / G, n_slots = s->held + s->L;
    const int nq = groups * s->L, n32 = (n_slots + 31) / 32 * 32, pairs = HD / 2;
    const float attn_scale = 1.f / sqrtf((float)HD);
    float *bias = (float *)work, *S = bias + n32;
    uint32_t *kp = (uint32_t *)(S + (size_t)nq * n32), *vp = kp + (size_t)pairs * n32;
    uint32_t *P = vp + (size_t)n32 / 2 * HD;
    float *inv = (float *)(P + (size_t)nq * n32 / 2);
    for (int b = 0; b < s->B; b++) {
        const unsigned char *ok = s->key_ok + (size_t)b * s->cap;
        for (int j = 0; j < n32; j++) bias[j] = j < n_slots && ok[j] ? 0.f : -INFINITY;
        for (int g = 0; g < G; g++) {
            const uint32_t *Q = (const uint32_t *)(qh + ((size_t)b * H + (size_t)g * groups) * s->L * HD);
            const bf16 *K = (const bf16 *)s->keys + ((size_t)b * G + g) * s->cap * HD;
            const bf16 *V = (const bf16 *)s->values + ((size_t)b * G + g) * s->cap * HD;
            for (int c = 0; c < pairs; c++) { /* key j's head-dim pairs, one per row of kp */
                const uint32_t *k = (const uint32_t *)K + c;
                uint32_t *row = kp + (size_t)c * n32;
                for (int j = 0; j < n_slots; j++) row[j] = k[(size_t)j * pairs];
                for (int j = n_slots; j < n32; j++) row[j] = 0u;
            }
            for (int t = 0; t < n32 / 2; t++) /* slots 2t and 2t + 1, interleaved per head dim */
                for (int d = 0; d < HD; d += 16) {
                    const __m512i lo = 2 * t < n_slots
                        ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(V + (size_t)2 * t * HD + d)))
                        : _mm512_setzero_si512();
                    const __m512i hi = 2 * t + 1 < n_slots
                        ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(V + (size_t)(2 * t + 1) * HD + d)))
                        : _mm512_setzero_si512();
                    _mm512_storeu_si512(vp + (size_t)t * HD + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
            gemm_bf16(nq, n32, pairs, Q, pairs, kp, S);
            for (int i = 0; i < nq; i++) { /* softmax numerators, to bf16 pairs; O is scaled by 1 / sum at the end */
                float *p = S + (size_t)i * n32;
                __m512 top = _mm512_set1_ps(-INFINITY);
                const int seen = s->causal ? s->held + i % s->L + 1 : n_slots; /* causal: through its own slot */
                for (int j = 0; j < n32; j += 16) {
                    const __mmask16 live = j + 16 <= seen ? 0xFFFF : (j >= seen ? 0 : (1u << (seen - j)) - 1);
                    const __m512 v = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), _mm512_fmadd_ps(
                        _mm512_loadu_ps(p + j), _mm512_set1_ps(attn_scale), _mm512_loadu_ps(bias + j)));
                    _mm512_storeu_ps(p + j, v);
                    top = _mm512_max_ps(top, v);
                }
                const float mx = _mm512_reduce_max_ps(top);
                const __m512 m = _mm512_set1_ps(mx > -INFINITY ? mx : 0.f); /* no real key: all lanes give 0 */
                __m512 total = _mm512_setzero_ps();
                uint32_t *row = P + (size_t)i * n32 / 2;
                for (int j = 0; j < n32; j += 32) {
                    const __m512 lo = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), m));
                    const __m512 hi = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j + 16), m));
                    total = _mm512_add_ps(total, _mm512_add_ps(lo, hi));
                    _mm512_storeu_si512(row + j / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)); /* high half first */
                }
                const float sum = _mm512_reduce_add_ps(total);
                inv[i] = sum > 0.f ? 1.f / sum : 0.f;
            }
            const int wide = HD / 16 <= 2; /* 8 rows a tile where the head is at most two vectors, else 4 */
            for (int i = 0; i < nq; i += wide ? 8 : 4) {
                const int rb = nq - i < (wide ? 8 : 4) ? nq - i : (wide ? 8 : 4);
                bf16 *out[8]; /* query i is head g * groups + i / L at token i % L */
                for (int r = 0; r < rb; r++) {
                    const int query = i + r;
                    out[r] = att + ((size_t)b * s->L + query % s->L) * QD + (size_t)(g * groups + query / s->L) * HD;
                }
                const uint32_t *p = P + (size_t)i * n32 / 2;
                for (int d = 0; d < HD; ) {
                    const int nv = HD - d >= 64 && !wide ? 4 : (HD - d >= 32 ? 2 : 1);
                    bf16 *o[8];
                    for (int r = 0; r < rb; r++) o[r] = out[r] + d;
                    switch (rb * 8 + nv) {
#define TILE(rb, nv)                                                                                                   \
    case rb * 8 + nv: pv_tile(rb, nv, n32 / 2, p, n32 / 2, vp + d, HD, o, inv + i); break;
#define ROWS(nv) TILE(1, nv) TILE(2, nv) TILE(3, nv) TILE(4, nv)
                        ROWS(4) ROWS(2) ROWS(1) TILE(5, 2) TILE(6, 2) TILE(7, 2) TILE(8, 2) TILE(5, 1) TILE(6, 1)
                        TILE(7, 1) TILE(8, 1)
#undef ROWS
#undef TILE
                    }
                    d += nv * 16;
                }
            }
        }
    }
}

/* out (m, w) bf16 pairs = silu(gate) * up, times scale[i] where given, of fp32 rows h (m, 2w): gate the first w
 * columns, up the last w (w a multiple of 32) */
static void swiglu_bf16(int m, int w, const float *h, const float *scale, uint32_t *out) {
    for (int i = 0; i < m; i++) {
        const float *g = h + (size_t)i * 2 * w, *u = g + w;
        const __m512 sc = _mm512_set1_ps(scale ? scale[i] : 1.f), one = _mm512_set1_ps(1.f);
        for (int j = 0; j < w; j += 32) {
            __m512 v[2];
            for (int t = 0; t < 2; t++) {
                const __m512 a = _mm512_loadu_ps(g + j + 16 * t);
                const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));
                v[t] = _mm512_mul_ps(_mm512_div_ps(_mm512_mul_ps(a, _mm512_loadu_ps(u + j + 16 * t)),
                                                   _mm512_add_ps(one, e)), sc);
            }
            _mm512_storeu_si512(out + (size_t)i * w / 2 + j / 2, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
        }
    }
}

/* One SwiGLU expert on m bf16 rows A (D / 2 pairs each, lda words apart) into Y (m, D) fp32: w_in packed (D / 2,
 * 2 hid) pairs, w_out (hid / 2, D); each row's hidden times scale[i] where given; H and S work space */
static void expert_bf16(int m, int D, int hid, const uint32_t *A, int lda, const uint32_t *w_in,
                        const uint32_t *w_out, const float *scale, float *H, uint32_t *S, float *Y) {
    gemm_bf16(m, 2 * hid, D / 2, A, lda, w_in, H);
    swiglu_bf16(m, hid, H, scale, S);
    gemm_bf16(m, D, hid / 2, S, hid / 2, w_out, Y);
}

enum { MOE_BLOCK = 64 }; /* rows of one expert task, and of one shared-expert / combine block */

/* the tasks (blocks of MOE_BLOCK pairs) of expert e, whose pairs run from counts[e] to counts[e + 1] */
static inline int expert_tasks(const int *counts, int e) {
    return (counts[e + 1] - counts[e] + MOE_BLOCK - 1) / MOE_BLOCK;
}

/* MoELayer's eval output for R bf16 rows x (R, D) routed to experts idx (R, top_k) with combine weights gate (R,
 * top_k, fp32), into y (R, D) bf16: each routed expert on its rows in blocks (gathered, its hidden scaled by the
 * combine weight, as dropless_moe does), the blocks split over up to `threads` OpenMP threads; then per block of rows
 * the shared expert and the sum, rounded to bf16 once. Weights packed as bf16 pairs along the summed dimension:
 * w_in (E, D / 2, 2 hid), w_out (E, hid / 2, D), s_in (D / 2, 2 s_hid) and s_out (s_hid / 2, D) (NULL: no shared
 * expert). Products accumulate in fp32 (AVX-512 BF16); each expert's hidden is rounded to bf16 before its second
 * product. D, hid and s_hid multiples of 32. Nonzero if a buffer could not be allocated. */
int omniar_moe_bf16(int threads, int R, int D, int E, int top_k, int hid, int s_hid, const bf16 *x,
                    const long long *idx, const float *gate, const uint32_t *w_in, const uint32_t *w_out,
                    const uint32_t *s_in, const uint32_t *s_out, bf16 *y) {
    const int wide = 2 * (hid > s_hid ? hid : s_hid), n = R * top_k;
    /* counts: expert e's pairs start at counts[e]; fill: where its next pair goes */
    int *counts = calloc(2 * (size_t)E + 1, sizeof(int)), *order = malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    float *routed = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * D);
    if (!counts || !order || !routed) {
        free(counts), free(order), free(routed);
        return 1;
    }
    int *fill = counts + E + 1, tasks = 0;
    for (int a = 0; a < n; a++) counts[idx[a] + 1]++; /* counting sort of the (row, slot) pairs by expert */
    for (int e = 0; e < E; e++) counts[e + 1] += counts[e];
    for (int e = 0; e < E; e++) tasks += expert_tasks(counts, e);
    memcpy(fill, counts, sizeof(int) * (size_t)E);
    for (int a = 0; a < n; a++) order[fill[idx[a]]++] = a;
    int rc = 0;
#pragma omp parallel num_threads(threads > 1 ? threads : 1) reduction(| : rc)
    {
        /* one work space a thread: gathered rows, hidden (fp32), hidden (bf16 pairs), scales, outputs; a thread
         * without one still meets both loops (every thread must), doing nothing */
        const size_t rows_words = (size_t)MOE_BLOCK * D / 2, h_floats = (size_t)MOE_BLOCK * wide;
        uint32_t *A = malloc(sizeof(uint32_t) * (rows_words + h_floats + h_floats / 4 + MOE_BLOCK +
                                                 (size_t)MOE_BLOCK * D));
        float *H = (float *)(A + rows_words);
        uint32_t *S = (uint32_t *)(H + h_floats);
        float *scale = (float *)(S + h_floats / 4), *Y = scale + MOE_BLOCK;
        rc |= !A;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < tasks; t++) {
            if (!A) continue;
            int e = 0, first = t; /* task t: block `first` of expert e's pairs */
            while (first >= expert_tasks(counts, e)) first -= expert_tasks(counts, e++);
            const int *pairs = order + counts[e] + first * MOE_BLOCK;
            const int left = counts[e + 1] - counts[e] - first * MOE_BLOCK, m = left < MOE_BLOCK ? left : MOE_BLOCK;
            for (int i = 0; i < m; i++) {
                memcpy(A + (size_t)i * D / 2, x + (size_t)(pairs[i] / top_k) * D, sizeof(bf16) * D);
                scale[i] = gate[pairs[i]];
            }
            expert_bf16(m, D, hid, A, D / 2, w_in + (size_t)e * D / 2 * 2 * hid, w_out + (size_t)e * hid / 2 * D,
                        scale, H, S, Y);
            for (int i = 0; i < m; i++) memcpy(routed + (size_t)pairs[i] * D, Y + (size_t)i * D, sizeof(float) * D);
        }
#pragma omp for schedule(static)
        for (int r0 = 0; r0 < R; r0 += MOE_BLOCK) {
            if (!A) continue;
            const int m = R - r0 < MOE_BLOCK ? R - r0 : MOE_BLOCK;
            if (s_in)
                expert_bf16(m, D, s_hid, (const uint32_t *)(x + (size_t)r0 * D), D / 2, s_in, s_out, NULL, H, S, Y);
            for (int i = 0; i < m; i++)
                for (int d = 0; d < D; d += 32) {
                    __m512 v[2];
                    for (int h = 0; h < 2; h++) {
                        v[h] = s_in ? _mm512_loadu_ps(Y + (size_t)i * D + d + 16 * h) : _mm512_setzero_ps();
                        for (int k = 0; k < top_k; k++)
                            v[h] = _mm512_add_ps(v[h], _mm512_loadu_ps(routed + ((size_t)(r0 + i) * top_k + k) * D +
                                                                       d + 16 * h));
                    }
                    _mm512_storeu_si512(y + (size_t)(r0 + i) * D + d, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
                }
        }
        free(A);
    }
    free(counts), free(order), free(routed);
    return rc;
}

static int attend_bf16_part(const Step *q, int b0, void *ctx) {
    const InOut *io = ctx;
    uint32_t *work = malloc(sizeof(uint32_t) * attend_bf16_words(q));
    if (!work) return 1;
    attend_bf16(q, (const bf16 *)io->in + (size_t)b0 * q->H * q->L * q->HD,
                (bf16 *)io->out + (size_t)b0 * q->L * q->H * q->HD, work);
    free(work);
    return 0;
}
#endif

/* 1 where this build has attend_bf16 (the CPU has AVX-512 BF16), else 0 */
int omniar_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

static int attend_part(const Step *q, int b0, void *ctx) {
    const InOut *io = ctx;
    float *work = malloc(sizeof(float) * attend_floats(q));
    if (!work) return 1;
    attend(q, (const float *)io->in + (size_t)b0 * q->H * q->L * q->HD,
           (float *)io->out + (size_t)b0 * q->L * q->H * q->HD, work);
    free(work);
    return 0;
}

/* The attention of an eager step (attend) into att (B, L, H * HD), from the rotated queries qh (B, H, L, HD) and the
 * keys and values already in the cache: s holds the attention's fields (B, L, H, KVH, HD, held, cap, key_ok, keys,
 * values, causal, threads), the batch in parts (over_parts). With s->bf16 (only where omniar_bf16(), HD a multiple
 * of 16) qh, att and the cache are bf16. */
int omniar_attention(const Step *s, const void *qh, void *att) {
    InOut io = {qh, att};
#ifdef __AVX512BF16__
    if (s->bf16) return over_parts(s, attend_bf16_part, &io);
#endif
    return over_parts(s, attend_part, &io);
}

static int ffn_part(const Step *q, int r0, void *ctx) {
    const InOut *io = ctx;
    float *work = malloc(sizeof(float) * (ffn_floats(q, q->B) + ffn_ints(q, q->B)));
    if (!work) return 1;
    ffn_rows(q, q->B, (const float *)io->in + (size_t)r0 * q->D, (float *)io->out + (size_t)r0 * q->D, work);
    free(work);
    return 0;
}

/* MoELayer.forward in eval of the R rows x (R, D) into y (R, D): s holds the FFN's fields (D, E, top_k, hidden,
 * shared_hidden, sigmoid, router, bias, w_in, w_out, s_in, s_out) and threads; rows never meet, so they run in parts
 * as a step's batch entries do (over_parts, a row for an entry). */
int omniar_moe(const Step *s, int R, const float *x, float *y) {
    Step rows = *s;
    rows.B = R;
    rows.L = 1;
    InOut io = {x, y};
    return over_parts(&rows, ffn_part, &io);
}

static int block_part(const Step *q, int b0, void *ctx) {
    (void)b0, (void)ctx;
    return block_rows(q);
}

/* One block of a step, its batch in parts (over_parts). */
int omniar_block_step(const Step *s) { return over_parts(s, block_part, NULL); }
