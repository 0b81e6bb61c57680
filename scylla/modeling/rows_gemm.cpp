// The ``rows`` CPU GEMM path of scylla.modeling.kernels: y = x @ w.T for fp32 x (M, K) and
// w (N, K), both row-major, on AVX2 + FMA, parallel over weight rows with ATen's thread pool.
//
// Every output y[m][o] is computed by the same sequence of operations whatever M is and
// however rows are blocked: one 8-lane FMA accumulator over k in steps of 8, a fixed horizontal
// sum, then scalar FMAs over the k % 8 tail. So row m of an M-row product is bit-identical to
// that row's 1-row product (plain decoding and a verify forward compute their linears alike).
//
// Blocks of O weight rows x R input rows keep O * R independent accumulators in flight (FMA
// latency, not loads, limited the first version on the 2-core EPYC); each weight row is read
// from memory once per call and reused from L1 for every block of input rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

static inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

template <int O, int R>
static inline void block(const float* w, const float* x, int64_t K, float* y, int64_t N) {
  __m256 a[O][R];
  for (int i = 0; i < O; ++i)
    for (int r = 0; r < R; ++r) a[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[O];
    for (int i = 0; i < O; ++i) wv[i] = _mm256_loadu_ps(w + i * K + k);
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int i = 0; i < O; ++i) a[i][r] = _mm256_fmadd_ps(wv[i], xv, a[i][r]);
    }
  }
  for (int i = 0; i < O; ++i)
    for (int r = 0; r < R; ++r) {
      float s = hsum(a[i][r]);
      for (int64_t t = k; t < K; ++t) s = std::fma(w[i * K + t], x[r * K + t], s);
      y[r * N + i] = s;
    }
}

// O weight rows against all M input rows, R at a time
template <int O, int R>
static inline void rows(const float* w, const float* x, int64_t M, int64_t K, float* y,
                        int64_t N) {
  int64_t m = 0;
  for (; m + R <= M; m += R) block<O, R>(w, x + m * K, K, y + m * N, N);
  switch (M - m) {
    case 3: block<O, 3>(w, x + m * K, K, y + m * N, N); break;
    case 2: block<O, 2>(w, x + m * K, K, y + m * N, N); break;
    case 1: block<O, 1>(w, x + m * K, K, y + m * N, N); break;
  }
}

template <int O, int R>
static void run(const float* w, const float* x, int64_t M, int64_t K, float* y, int64_t N) {
  const int64_t groups = N / O;
  at::parallel_for(0, groups + 1, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (p < groups) {
        rows<O, R>(w + p * O * K, x, M, K, y + p * O, N);
      } else {
        for (int64_t o = groups * O; o < N; ++o) rows<1, R>(w + o * K, x, M, K, y + o, N);
      }
    }
  });
}

torch::Tensor rows_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (M, K), w (N, K)");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // block shapes with 8-12 accumulators in flight (measured on the 2-core EPYC)
  if (M == 1) run<8, 1>(wp, xp, M, K, yp, N);
  else if (M == 2) run<6, 2>(wp, xp, M, K, yp, N);
  else if (M == 3) run<4, 3>(wp, xp, M, K, yp, N);
  else run<3, 4>(wp, xp, M, K, yp, N);
  return y;
}
