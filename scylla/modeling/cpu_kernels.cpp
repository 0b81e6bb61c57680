// CPU inference kernels of scylla.modeling.kernels (fp32, AVX2 + FMA; the GEMM also in 16-lane
// AVX-512), each computing every row of its output by the same operations whatever the row
// count:
//
// rows_product: the ``rows`` GEMM path, y = x @ w.T for x (M, K) and w (N, K), both row-major,
// the weight in fp32 (rows_linear) or a compact exact form (affine4_linear, scaled8_linear),
// parallel over weight rows with ATen's thread pool.
// rms_norm: y = w * x / sqrt(mean(x^2) + eps) per row of x (M, H). ATen's CPU rms_norm is a
// composite of ~8 small ops, ~40 us for one 576-float row and more inside a forward (61 per
// SmolLM2 forward); this is one pass.
// attend: softmax(q k^T / sqrt(D) + mask) v for a few query rows against cached keys, each
// row by the same operations however many rows share the call (SDPA's CPU kernel costs
// ~60-150 us per call for 3 rows). A head's rows share every key and value load, 8 keys'
// scores are summed across lanes at once and (AVX-512) two rows' scores share each FMA, all
// keeping each score's own sequence of operations.
//
// Every output y[m][o] is computed by the same sequence of operations whatever M is and
// however rows are blocked: one FMA accumulator of LANES lanes (8; 16 in the AVX-512 build) over
// k in steps of LANES, a fixed horizontal sum, then scalar FMAs over the k % LANES tail. So row
// m of an M-row product is bit-identical to that row's 1-row product (plain decoding and a
// verify forward compute their linears alike).
//
// Blocks of O weight rows x R input rows keep O * R independent accumulators in flight (FMA
// latency, not loads, limited the first version on the 2-core EPYC); each weight row is read
// from memory once per call and reused from L1 for every block of input rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sleef.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

static inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

// The GEMM's vector: 8 lanes (AVX2), or 16 in the build for AVX-512 CPUs (SCYLLA_AVX512, a
// separate extension): its products round differently from the 8-lane build's, but every build
// computes each output by one sequence of operations whatever M is.
#ifdef SCYLLA_AVX512
using vec = __m512;
constexpr int LANES = 16;
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vset(float x) { return _mm512_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vexp(vec a) { return Sleef_expf16_u10(a); }
static inline vec vint(__m128i bytes, bool sign) {  // 16 bytes as 16 floats
  return _mm512_cvtepi32_ps(sign ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
}
static inline float vsum(vec v) {  // a fixed order: the halves added, then hsum's
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
#else
using vec = __m256;
constexpr int LANES = 8;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vset(float x) { return _mm256_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vexp(vec a) { return Sleef_expf8_u10(a); }
static inline vec vint(__m128i bytes, bool sign) {  // the low 8 bytes as 8 floats
  return _mm256_cvtepi32_ps(sign ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
}
static inline float vsum(vec v) { return hsum(v); }
#endif

// Weight rows as the GEMM reads them: ``get(i, k)`` is weights k..k+LANES-1 of row i (of the
// rows from ``at(o)`` on) in fp32, ``scalar`` one weight, ``prefetch`` fetches 16 KB ahead of
// (i, k) once per cache line; ``prefetch_alone``: also for one input row.
struct DenseRows {  // fp32 (N, K)
  const float* w;
  int64_t K;
  static constexpr bool pairs = false, prefetch_alone = false;
  void get2(int, int64_t, vec&, vec&) const {}
  DenseRows at(int64_t o) const { return {w + o * K, K}; }
  vec get(int i, int64_t k) const { return vload(w + i * K + k); }
  float scalar(int i, int64_t k) const { return w[i * K + k]; }
  void prefetch(int i, int64_t k) const {
    if ((k & 15) == 0) _mm_prefetch((const char*)(w + i * K + k + 4096), _MM_HINT_T0);
  }
};

// The compact exact forms (kernels.compact): weights stored as small integers q and per-32
// scales d (and offsets m) with w = d * q (+ m) exactly. d is an fp16 value and |q| < 2^8, so
// d * q is exact in fp32 and the FMA below rounds once, as the stored fp32 weight was: the
// weights the products see are the fp32 weights bit for bit, with 4-6x fewer bytes to stream.
struct Affine4Rows {  // q: 4 bits, byte j of each 16 weights holds weight j (low) and j + 8
  const uint8_t* q;
  const float* d;
  const float* m;
  int64_t K;
#ifdef SCYLLA_AVX512
  // ``get2``: the two vectors of one 32-weight block, sharing its table
  static constexpr bool pairs = true, prefetch_alone = false;
  void get2(int i, int64_t k, vec& lo, vec& hi) const {  // k % 32 == 0
    const __m128i b = _mm_loadu_si128((const __m128i*)(q + i * (K / 2) + k / 2));
    const __m128i h = _mm_srli_epi16(b, 4);
    const int64_t s = i * (K / 32) + (k >> 5);
    const vec table = vfma(vset(d[s]), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                      13, 14, 15), vset(m[s]));
    lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(b, h)), table);
    hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi64(b, h)), table);
  }
#else
  static constexpr bool pairs = false, prefetch_alone = false;
  void get2(int, int64_t, vec&, vec&) const {}
#endif
  Affine4Rows at(int64_t o) const { return {q + o * (K / 2), d + o * (K / 32), m + o * (K / 32), K}; }
  vec get(int i, int64_t k) const {
    const __m128i b = _mm_loadl_epi64((const __m128i*)(q + i * (K / 2) + (k >> 4) * 8));
    const int64_t s = i * (K / 32) + (k >> 5);
#ifdef SCYLLA_AVX512  // k % 16 == 0: weights k..k+7 (low nibbles), then k+8..k+15 (high)
    // the block's 16 possible weights d * q + m (q = 0..15) looked up by nibble: vpermps reads
    // only an index's low 4 bits, so the nibbles need no mask, and each weight is the same
    // FMA's result as when its q is converted (a third fewer vector uops per weight)
    const __m512i n = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(b, _mm_srli_epi16(b, 4)));
    const vec table = vfma(vset(d[s]), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                      13, 14, 15), vset(m[s]));
    return _mm512_permutexvar_ps(n, table);
#else
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m128i n = _mm_and_si128(_mm_srl_epi16(b, _mm_cvtsi32_si128((k & 8) >> 1)), low);
    return vfma(vset(d[s]), vint(n, false), vset(m[s]));
#endif
  }
  float scalar(int i, int64_t k) const {
    const uint8_t b = q[i * (K / 2) + (k >> 4) * 8 + (k & 7)];
    const int64_t s = i * (K / 32) + (k >> 5);
    return std::fma(d[s], static_cast<float>((k & 8) ? b >> 4 : b & 15), m[s]);
  }
  void prefetch(int i, int64_t k) const {
    if ((k & 127) == 0) _mm_prefetch((const char*)(q + i * (K / 2) + k / 2 + 16384), _MM_HINT_T0);
  }
};

struct Scaled8Rows {  // q: int8
  const int8_t* q;
  const float* d;
  int64_t K;
  static constexpr bool pairs = false;
  // the LM head's 32 MB stream, one input row, median ms, 2-core Xeon, caches flushed: 2.63
  // without, 1.60 with (a decode step reads it once, after the layers have evicted it)
  static constexpr bool prefetch_alone = true;
  void get2(int, int64_t, vec&, vec&) const {}
  Scaled8Rows at(int64_t o) const { return {q + o * K, d + o * (K / 32), K}; }
  vec get(int i, int64_t k) const {
#ifdef SCYLLA_AVX512
    const __m128i b = _mm_loadu_si128((const __m128i*)(q + i * K + k));
#else
    const __m128i b = _mm_loadl_epi64((const __m128i*)(q + i * K + k));
#endif
    return vmul(vset(d[i * (K / 32) + (k >> 5)]), vint(b, true));
  }
  float scalar(int i, int64_t k) const { return d[i * (K / 32) + (k >> 5)] * q[i * K + k]; }
  void prefetch(int i, int64_t k) const {
    if ((k & 63) == 0) _mm_prefetch((const char*)(q + i * K + k + 16384), _MM_HINT_T0);
  }
};

template <int O, int R, class W>
static inline void block(const W& w, const float* x, int64_t K, float* y, int64_t N) {
  vec a[O][R];
  for (int i = 0; i < O; ++i)
    for (int r = 0; r < R; ++r) a[i][r] = vzero();
  int64_t k = 0;
  if constexpr (W::pairs)
    for (; k + 2 * LANES <= K; k += 2 * LANES) {  // the same FMAs in the same order
      vec lo[O], hi[O];
      for (int i = 0; i < O; ++i) w.get2(i, k, lo[i], hi[i]);
      if (R > 1 || W::prefetch_alone)
        for (int i = 0; i < O; ++i) w.prefetch(i, k);
      for (int r = 0; r < R; ++r) {
        const vec x0 = vload(x + r * K + k), x1 = vload(x + r * K + k + LANES);
        for (int i = 0; i < O; ++i) a[i][r] = vfma(hi[i], x1, vfma(lo[i], x0, a[i][r]));
      }
    }
  for (; k + LANES <= K; k += LANES) {
    vec wv[O];
    for (int i = 0; i < O; ++i) wv[i] = w.get(i, k);
    // with 2+ input rows the FMAs no longer hide the weight stream: fetch 16 KB ahead, once
    // per cache line (EPYC, 121 SmolLM2 linears: M = 4 ~50 -> ~38 ms, M = 8 ~62 -> ~49 ms;
    // no gain at M = 1, where it cost a few ms)
    if (R > 1 || W::prefetch_alone)
      for (int i = 0; i < O; ++i) w.prefetch(i, k);
    for (int r = 0; r < R; ++r) {
      const vec xv = vload(x + r * K + k);
      for (int i = 0; i < O; ++i) a[i][r] = vfma(wv[i], xv, a[i][r]);
    }
  }
  for (int i = 0; i < O; ++i)
    for (int r = 0; r < R; ++r) {
      float s = vsum(a[i][r]);
      for (int64_t t = k; t < K; ++t) s = std::fma(w.scalar(i, t), x[r * K + t], s);
      y[r * N + i] = s;
    }
}

// O weight rows against all M input rows, R at a time
template <int O, int R, class W>
static inline void rows(const W& w, const float* x, int64_t M, int64_t K, float* y,
                        int64_t N) {
  int64_t m = 0;
  for (; m + R <= M; m += R) block<O, R>(w, x + m * K, K, y + m * N, N);
  // the rest: fewer than R rows (only the shapes some R leaves are instantiated)
  const int64_t rest = M - m;
  if constexpr (R > 7) if (rest == 7) block<O, 7>(w, x + m * K, K, y + m * N, N);
  if constexpr (R > 6) if (rest == 6) block<O, 6>(w, x + m * K, K, y + m * N, N);
  if constexpr (R > 5) if (rest == 5) block<O, 5>(w, x + m * K, K, y + m * N, N);
  if constexpr (R > 4) if (rest == 4) block<O, 4>(w, x + m * K, K, y + m * N, N);
  if constexpr (R > 3) if (rest == 3) block<O, 3>(w, x + m * K, K, y + m * N, N);
  if constexpr (R > 2) if (rest == 2) block<O, 2>(w, x + m * K, K, y + m * N, N);
  if constexpr (R > 1) if (rest == 1) block<O, 1>(w, x + m * K, K, y + m * N, N);
}

template <int O, int R, class W>
static void run(const W& w, const float* x, int64_t M, int64_t K, float* y, int64_t N) {
  const int64_t groups = N / O;
  at::parallel_for(0, groups + 1, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (p < groups) {
        rows<O, R>(w.at(p * O), x, M, K, y + p * O, N);
      } else {
        for (int64_t o = groups * O; o < N; ++o) rows<1, R>(w.at(o), x, M, K, y + o, N);
      }
    }
  });
}

// y = x @ w.T for weight rows of any kind. fp32 rows: block shapes with 8-12 accumulators in
// flight (measured on the 2-core EPYC). Compact rows are rebuilt once per block of input rows,
// so more rows share each rebuilt weight (the 120 SmolLM2 layer linears, 2-core AVX-512 Xeon,
// ms; 8 lanes: M = 6: R = 6 15.7 against R = 4 19.5, M = 8: R = 8 18.1 against R = 4 21.6;
// 16 lanes, whose 32 registers hold more accumulators: M = 4: 4 x 4 9.5 against 3 x 4 10.4,
// M = 8: 2 x 8 14.6 against 1 x 8 15.2)
template <class W>
static torch::Tensor product(torch::Tensor x, const W& w, int64_t N) {
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if constexpr (std::is_same_v<W, DenseRows>) {
    if (M == 1) run<8, 1>(w, xp, M, K, yp, N);
    else if (M == 2) run<6, 2>(w, xp, M, K, yp, N);
    else if (M == 3) run<4, 3>(w, xp, M, K, yp, N);
    else run<3, 4>(w, xp, M, K, yp, N);
  } else {
    constexpr int wide = LANES == 16;
    if (M == 1) run<4, 1>(w, xp, M, K, yp, N);
    else if (M == 2) run<6, 2>(w, xp, M, K, yp, N);
    else if (M == 3) run<4, 3>(w, xp, M, K, yp, N);
    else if (M == 4) run<3 + wide, 4>(w, xp, M, K, yp, N);
    else if (M <= 6) run<2 + 2 * wide, 6>(w, xp, M, K, yp, N);
    else run<1 + wide, 8>(w, xp, M, K, yp, N);
  }
  return y;
}

// sum of squares of x[0, n): 8-lane FMA accumulator, the fixed horizontal sum, a scalar tail
static inline float sum_squares(const float* x, int64_t n) {
  __m256 a = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    a = _mm256_fmadd_ps(v, v, a);
  }
  float s = hsum(a);
  for (; k < n; ++k) s = std::fma(x[k], x[k], s);
  return s;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 only");
  const int64_t H = w.numel();
  TORCH_CHECK(x.size(-1) == H, "rms_norm: last dim of x must equal the weight's size");
  auto xc = x.contiguous();
  w = w.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t M = H ? xc.numel() / H : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // a few rows are decode steps: one thread (waking the pool costs more than the work)
  auto norm_rows = [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* r = xp + m * H;
      const float scale = 1.0f / std::sqrt(sum_squares(r, H) / static_cast<float>(H) +
                                           static_cast<float>(eps));
      float* o = yp + m * H;
      for (int64_t k = 0; k < H; ++k) o[k] = wp[k] * (r[k] * scale);
    }
  };
  if (M <= 64) norm_rows(0, M);
  else at::parallel_for(0, M, 16, norm_rows);
  return y;
}

// hsum of 8 keys' 8-lane accumulators at once: lane j of the result is hsum(a[j]) bit for bit
// (the same additions of the same operands: low half + high half, then neighbours, then pairs)
static inline __m256 hsum8(const __m256* a) {
  __m256 p[4];
  for (int j = 0; j < 4; ++j)  // (a[j] halves added | a[j + 4] halves added)
    p[j] = _mm256_add_ps(_mm256_permute2f128_ps(a[j], a[j + 4], 0x20),
                         _mm256_permute2f128_ps(a[j], a[j + 4], 0x31));
  return _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
}

#ifdef SCYLLA_AVX512
// hadd_ps per 128-bit lane, which AVX-512 lacks: (a0 + a1, a2 + a3, b0 + b1, b2 + b3)
static inline __m512 hadd16(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Two query rows' scores against 8 keys (kr[u]: D floats, D % 8 == 0) into out and
// out + stride: row 0 in the low 8 lanes, row 1 in the high 8, each lane the 8-lane FMA
// accumulator of a row alone, then hsum8's additions per row (half the FMAs of two rows alone)
static inline void scores_pair(const float* q, const float* const* kr, int64_t D, float* out,
                               int64_t stride) {
  __m512 a[8];
  for (int u = 0; u < 8; ++u) a[u] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m512 qv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(q + d)),
                                         _mm256_loadu_ps(q + D + d), 1);
    for (int u = 0; u < 8; ++u)
      a[u] = _mm512_fmadd_ps(qv, _mm512_broadcast_f32x8(_mm256_loadu_ps(kr[u] + d)), a[u]);
  }
  // 128-bit lanes of a[u]: (row 0 low, row 0 high, row 1 low, row 1 high); p[u] lanes:
  // (key u row 0, key u row 1, key u + 4 row 0, key u + 4 row 1), each its halves added
  __m512 p[4];
  for (int u = 0; u < 4; ++u)
    p[u] = _mm512_add_ps(_mm512_shuffle_f32x4(a[u], a[u + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[u], a[u + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  // lanes: (keys 0-3 row 0, keys 0-3 row 1, keys 4-7 row 0, keys 4-7 row 1)
  const __m512 s = hadd16(hadd16(p[0], p[1]), hadd16(p[2], p[3]));
  const __m512 rows = _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(3, 1, 2, 0));
  _mm256_storeu_ps(out, _mm512_castps512_ps256(rows));
  _mm256_storeu_ps(out + stride, _mm512_extractf32x8_ps(rows, 1));
}
#endif

// Scores of n query rows (q: n x D) against keys [0, T) (kb: T x D) into s (rows of
// ``stride`` >= T rounded up to 8): 8 keys at a time, read once for all n rows, each score the
// same operations as for a row alone (an 8-lane FMA accumulator over d, hsum's additions,
// scalar FMAs over the D % 8 tail). Keys past T in the last block are read from ``zeros``
// (8 x D zeros).
static void scores(const float* q, int64_t n, const float* kb, int64_t T, int64_t D, float* s,
                   int64_t stride, const float* zeros) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    const float* kr[8];
    for (int64_t u = 0; u < 8; ++u) kr[u] = t0 + u < T ? kb + (t0 + u) * D : zeros + u * D;
    int64_t j = 0;
#ifdef SCYLLA_AVX512
    for (; j + 2 <= n && D8 == D; j += 2)
      scores_pair(q + j * D, kr, D, s + j * stride + t0, stride);
#endif
    for (; j < n; ++j) {
      const float* qr = q + j * D;
      __m256 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D8; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + d);
        for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[u] + d), a[u]);
      }
      float* out = s + j * stride + t0;
      _mm256_storeu_ps(out, hsum8(a));
      for (int64_t d = D8; d < D; ++d)
        for (int u = 0; u < 8; ++u) out[u] = std::fma(qr[d], kr[u][d], out[u]);
    }
  }
}

// o_j = sum_t w_j[t] * v[t] for R rows over keys [0, n), accumulated over t in order, element
// by element (FMA); each value row is read once for the R rows
template <int DV, int R>  // D = LANES * DV: the output rows stay in registers
static void weighted_sum(const float* const* w, const float* vb, int64_t n, float* const* o) {
  vec acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < DV; ++j) acc[r][j] = vzero();
  for (int64_t t = 0; t < n; ++t) {
    vec v[DV];
    for (int j = 0; j < DV; ++j) v[j] = vload(vb + (t * DV + j) * LANES);
    for (int r = 0; r < R; ++r) {
      const vec wv = vset(w[r][t]);
      for (int j = 0; j < DV; ++j) acc[r][j] = vfma(wv, v[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < DV; ++j) vstore(o[r] + j * LANES, acc[r][j]);
}

// the same sums, element by element in scalar FMAs, for any D, continuing from o over [t0, n)
static void weighted_sum_any(const float* w, const float* vb, int64_t t0, int64_t n, int64_t D,
                             float* o) {
  for (int64_t t = t0; t < n; ++t)
    for (int64_t d = 0; d < D; ++d) o[d] = std::fma(w[t], vb[t * D + d], o[d]);
}

// rows in blocks of as many as the vector registers hold (RB rows of DV accumulators, DV values
// and the weight)
template <int DV>
static void shared_sums(float* const* w, int64_t n, const float* vb, int64_t keys,
                        float* const* o) {
  constexpr int REGS = LANES == 16 ? 32 : 16;
  constexpr int RB = std::clamp((REGS - DV - 1) / DV, 1, 6);
  int64_t j = 0;
  for (; j + RB <= n; j += RB) weighted_sum<DV, RB>(w + j, vb, keys, o + j);
  switch (n - j) {  // the rest in one block
    case 5: weighted_sum<DV, std::min(5, RB)>(w + j, vb, keys, o + j); break;
    case 4: weighted_sum<DV, std::min(4, RB)>(w + j, vb, keys, o + j); break;
    case 3: weighted_sum<DV, std::min(3, RB)>(w + j, vb, keys, o + j); break;
    case 2: weighted_sum<DV, std::min(2, RB)>(w + j, vb, keys, o + j); break;
    case 1: weighted_sum<DV, 1>(w + j, vb, keys, o + j); break;
  }
}

// rows [0, n) of o over keys [0, len[j]), ``common`` the fewest: the value rows every row
// reads are loaded once for all of them (D of 2, 4 or 8 vectors), then each row continues
// alone; the same FMAs per element either way
static void weighted_sums(float* const* w, const int64_t* len, int64_t common, int64_t n,
                          const float* vb, int64_t D, float* const* o) {
  if (D == 2 * LANES) {
    shared_sums<2>(w, n, vb, common, o);
  } else if (D == 4 * LANES) {
    shared_sums<4>(w, n, vb, common, o);
  } else if (D == 8 * LANES) {
    shared_sums<8>(w, n, vb, common, o);
  } else {
    for (int64_t j = 0; j < n; ++j) std::fill(o[j], o[j] + D, 0.0f);
    common = 0;
  }
  for (int64_t j = 0; j < n; ++j) weighted_sum_any(w[j], vb, common, len[j], D, o[j]);
}

// keys [0, n) of a mask row up to its last unmasked key (a masked key holds the dtype's lowest
// value); all T when every key is masked (the softmax of such a row averages them all)
static inline int64_t valid_keys(const float* mr, int64_t T) {
  int64_t n = T;
  while (n > 0 && mr[n - 1] <= -1e38f) --n;
  return n > 0 ? n : T;
}

// softmax weights of n rows' scores w[j][0, len[j]) (``common`` the fewest) in place: scaled,
// masked, exp'd against their maximum by one vector function (Sleef's, 1 ulp, as in ATen; its
// 8- and 16-lane versions agree on every input <= 0), divided by their sum, added in key order
// (the rows' sums side by side: one add chain would wait on each add); w[j][len[j], len[j]
// rounded up to LANES) is scratch
static void softmax_rows(float* const* w, const float* const* mask, const int64_t* len,
                         int64_t common, int64_t n, float scale) {
  const vec sv = vset(scale);
  float total[16];
  for (int64_t j = 0; j < n; ++j) {
    float* s = w[j];
    const float* mr = mask[j];
    const int64_t keys = len[j], padded = (keys + LANES - 1) / LANES * LANES;
    const int64_t whole = keys / LANES * LANES;
    vec topv = vset(-INFINITY);
    for (int64_t t = 0; t < whole; t += LANES) {
      vec x = vmul(vload(s + t), sv);
      if (mr) x = vadd(x, vload(mr + t));  // a masked key: -3.4e38, so its weight is 0
      vstore(s + t, x);
      topv = vmax(topv, x);
    }
    alignas(64) float lanes[LANES];
    vstore(lanes, topv);
    float top = -INFINITY;
    for (float x : lanes) top = std::max(top, x);
    for (int64_t t = whole; t < keys; ++t) {
      s[t] *= scale;
      if (mr) s[t] += mr[t];
      top = std::max(top, s[t]);
    }
    // the padding past the row's keys makes no score depend on where they end
    for (int64_t t = keys; t < padded; ++t) s[t] = -INFINITY;
    topv = vset(top);
    for (int64_t t = 0; t < padded; t += LANES) vstore(s + t, vexp(vsub(vload(s + t), topv)));
  }
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const int64_t m = std::min<int64_t>(4, n - j0);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* r[4];
    for (int64_t i = 0; i < 4; ++i) r[i] = w[j0 + std::min(i, m - 1)];
    for (int64_t t = 0; t < common; ++t)
      for (int i = 0; i < 4; ++i) acc[i] += r[i][t];
    for (int64_t i = 0; i < m; ++i) total[j0 + i] = acc[i];
  }
  for (int64_t j = 0; j < n; ++j) {
    float* s = w[j];
    const int64_t keys = len[j], whole = keys / LANES * LANES;
    for (int64_t t = common; t < keys; ++t) total[j] += s[t];
    const vec tv = vset(total[j]);
    for (int64_t t = 0; t < whole; t += LANES) vstore(s + t, vdiv(vload(s + t), tv));
    for (int64_t t = whole; t < keys; ++t) s[t] /= total[j];
  }
}

// q (B, Hkv, R, D); k, v (B, Hkv, T, D) with unit stride over D and D over T (cache views);
// mask: empty, or additive (B, 1, R, T)
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 &&
              v.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: (B, H, rows, D)");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK(k.size(3) == D && v.size(3) == D && k.size(2) == v.size(2), "k, v: (B, H, T, D)");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D,
              "k, v: rows of D contiguous floats");
  const bool masked = mask.defined() && mask.numel() > 0;
  if (masked) {
    mask = mask.expand({B, 1, R, T}).contiguous();
    TORCH_CHECK(mask.dtype() == torch::kFloat32, "mask: fp32 additive");
  }
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = masked ? mask.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // a head's rows in G-row groups, the keys read once per group: at least two groups per
  // thread when there are few heads (a decode step's 3 heads on 2 threads ran 2 against 1)
  const int64_t threads = at::get_num_threads();
  const int64_t split = std::max<int64_t>(1, (2 * threads + B * H - 1) / (B * H));
  const int64_t G = std::clamp<int64_t>((R + split - 1) / split, 1, 16);
  const int64_t groups = (R + G - 1) / G;
  const int64_t Tp = (T + LANES - 1) / LANES * LANES;  // scores padded to whole vectors
  auto run = [&](int64_t begin, int64_t end) {
    std::vector<float> p(G * Tp), zeros(8 * D, 0.0f);
    for (int64_t item = begin; item < end; ++item) {  // item = (b * H + h) * groups + group
      const int64_t bh = item / groups, r0 = (item % groups) * G, b = bh / H, h = bh % H;
      const int64_t n = std::min<int64_t>(G, R - r0);
      const float* kb = kp + b * ks0 + h * ks1;
      const float* vb = vp + b * vs0 + h * vs1;
      // each row reads keys up to its last unmasked one: the masked keys after it (a shorter
      // row of a batch, later nodes of a tree) would add exact zeros, so the row's result
      // depends on its own keys only, whatever batch or group it shares
      int64_t len[16], most = 0, common = T;
      float* w[16];
      float* o[16];
      const float* mr[16];
      for (int64_t j = 0; j < n; ++j) {
        mr[j] = masked ? mp + (b * R + r0 + j) * T : nullptr;
        len[j] = masked ? valid_keys(mr[j], T) : T;
        most = std::max(most, len[j]);
        common = std::min(common, len[j]);
        w[j] = p.data() + j * Tp;
        o[j] = op + (bh * R + r0 + j) * D;
      }
      scores(qp + (bh * R + r0) * D, n, kb, most, D, p.data(), Tp, zeros.data());
      softmax_rows(w, mr, len, common, n, scale);
      weighted_sums(w, len, common, n, vb, D, o);
    }
  };
  // small calls (a few rows, short caches) stay on this thread: waking the pool costs more
  at::parallel_for(0, B * H * groups, std::max<int64_t>(1, 32768 / (G * T * D + 1)), run);
  return out;
}

torch::Tensor rows_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (M, K), w (N, K)");
  w = w.contiguous();
  return product(x, DenseRows{w.data_ptr<float>(), w.size(1)}, w.size(0));
}

// the compact forms: q (N, K / 2) uint8 or (N, K) int8, d and m (N, K / 32) fp32, K % 32 == 0
static void check_compact(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                          int64_t K) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && d.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && K % 32 == 0, "x (M, K), K a multiple of 32");
  TORCH_CHECK(q.is_contiguous() && d.is_contiguous() && d.size(0) == q.size(0) &&
              d.size(1) == K / 32, "q, d: contiguous (N, .), d (N, K / 32)");
}

torch::Tensor affine4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor d,
                             torch::Tensor m) {
  const int64_t K = q.size(1) * 2;
  check_compact(x, q, d, K);
  TORCH_CHECK(q.dtype() == torch::kUInt8 && m.sizes() == d.sizes() && m.is_contiguous() &&
              m.dtype() == torch::kFloat32, "affine4: q uint8 (N, K / 2), m like d");
  return product(x, Affine4Rows{q.data_ptr<uint8_t>(), d.data_ptr<float>(), m.data_ptr<float>(), K},
                 q.size(0));
}

torch::Tensor scaled8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor d) {
  const int64_t K = q.size(1);
  check_compact(x, q, d, K);
  TORCH_CHECK(q.dtype() == torch::kInt8, "scaled8: q int8 (N, K)");
  return product(x, Scaled8Rows{q.data_ptr<int8_t>(), d.data_ptr<float>(), K}, q.size(0));
}

// y = x @ w.T for a weight in the form kernels._weight_form gives: kind 0 the fp32 weight q,
// 1 affine4 (q, d, m), 2 scaled8 (q, d)
torch::Tensor rows_product(torch::Tensor x, int64_t kind, torch::Tensor q, torch::Tensor d,
                           torch::Tensor m) {
  if (kind == 1) return affine4_linear(x, q, d, m);
  if (kind == 2) return scaled8_linear(x, q, d);
  return rows_linear(x, q);
}

// One decoder layer of a decode step (fp32 CPU inference) in one call, the same operations
// in the same order as layers.DecoderLayer through these kernels: norm, qkv product, rotary,
// cache append, attention, o product, residual, norm, gate/up product, SiLU (ATen's, as the
// Python path calls it) times up, down product, residual. Module by module the layer's small
// ops and their dispatch cost ~0.17 ms: a quarter of a 1-token SmolLM2 forward on the 2-core
// Xeon (20.2 -> 15.1 ms; k = 8: 34.0 -> 27.6 ms).

// x * cos + roll(x, D / 2) * sin as three rounded ATen ops compute it (no FMA contraction)
__attribute__((optimize("fp-contract=off")))
static void rotate(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t e = 0; e < D; ++e) {
    const float a = x[e] * c[e];
    const float b = x[(e + half) % D] * s[e];
    out[e] = a + b;
  }
}

torch::Tensor layer_step(torch::Tensor x, std::vector<torch::Tensor> w, std::vector<int64_t> kinds,
                         double eps, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                         torch::Tensor v_cache, torch::Tensor write_pos, int64_t key_len,
                         torch::Tensor mask, int64_t n_heads) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 3, "x: fp32 (B, K, H)");
  TORCH_CHECK(w.size() == 14 && kinds.size() == 4, "w: 2 norms and 4 linears as (q, d, m)");
  const int64_t B = x.size(0), K = x.size(1), H = x.size(2), M = B * K;
  const int64_t n_kv = k_cache.size(1), T = k_cache.size(2), D = k_cache.size(3);
  const int64_t g = n_heads / n_kv;
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(0) == B,
              "caches: contiguous (B, Hkv, max_len, D)");
  TORCH_CHECK(key_len <= T, "key_len beyond the cache");
  cos = cos.contiguous();
  sin = sin.contiguous();
  write_pos = write_pos.contiguous();
  TORCH_CHECK(cos.numel() == M * D && sin.numel() == M * D && write_pos.numel() == M &&
              write_pos.dtype() == torch::kLong, "cos, sin (B, K, D); write_pos (B, K) long");
  const auto x2 = x.reshape({M, H}).contiguous();
  const auto qkv = rows_product(rms_norm(x2, w[0], eps), kinds[0], w[1], w[2], w[3]);
  const int64_t width = qkv.size(1);
  TORCH_CHECK(width == (n_heads + 2 * n_kv) * D, "qkv width");
  auto q = torch::empty({B, n_kv, g * K, D}, x.options());
  const float* qkvp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* pos = write_pos.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < K; ++i) {
      const int64_t r = b * K + i, at = pos[r];
      TORCH_CHECK(at >= 0 && at < T, "write position beyond the cache");
      const float* row = qkvp + r * width;
      for (int64_t hh = 0; hh < n_heads + n_kv; ++hh) {
        float* out = hh < n_heads
            ? qp + ((b * n_kv + hh / g) * g * K + (hh % g) * K + i) * D  // folded GQA rows
            : kp + ((b * n_kv + hh - n_heads) * T + at) * D;
        rotate(row + hh * D, cp + r * D, sp + r * D, D, out);
      }
      for (int64_t hv = 0; hv < n_kv; ++hv)
        std::copy(row + (n_heads + n_kv + hv) * D, row + (n_heads + n_kv + hv + 1) * D,
                  vp + ((b * n_kv + hv) * T + at) * D);
    }
  const auto att = attend(q, k_cache.narrow(2, 0, key_len), v_cache.narrow(2, 0, key_len),
                          mask);
  const auto heads = att.view({B, n_heads, K, D}).transpose(1, 2).reshape({M, n_heads * D});
  const auto o = rows_product(heads, kinds[1], w[4], w[5], w[6]);
  auto h = torch::empty_like(x2);
  {
    const float* a = x2.data_ptr<float>();
    const float* c = o.data_ptr<float>();
    float* y = h.data_ptr<float>();
    for (int64_t j = 0; j < M * H; ++j) y[j] = a[j] + c[j];
  }
  const auto gu = rows_product(rms_norm(h, w[7], eps), kinds[2], w[8], w[9], w[10]);
  const int64_t I = gu.size(1) / 2;
  auto act = at::silu(gu.narrow(1, 0, I)).contiguous();
  {
    float* a = act.data_ptr<float>();
    const float* u = gu.data_ptr<float>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < I; ++j) a[r * I + j] = a[r * I + j] * u[r * 2 * I + I + j];
  }
  const auto down = rows_product(act, kinds[3], w[11], w[12], w[13]);
  {
    float* y = h.data_ptr<float>();
    const float* c = down.data_ptr<float>();
    for (int64_t j = 0; j < M * H; ++j) y[j] = y[j] + c[j];
  }
  return h.view({B, K, H});
}
