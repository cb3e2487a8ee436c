/* raymoe CPU kernels for decode-shaped products: few rows against weights streamed from memory.
 *
 * Built on the host that runs them (`cc -O3 -march=native`, see cpu_kernels.py) and called through ctypes on the
 * data of contiguous fp32 tensors. Single-threaded: the caller decides when they beat the BLAS (cpu_kernels.py).
 *
 * y = x · Wᵀ with W in nn.Linear's [N, K] layout (each output row of W is K contiguous floats):
 *   - M >= TILE_MIN rows (and K a multiple of the vector width): 4 weight rows x 4 x rows register tiles,
 *     16 accumulators, one horizontal sum per output: the compute-bound case (8 flops per weight byte at 16 rows).
 *   - fewer rows (and the rows left over): one weight row at a time against up to 8 x rows. The weight is then read
 *     strictly in order, one sequential stream, which is what reaches the machine's streaming read rate; a BLAS
 *     packs or walks several panels at once and reads a few-row product's weights at a fraction of it.
 * Accumulation is in fp32, in a different order than a BLAS: results agree to rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#else
#define THREAD_NUM() 0
#endif

/* Threads: the kernels split their outer loop (panels, experts, rows, heads) over g_threads OpenMP threads (set by
 * rm_set_threads: the caller's torch intra-op thread count). The build links the OpenMP runtime torch itself loaded
 * (same soname), so both use one thread pool. Built without OpenMP, every loop runs on the calling thread. */
static int g_threads = 1;
void rm_set_threads(int n) { g_threads = n < 1 ? 1 : n; }
int rm_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
#define PRAGMA_(x) _Pragma(#x)
#define PARALLEL_FOR(n) PRAGMA_(omp parallel for num_threads(g_threads) schedule(static) if(g_threads > 1 && (n) > 1))

#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
#define VW 16
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif defined(__AVX__)
typedef float vf __attribute__((vector_size(32)));
#define VW 8
static inline float hsum(vf v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
#else
typedef float vf __attribute__((vector_size(16)));
#define VW 4
static inline float hsum(vf v) { return v[0] + v[1] + v[2] + v[3]; }
#endif

#define TILE_MIN 8

#if defined(__AVX__)
/* [sum a, sum b, sum c, sum d]: one transpose-and-add tree instead of four separate reductions */
static inline __m128 hsum4(vf a, vf b, vf c, vf d) {
#if defined(__AVX512F__)
  __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)a), _mm512_extractf32x8_ps((__m512)a, 1));
  __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)b), _mm512_extractf32x8_ps((__m512)b, 1));
  __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)c), _mm512_extractf32x8_ps((__m512)c, 1));
  __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)d), _mm512_extractf32x8_ps((__m512)d, 1));
#else
  __m256 a8 = (__m256)a, b8 = (__m256)b, c8 = (__m256)c, d8 = (__m256)d;
#endif
  __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#define STORE4(p, a, b, c, d) _mm_storeu_ps((p), hsum4((a), (b), (c), (d)))
#else
#define STORE4(p, a, b, c, d) \
  do { (p)[0] = hsum(a); (p)[1] = hsum(b); (p)[2] = hsum(c); (p)[3] = hsum(d); } while (0)
#endif

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

int rm_abi_version(void) { return 13; }
int rm_vector_width(void) { return VW; }

/* one weight row r [K] against MB rows of x (row stride ldx): y[b * ldy] = <x_b, r>; U independent chains over k */
#define ROWS(MB, U)                                                                                   \
  static inline void rows_##MB(const float *x, long ldx, const float *r, long K, float *y, long ldy) { \
    vf acc[U][MB];                                                                                    \
    for (int u = 0; u < U; u++)                                                                       \
      for (int b = 0; b < MB; b++) acc[u][b] = (vf){0};                                               \
    long k = 0;                                                                                       \
    for (; k + U * VW <= K; k += U * VW)                                                              \
      for (int u = 0; u < U; u++) {                                                                   \
        vf wv = ld(r + k + u * VW);                                                                   \
        for (int b = 0; b < MB; b++) acc[u][b] += wv * ld(x + b * ldx + k + u * VW);                  \
      }                                                                                               \
    for (; k + VW <= K; k += VW) {                                                                    \
      vf wv = ld(r + k);                                                                              \
      for (int b = 0; b < MB; b++) acc[0][b] += wv * ld(x + b * ldx + k);                             \
    }                                                                                                 \
    for (int b = 0; b < MB; b++) {                                                                    \
      vf s = acc[0][b];                                                                               \
      for (int u = 1; u < U; u++) s += acc[u][b];                                                     \
      float t = hsum(s);                                                                              \
      for (long kk = k; kk < K; kk++) t += r[kk] * x[b * ldx + kk];                                   \
      y[b * ldy] = t;                                                                                 \
    }                                                                                                 \
  }
ROWS(1, 4)
ROWS(2, 2)
ROWS(4, 2)
ROWS(8, 1)

/* 4 weight rows (w, row length K) x 4 x rows; K % VW == 0. Named accumulators keep the tile in registers. */
static inline void tile44(const float *x, long ldx, const float *w, long K, float *y, long ldy, int pf) {
  vf c00 = {0}, c01 = {0}, c02 = {0}, c03 = {0}, c10 = {0}, c11 = {0}, c12 = {0}, c13 = {0};
  vf c20 = {0}, c21 = {0}, c22 = {0}, c23 = {0}, c30 = {0}, c31 = {0}, c32 = {0}, c33 = {0};
  for (long k = 0; k < K; k += VW) {
    vf w0 = ld(w + k), w1 = ld(w + K + k), w2 = ld(w + 2 * K + k), w3 = ld(w + 3 * K + k);
    if (pf) { /* the next 4 weight rows, one cache line of each per step (a line is 16 floats) */
      for (int a = 4; a < 8; a++)
        for (long q = 0; q < VW; q += 16) __builtin_prefetch(w + a * K + k + q, 0, 3);
    }
    vf x0 = ld(x + k), x1 = ld(x + ldx + k), x2 = ld(x + 2 * ldx + k), x3 = ld(x + 3 * ldx + k);
    c00 += w0 * x0; c01 += w0 * x1; c02 += w0 * x2; c03 += w0 * x3;
    c10 += w1 * x0; c11 += w1 * x1; c12 += w1 * x2; c13 += w1 * x3;
    c20 += w2 * x0; c21 += w2 * x1; c22 += w2 * x2; c23 += w2 * x3;
    c30 += w3 * x0; c31 += w3 * x1; c32 += w3 * x2; c33 += w3 * x3;
  }
  STORE4(y, c00, c10, c20, c30);
  STORE4(y + ldy, c01, c11, c21, c31);
  STORE4(y + 2 * ldy, c02, c12, c22, c32);
  STORE4(y + 3 * ldy, c03, c13, c23, c33);
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) · w[N, K]ᵀ, w contiguous. */
void rm_linear(const float *x, long M, long K, long ldx, const float *w, long N, float *y, long ldy) {
  long m4 = (M >= TILE_MIN && K % VW == 0) ? M / 4 * 4 : 0;
  long n4 = m4 ? N / 4 * 4 : 0;
  for (long n = 0; n < n4; n += 4)
    for (long m = 0; m < m4; m += 4)
      tile44(x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy, m == 0 && n + 8 <= N);
  for (long n = 0; n < N; n++) {
    const float *r = w + n * K;
    long m = n < n4 ? m4 : 0;
    for (; m + 8 <= M; m += 8) rows_8(x + m * ldx, ldx, r, K, y + m * ldy + n, ldy);
    for (; m + 4 <= M; m += 4) rows_4(x + m * ldx, ldx, r, K, y + m * ldy + n, ldy);
    for (; m + 2 <= M; m += 2) rows_2(x + m * ldx, ldx, r, K, y + m * ldy + n, ldy);
    for (; m < M; m++) rows_1(x + m * ldx, ldx, r, K, y + m * ldy + n, ldy);
  }
}

/* ---------------------------------------------------------------------------------------------------------------
 * y = x · Wᵀ with W pre-packed in column panels: P [ceil(N / NR)][K][NR] (the last panel zero-padded), NR = NV
 * vectors. Each panel is one contiguous stream (and the panels follow each other: the whole weight is read strictly
 * in order); per k, up to MR rows of x are broadcast against the panel's NR columns into MR x NV vector accumulators:
 * no horizontal sums. The serving layout of dense linears (cpu_kernels.pack).
 *
 * Why MR x NV as below: at a decode batch's 16 rows every row must be multiplied in the same pass over a panel. Two
 * passes of 8 rows (the second from L2) leave the first pass wanting 8 bytes of weights per cycle (128 B per 16
 * FMAs), more than one core streams from memory, so it stalls on reads while the second computes: 53 GFLOP/s with
 * weights from memory on the dev host against 90 with them cached. With AVX-512 (32 registers) all 16 rows go in one
 * pass against one vector of columns (16 accumulators, 4 B of weights per FMA cycle); AVX2 (16 registers) keeps
 * 6 x 2 vectors, SSE 4 x 2. Leftover rows take the 8/4/2/1-row kernels. */
#if defined(__AVX512F__)
#define MR 16
#define NV 1
#elif defined(__AVX__)
#define MR 6
#define NV 2
#else
#define MR 4
#define NV 2
#endif
#define NR (NV * VW)

int rm_panel_width(void) { return NR; }

/* rows m .. m+R-1 of y (only the panel's `cols` valid columns) from one panel pp [K][NR] */
#define PANEL(R)                                                                                                  \
  static inline void panel_##R(const float *x, long ldx, long ldk, const float *pp, long K, float *y, long ldy,   \
                               long cols) {                                                                       \
    vf a[R][NV];                                                                                                  \
    for (int i = 0; i < R; i++)                                                                                   \
      for (int v = 0; v < NV; v++) a[i][v] = (vf){0};                                                             \
    for (long k = 0; k < K; k++) {                                                                                \
      vf w[NV];                                                                                                   \
      for (int v = 0; v < NV; v++) w[v] = ld(pp + k * NR + v * VW);                                               \
      __builtin_prefetch(pp + (k + 32 / NV) * NR, 0, 3);                                                          \
      for (int i = 0; i < R; i++) {                                                                               \
        float xv = x[i * ldx + k * ldk];                                                                          \
        for (int v = 0; v < NV; v++) a[i][v] += xv * w[v];                                                        \
      }                                                                                                           \
    }                                                                                                             \
    for (int i = 0; i < R; i++) {                                                                                 \
      float *yr = y + i * ldy;                                                                                    \
      if (cols == NR) {                                                                                           \
        for (int v = 0; v < NV; v++) memcpy(yr + v * VW, &a[i][v], sizeof(vf));                                   \
      } else {                                                                                                    \
        float t[NR];                                                                                              \
        for (int v = 0; v < NV; v++) memcpy(t + v * VW, &a[i][v], sizeof(vf));                                   \
        memcpy(yr, t, (size_t)cols * sizeof(float));                                                              \
      }                                                                                                           \
    }                                                                                                             \
  }
#define PANEL_EXPAND(R) PANEL(R)
#if MR > 8
PANEL_EXPAND(MR)
#endif
PANEL(8)
PANEL(6)
PANEL(4)
PANEL(2)
PANEL(1)
#define PANEL_MR_(R) panel_##R
#define PANEL_MR(R) PANEL_MR_(R)

/* one row: panel_1 with U k-chains (U = 4 / NV): with a single chain one row is bound by the FMA latency, and the
 * reads in flight are too few to stream */
#define U1 (4 / NV)
static inline void panel_1x(const float *x, const float *pp, long K, float *y, long cols) {
  vf a[U1][NV];
  for (int c = 0; c < U1; c++)
    for (int v = 0; v < NV; v++) a[c][v] = (vf){0};
  long k = 0;
  for (; k + U1 <= K; k += U1) {
    for (int c = 0; c < U1; c++)
      for (int v = 0; v < NV; v++) a[c][v] += x[k + c] * ld(pp + (k + c) * NR + v * VW);
  }
  for (; k < K; k++)
    for (int v = 0; v < NV; v++) a[0][v] += x[k] * ld(pp + k * NR + v * VW);
  float t[NR];
  for (int v = 0; v < NV; v++) {
    vf s = a[0][v];
    for (int c = 1; c < U1; c++) s += a[c][v];
    memcpy(t + v * VW, &s, sizeof s);
  }
  memcpy(y, t, (size_t)cols * sizeof(float));
}

void rm_linear_packed(const float *x, long M, long K, long ldx, const float *P, long N, float *y, long ldy) {
  long panels = (N + NR - 1) / NR;
  /* from 4 rows on, x is read transposed ([K][M], one contiguous line of broadcasts per k) */
  float *xt = NULL;
  long lr = ldx, lk = 1;
  if (M >= 4) {
    xt = (float *)malloc((size_t)(M * K) * sizeof(float));
    for (long m = 0; m < M; m++)
      for (long k = 0; k < K; k++) xt[k * M + m] = x[m * ldx + k];
    lr = 1;
    lk = M;
  }
  const float *xs = xt ? xt : x;
  PARALLEL_FOR(panels)
  for (long p = 0; p < panels; p++) {
    const float *pp = P + p * K * NR;
    long cols = N - p * NR < NR ? N - p * NR : NR;
    float *yp = y + p * NR;
    long m = 0;
    for (; m + MR <= M; m += MR) PANEL_MR(MR)(xs + m * lr, lr, lk, pp, K, yp + m * ldy, ldy, cols);
    if (MR > 8 && m + 8 <= M) { panel_8(xs + m * lr, lr, lk, pp, K, yp + m * ldy, ldy, cols); m += 8; }
    if (MR > 6 && m + 6 <= M) { panel_6(xs + m * lr, lr, lk, pp, K, yp + m * ldy, ldy, cols); m += 6; }
    if (m + 4 <= M) { panel_4(xs + m * lr, lr, lk, pp, K, yp + m * ldy, ldy, cols); m += 4; }
    if (m + 2 <= M) { panel_2(xs + m * lr, lr, lk, pp, K, yp + m * ldy, ldy, cols); m += 2; }
    if (m < M) {
      if (xt) panel_1(xs + m * lr, lr, lk, pp, K, yp + m * ldy, ldy, cols);
      else panel_1x(x + m * ldx, pp, K, yp + m * ldy, cols);
    }
  }
  free(xt);
}

/* h [c, I] = silu(g) ⊙ u for rows gu [c, 2I] = [g | u] (the SwiGLU between its two products) */
static inline void silu_mul(const float *gu, long c, long I, float *h) {
  for (long r = 0; r < c; r++)
    for (long i = 0; i < I; i++) {
      float g = gu[r * 2 * I + i], u = gu[r * 2 * I + I + i];
      h[r * I + i] = g / (1.0f + expf(-g)) * u;
    }
}

/* A dense SwiGLU (shared expert, dense FFN) on packed weights: y [M, D] = (silu(x·W_gateᵀ) ⊙ x·W_upᵀ) · W_downᵀ,
 * Pgu the packing of [W_gate; W_up] ([2I, D]), Pdn of W_down ([D, I]); scratch: M * 3I floats. */
void rm_swiglu_packed(const float *x, long M, long D, long ldx, const float *Pgu, long I, const float *Pdn, float *y,
                      float *scratch) {
  float *gu = scratch, *h = scratch + M * 2 * I;
  rm_linear_packed(x, M, D, ldx, Pgu, 2 * I, gu, 2 * I);
  silu_mul(gu, M, I, h);
  rm_linear_packed(h, M, I, I, Pdn, D, y, D);
}

/* One SwiGLU expert over c contiguous rows: y [c, D] = (silu(x·W_gateᵀ) ⊙ x·W_upᵀ) · W_downᵀ, with its gate/up
 * rows wgu [2I, D] and down rows wdn [D, I]; scratch: c * 3I floats. */
static void swiglu_rows(const float *x, long c, long D, long I, const float *wgu, const float *wdn, float *y,
                        float *scratch) {
  float *gu = scratch, *h = scratch + c * 2 * I;
  rm_linear(x, c, D, D, wgu, 2 * I, gu, 2 * I);
  silu_mul(gu, c, I, h);
  rm_linear(h, c, I, I, wdn, D, y, D);
}

/* Routed SwiGLU experts over rows grouped by expert (counts[e] consecutive rows of x for expert e):
 *   y_r = W_down[e] · (silu(W_gate[e] · x_r) ⊙ W_up[e] · x_r)
 * w_gu [E, 2I, D] (gate rows then up rows, each D contiguous floats), w_dn [E, D, I] (each output row I floats).
 * scratch holds g_threads * min(max(counts), max_rows) * 3I floats (one slice per thread). Experts with no rows are
 * skipped (their weights are never read), and so are experts with more than max_rows rows: their rows of y are left
 * to the caller. */
void rm_experts(const float *x, const int64_t *counts, long E, long D, long I, const float *w_gu,
                const float *w_dn, float *y, float *scratch, long max_rows) {
  long *row0 = (long *)malloc((size_t)(E + 1) * sizeof(long)), *run = (long *)malloc((size_t)(E ? E : 1) * sizeof(long));
  long cmax = 0, nr = 0;
  row0[0] = 0;
  for (long e = 0; e < E; e++) {
    long c = (long)counts[e];
    row0[e + 1] = row0[e] + (c > 0 ? c : 0);
    if (c > 0 && c <= max_rows) {
      run[nr++] = e;
      if (c > cmax) cmax = c;
    }
  }
  PARALLEL_FOR(nr) /* the experts it runs, split evenly over the threads */
  for (long j = 0; j < nr; j++) {
    long e = run[j];
    swiglu_rows(x + row0[e] * D, (long)counts[e], D, I, w_gu + e * 2 * I * D, w_dn + e * D * I, y + row0[e] * D,
                scratch + THREAD_NUM() * cmax * 3 * I);
  }
  free(row0);
  free(run);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Absorbed MLA decode attention straight from the paged latent cache (no gathered copy of the keys).
 *
 * Row i (one query token) has H query vectors q[i, h, 0:Dk] (Dk = C + R: the absorbed nope part, then RoPE) and sees
 * the keys at positions 0..lens[i]-1 of its own sequence, cache rows slots[i, 0..lens[i]-1] of buf [*, Dk]; the value
 * of a key is its first C floats (the latent). out[i, h, 0:C] = softmax_j(scale · <q_ih, k_j>) · c_j.
 * Only a row's own visible keys are read, so a non-finite latent reaches the rows that see it and no other.
 * scratch: H * S floats (S = the row stride of slots). */

typedef int vi __attribute__((vector_size(sizeof(vf))));

/* e^x for finite x <= 0 (softmax after subtracting the row max), |rel err| < 3e-7: x = n ln2 + r with |r| <= ln2/2,
 * e^r by a degree-6 polynomial (Cephes' coefficients), 2^n through the exponent bits; e^x = 0 below -87.3. */
static inline vf vexp_nonpos(vf x) {
  const float lo = -87.3365478515625f;
  vi under = (vi)(x < lo);
  vi keep = ~under;
  x = (vf)(((vi)x & keep) | ((vi)((vf){0} + lo) & under));
  vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest integer (|n| < 2^22) */
  vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vf p = (vf){0} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return (vf)((vi)(p * (vf)e) & keep);
}

/* o [H, C] = p [H, ldp] (columns 0..L-1) · keys (key j: the first C floats of cache row sl[j] of buf, rows ldk
 * apart), keys in order 0..L-1; 4 heads x 4 vectors tiles, each tile's accumulators in registers over all the keys */
static void acc_pv(const float *p, long ldp, long H, const float *buf, long ldk, const int64_t *sl, long L, long C,
                   float *o) {
  long h = 0;
  for (; h + 4 <= H; h += 4) {
    long c = 0;
    for (; c + 4 * VW <= C; c += 4 * VW) {
      vf a[4][4];
      for (int u = 0; u < 4; u++)
        for (int v = 0; v < 4; v++) a[u][v] = (vf){0};
      for (long j = 0; j < L; j++) {
        const float *kr = buf + sl[j] * ldk + c;
        vf k0 = ld(kr), k1 = ld(kr + VW), k2 = ld(kr + 2 * VW), k3 = ld(kr + 3 * VW);
        for (int u = 0; u < 4; u++) {
          float pu = p[(h + u) * ldp + j];
          a[u][0] += pu * k0; a[u][1] += pu * k1; a[u][2] += pu * k2; a[u][3] += pu * k3;
        }
      }
      for (int u = 0; u < 4; u++)
        for (int v = 0; v < 4; v++) memcpy(o + (h + u) * C + c + v * VW, &a[u][v], sizeof(vf));
    }
    for (; c < C; c++)
      for (int u = 0; u < 4; u++) {
        float t = 0.0f;
        for (long j = 0; j < L; j++) t += p[(h + u) * ldp + j] * buf[sl[j] * ldk + c];
        o[(h + u) * C + c] = t;
      }
  }
  for (; h < H; h++)
    for (long c = 0; c < C; c++) {
      float t = 0.0f;
      for (long j = 0; j < L; j++) t += p[h * ldp + j] * buf[sl[j] * ldk + c];
      o[h * C + c] = t;
    }
}

/* consecutive cache rows starting at position j of a row's slots (at most `cap`) */
static inline long run_length(const int64_t *sl, long j, long L, long cap) {
  long r = 1;
  while (j + r < L && r < cap && sl[j + r] == sl[j] + r) r++;
  return r;
}

void rm_mla_decode(const float *q, long N, long H, long Dk, long C, const float *buf, const int64_t *slots, long S,
                   const int64_t *lens, float scale, float *out, float *scratch) {
  /* scratch: g_threads * H * S floats (one slice per thread) */
  PARALLEL_FOR(N)
  for (long i = 0; i < N; i++) {
    const float *qi = q + i * H * Dk;
    const int64_t *sl = slots + i * S;
    long L = (long)lens[i];
    float *sc = scratch + THREAD_NUM() * H * S, *oi = out + i * H * C;
    /* scores [H, L]: each run of consecutive cache rows is one small product of the H query rows */
    long r = L ? run_length(sl, 0, L, 64) : 0;
    for (long j = 0; j < L;) {
      long j2 = j + r, r2 = j2 < L ? run_length(sl, j2, L, 64) : 0;
      if (r2) { /* the next run (a cache block elsewhere) into L2 while this one is multiplied */
        const char *nb = (const char *)(buf + sl[j2] * Dk);
        for (long b = 0; b < r2 * Dk * (long)sizeof(float); b += 64) __builtin_prefetch(nb + b, 0, 2);
      }
      rm_linear(qi, H, Dk, Dk, buf + sl[j] * Dk, r, sc + j, L);
      j = j2;
      r = r2;
    }
    for (long h = 0; h < H; h++) {
      float *s = sc + h * L;
      float m = -INFINITY;
      int bad = 0;
      long j0 = 0;
      { /* scale, max and a finiteness flag, VW lanes at a time (v - v is 0 exactly when v is finite) */
        vf vm = (vf){0} - INFINITY;
        vi vbad = (vi){0};
        for (; j0 + VW <= L; j0 += VW) {
          vf v = ld(s + j0) * scale;
          memcpy(s + j0, &v, sizeof v);
          vbad |= (vi)((v - v) != (vf){0});
          vi gt = (vi)(v > vm);
          vm = (vf)(((vi)v & gt) | ((vi)vm & ~gt));
        }
        for (int u = 0; u < VW; u++) {
          m = vm[u] > m ? vm[u] : m;
          bad |= vbad[u] != 0;
        }
      }
      for (long j = j0; j < L; j++) {
        float v = s[j] * scale;
        s[j] = v;
        bad |= !isfinite(v);
        m = v > m ? v : m;
      }
      if (bad) { /* as torch's softmax: a NaN or infinite score makes the head's output NaN */
        for (long j = 0; j < L; j++) s[j] = NAN;
        continue;
      }
      vf vsum = {0};
      long j = 0;
      for (; j + VW <= L; j += VW) {
        vf e = vexp_nonpos(ld(s + j) - m);
        memcpy(s + j, &e, sizeof e);
        vsum += e;
      }
      float sum = hsum(vsum);
      for (; j < L; j++) {
        float e = expf(s[j] - m);
        s[j] = e;
        sum += e;
      }
      float inv = 1.0f / sum;
      for (j = 0; j + VW <= L; j += VW) {
        vf v = ld(s + j) * inv;
        memcpy(s + j, &v, sizeof v);
      }
      for (; j < L; j++) s[j] *= inv;
    }
    if (i + 1 < N) { /* the next row's first block, while this row's values are summed */
      const int64_t *sn = slots + (i + 1) * S;
      long rn = run_length(sn, 0, (long)lens[i + 1], 64);
      const char *nb = (const char *)(buf + sn[0] * Dk);
      for (long b = 0; b < rn * Dk * (long)sizeof(float); b += 64) __builtin_prefetch(nb + b, 0, 2);
    }
    acc_pv(sc, L, H, buf, Dk, sl, L, C, oi);
  }
}

/* Per head h: y[:, h] = x[:, h] · w[h]ᵀ, x rows ldx apart and heads hsx apart, w[h] [Nout, K] contiguous at
 * w + h * hsw, y rows ldy apart and heads hsy apart (the absorbed MLA's W^UK and W^UV products of a decode batch). */
void rm_per_head(const float *x, long M, long H, long K, long ldx, long hsx, const float *w, long hsw, long Nout,
                 float *y, long ldy, long hsy) {
  PARALLEL_FOR(H)
  for (long h = 0; h < H; h++) rm_linear(x + h * hsx, M, K, ldx, w + h * hsw, Nout, y + h * hsy, ldy);
}

/* ---------------------------------------------------------------------------------------------------------------
 * One MLA layer's decode forward for N rows (one token each), from the normed hidden state to o_proj's output, in one
 * call (raymoe.model.mla.MLA with q_lora_rank; the path of MLA.forward + DecodeBatch.attend_absorbed, op for op):
 *   t = x · [W_qa; W_kva]ᵀ                    [N, QR + C + R2]   (Pqkv: the packed group)
 *   qa = rmsnorm(t[:, :QR]) * wqn             [N, QR]
 *   latent row = [rmsnorm(t[:, QR:QR+C]) * wkn ; rope(t[:, QR+C:])]  written to buf[wslots[i]]
 *   q = qa · W_qbᵀ                            [N, H, Dn + R2]    (Pqb)
 *   q̃ = [q_nope_h · W^UK_h ; rope(q_pe_h)]     [N, H, C + R2]     (wukt [H, C, Dn])
 *   o_lat = rm_mla_decode(q̃)                  [N, H, C]
 *   o_h = o_lat_h · W^UV_hᵀ                   [N, H*V]           (wuv: head h at wuv + h * hs_uv, [V, C])
 *   y = o · W_oᵀ                              [N, Dout]          (Po)
 * cos/sin [N, R2/2] per row. scratch: N*(QR+C+R2) + N*QR + N*H*(Dn+R2) + N*H*(C+R2) + N*H*C + N*H*V
 * + g_threads * H * S floats. Every row's latent is written before any row attends (rows of one sequence: drafts). */
void rm_rms_norm(const float *x, long M, long D, long ldx, const float *w, float eps, float *y);
void rm_rope(const float *in, long N, long H, long lrow, long lhead, long R, const float *cos_, const float *sin_,
             float *out);

void rm_mla_decode_layer(const float *x, long N, long D, long ldx, const float *Pqkv, long QR, long C, long R2,
                         const float *wqn, const float *wkn, float eps_q, float eps_kv, const float *Pqb, long H,
                         long Dn, const float *cos_, const float *sin_, float *buf, const int64_t *wslots,
                         const int64_t *slots, long S, const int64_t *lens, float scale, const float *wukt,
                         const float *wuv, long hs_uv, long V, const float *Po, long Dout, float *y, long ldy,
                         float *scratch) {
  long T = QR + C + R2, Q = Dn + R2, Dk = C + R2, hr = R2 / 2;
  float *t = scratch, *qa = t + N * T, *q = qa + N * QR, *qt = q + N * H * Q, *ol = qt + N * H * Dk;
  float *o = ol + N * H * C, *att = o + N * H * V;
  rm_linear_packed(x, N, D, ldx, Pqkv, T, t, T);
  rm_rms_norm(t, N, QR, T, wqn, eps_q, qa);
  for (long i = 0; i < N; i++) {
    float *row = buf + wslots[i] * Dk;
    rm_rms_norm(t + i * T + QR, 1, C, T, wkn, eps_kv, row);
    rm_rope(t + i * T + QR + C, 1, 1, 0, 0, hr, cos_ + i * hr, sin_ + i * hr, row + C);
  }
  rm_linear_packed(qa, N, QR, QR, Pqb, H * Q, q, H * Q);
  for (long i = 0; i < N; i++) /* rope(q_pe) of every head straight into q̃'s tail */
    for (long h = 0; h < H; h++)
      rm_rope(q + (i * H + h) * Q + Dn, 1, 1, 0, 0, hr, cos_ + i * hr, sin_ + i * hr, qt + (i * H + h) * Dk + C);
  rm_per_head(q, N, H, Dn, H * Q, Q, wukt, C * Dn, C, qt, H * Dk, Dk);
  rm_mla_decode(qt, N, H, Dk, C, buf, slots, S, lens, scale, ol, att);
  rm_per_head(ol, N, H, C, H * C, C, wuv, hs_uv, V, o, H * V, V);
  rm_linear_packed(o, N, H * V, H * V, Po, Dout, y, ldy);
}

/* ---------------------------------------------------------------------------------------------------------------
 * DeepSeek-V3 routing of T tokens from their sigmoid scores [T, E] (the selection part of raymoe.model.moe.route):
 * biased = s + bias; group score = the sum of a group's two largest biased scores; the topk_group best groups stay;
 * the top_k experts by biased score among them are chosen (ties: the lower index); gates = the unbiased scores of the
 * chosen experts, normalised over them (+1e-20) if norm, times scale. idx/w [T, top_k] in descending biased order;
 * counts [E] = tokens per expert. Needs E % n_group == 0, top_k <= topk_group * (E / n_group), E <= 1024. */
static inline int better(float a, long ia, float b, long ib) { return a > b || (a == b && ia < ib); }

void rm_route(const float *scores, const float *bias, long T, long E, long n_group, long topk_group, long top_k,
              float scale, int norm, int64_t *idx, float *w, int64_t *counts) {
  float biased[1024], gs[1024];
  int keep[1024];
  long per = E / n_group;
  memset(counts, 0, (size_t)E * sizeof(int64_t));
  for (long t = 0; t < T; t++) {
    const float *st = scores + t * E;
    for (long e = 0; e < E; e++) biased[e] = st[e] + bias[e];
    if (n_group > 1 && topk_group < n_group) {
      for (long g = 0; g < n_group; g++) {
        float a = -INFINITY, b = -INFINITY; /* the two largest of the group */
        for (long e = g * per; e < (g + 1) * per; e++) {
          float v = biased[e];
          if (v > a) { b = a; a = v; } else if (v > b) b = v;
        }
        gs[g] = per >= 2 ? a + b : a;
        keep[g] = 0;
      }
      for (long r = 0; r < topk_group; r++) {
        long best = -1;
        for (long g = 0; g < n_group; g++)
          if (!keep[g] && (best < 0 || better(gs[g], g, gs[best], best))) best = g;
        keep[best] = 1;
      }
      for (long g = 0; g < n_group; g++)
        if (!keep[g])
          for (long e = g * per; e < (g + 1) * per; e++) biased[e] = -INFINITY;
    }
    int64_t *it = idx + t * top_k;
    float *wt = w + t * top_k;
    float sum = 0.0f;
    for (long r = 0; r < top_k; r++) {
      long best = -1;
      for (long e = 0; e < E; e++) {
        int taken = 0;
        for (long q = 0; q < r; q++) taken |= it[q] == e;
        if (!taken && (best < 0 || better(biased[e], e, biased[best], best))) best = e;
      }
      it[r] = best;
      wt[r] = st[best];
      sum += st[best];
      counts[best]++;
    }
    float inv = norm ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (long r = 0; r < top_k; r++) wt[r] = (norm ? wt[r] * inv : wt[r]) * scale;
  }
}

/* Routed experts with their dispatch and combine: y[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t]) (the k terms added
 * in k order). Pairs (t, k) are grouped by expert (ascending t within an expert), each expert's rows gathered, run as
 * rm_experts does, and their outputs combined per token. scratch: T*K*D + g_threads * max(counts) * (2D + 3I)
 * floats. */
void rm_moe_routed(const float *x, long T, long D, const int64_t *idx, const float *w, long K, const int64_t *counts,
                   long E, long I, const float *w_gu, const float *w_dn, float *y, float *scratch) {
  long n = T * K, cmax = 0, nt = 0;
  float *ypair = scratch;            /* [T*K, D]: output of pair (t, k) */
  long *start = (long *)malloc((size_t)(E + 1) * sizeof(long));
  long *order = (long *)malloc((size_t)(n ? n : 1) * sizeof(long));
  long *fill = (long *)malloc((size_t)(E ? E : 1) * sizeof(long));
  long *touched = (long *)malloc((size_t)(E ? E : 1) * sizeof(long));
  start[0] = 0;
  for (long e = 0; e < E; e++) {
    start[e + 1] = start[e] + (long)counts[e];
    if ((long)counts[e] > cmax) cmax = (long)counts[e];
    if (counts[e] > 0) touched[nt++] = e;
  }
  for (long e = 0; e < E; e++) fill[e] = start[e];
  for (long p = 0; p < n; p++) order[fill[idx[p]]++] = p;
  /* the touched experts split evenly over the threads (each expert's weights are the same size) */
  PARALLEL_FOR(nt)
  for (long j = 0; j < nt; j++) {
    long e = touched[j], c = start[e + 1] - start[e];
    float *xg = scratch + n * D + THREAD_NUM() * cmax * (2 * D + 3 * I), *yg = xg + cmax * D, *sw = yg + cmax * D;
    for (long r = 0; r < c; r++) memcpy(xg + r * D, x + (order[start[e] + r] / K) * D, (size_t)D * sizeof(float));
    swiglu_rows(xg, c, D, I, w_gu + e * 2 * I * D, w_dn + e * D * I, yg, sw);
    for (long r = 0; r < c; r++) memcpy(ypair + order[start[e] + r] * D, yg + r * D, (size_t)D * sizeof(float));
  }
  PARALLEL_FOR(T)
  for (long t = 0; t < T; t++) {
    float *yt = y + t * D;
    for (long d = 0; d < D; d++) yt[d] = 0.0f;
    for (long k = 0; k < K; k++) {
      float wk = w[t * K + k];
      const float *src = ypair + (t * K + k) * D;
      for (long d = 0; d < D; d++) yt[d] += wk * src[d];
    }
  }
  free(start); free(order); free(fill); free(touched);
}

/* A whole MoE layer's decode forward for T rows in one call (raymoe.model.moe.Router with its native selection, then
 * the routed experts as rm_moe_routed, then the shared expert): scores = sigmoid(x · W_gateᵀ) [T, E] (Pgate packed),
 * rm_route → idx/tw [T, K], counts [E]; if an expert got more than max_rows rows, return 1 with the routing done and y
 * untouched (the caller's grouped path runs the experts); else y = Σ_k tw·expert(x) (+ the shared SwiGLU on packed
 * Pgu_sh [2Ish, D] / Pdn_sh [D, Ish] when Pgu_sh is not NULL) and return 0. scratch: max(T*K*D + g_threads * min(T,
 * max_rows) * (2D + 3I), T*D + T*3*Ish) floats. */
int rm_moe_layer(const float *x, long T, long D, const float *Pgate, long E, const float *bias, long n_group,
                 long topk_group, long K, float route_scale, int norm, long max_rows, const float *w_gu,
                 const float *w_dn, long I, const float *Pgu_sh, long Ish, const float *Pdn_sh, float *scores,
                 int64_t *idx, float *tw, int64_t *counts, float *y, float *scratch) {
  rm_linear_packed(x, T, D, D, Pgate, E, scores, E);
  for (long i = 0; i < T * E; i++) scores[i] = 1.0f / (1.0f + expf(-scores[i]));
  rm_route(scores, bias, T, E, n_group, topk_group, K, route_scale, norm, idx, tw, counts);
  for (long e = 0; e < E; e++)
    if ((long)counts[e] > max_rows) return 1;
  rm_moe_routed(x, T, D, idx, tw, K, counts, E, I, w_gu, w_dn, y, scratch);
  if (Pgu_sh) {
    float *sh = scratch;
    rm_swiglu_packed(x, T, D, D, Pgu_sh, Ish, Pdn_sh, sh, sh + T * D);
    for (long i = 0; i < T * D; i++) y[i] += sh[i];
  }
  return 0;
}

/* RMSNorm of M rows (x rows ldx apart, y contiguous [M, D]): y = w * (x / sqrt(mean(x^2) + eps)), all fp32. */
void rm_rms_norm(const float *x, long M, long D, long ldx, const float *w, float eps, float *y) {
  for (long m = 0; m < M; m++) {
    const float *xr = x + m * ldx;
    float *yr = y + m * D;
    vf a0 = {0}, a1 = {0};
    long d = 0;
    for (; d + 2 * VW <= D; d += 2 * VW) {
      vf u = ld(xr + d), v = ld(xr + d + VW);
      a0 += u * u;
      a1 += v * v;
    }
    float ss = hsum(a0 + a1);
    for (; d < D; d++) ss += xr[d] * xr[d];
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    d = 0;
    for (; d + VW <= D; d += VW) {
      vf o = ld(w + d) * (ld(xr + d) * r);
      memcpy(yr + d, &o, sizeof o);
    }
    for (; d < D; d++) yr[d] = w[d] * (xr[d] * r);
  }
}

/* RoPE on interleaved pairs, de-interleaved output (raymoe.model.rope.apply_rope): for row n and head h,
 * x = in[n * lrow + h * lhead + 0 .. 2R), out[n, h, 0..R) = x_even * cos - x_odd * sin, out[n, h, R..2R) =
 * x_odd * cos + x_even * sin, with cos/sin [N, R] per row; out contiguous [N, H, 2R]. */
void rm_rope(const float *in, long N, long H, long lrow, long lhead, long R, const float *cos_, const float *sin_,
             float *out) {
  for (long n = 0; n < N; n++) {
    const float *c = cos_ + n * R, *s = sin_ + n * R;
    for (long h = 0; h < H; h++) {
      const float *x = in + n * lrow + h * lhead;
      float *o = out + (n * H + h) * 2 * R;
      for (long i = 0; i < R; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        o[i] = a * c[i] - b * s[i];
        o[R + i] = b * c[i] + a * s[i];
      }
    }
  }
}
