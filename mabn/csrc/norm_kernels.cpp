// CPU kernels of the eager batch-statistics layers (mabn/backends/cpp.py), loaded by mabn/kernels.py.
//
// Memory-bound loops that eager torch can only express as several kernels or as one call
// per normalization group, each written here as one pass over its inputs:
//
//   column_dot_sums  (G, L, C) rows of a channels_last tensor, one group per G: per-(group,
//                    channel) sum(d) and sum(d * x) over L (eq. 2/15 forward sums with d = x,
//                    eq. 20's backward reductions with d = dL/dout).
//   row_dot_sums     (R, Q) rows of a contiguous tensor (R = N*C planes of Q = H*W pixels):
//                    per-row sum(d) and sum(d * x).
//   multiply_adds    eq. 20's input gradient out = d * a + x * b + k on (N, P, Q) rows, with
//                    per-(sample, channel) coefficients indexed (n, q) (channels_last: P = H*W,
//                    Q = C) or (n, p) (contiguous: P = C, Q = H*W).
//   scale_shift      the forward's output x * scale + offset, coefficients as above.
//
// float32 inputs only (the layers compute in float32 or float64; float64 keeps torch's ops).
// Sums are accumulated in float32 over blocks of at most kBlock values and the blocks added in
// float64, so the result's error does not grow with the number of summed values.
// Parallel over rows / row blocks with at::parallel_for (torch's intra-op threads).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "norm_kernels.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__)
// One copy of each loop per instruction set, chosen when the library is loaded, so that a build
// cached in a shared home directory runs on any x86-64 CPU (no -march=native).
#define MABN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MABN_CLONES
#endif

namespace {

constexpr int64_t kBlock = 64;       // rows (column sums) accumulated in float32 before float64
constexpr int64_t kRowBlock = 1024;  // values (row sums) accumulated in float32 before float64

// q1[c] += sum over rows of d[r, c]; q2[c] += sum of d[r, c] * x[r, c]; rows of length C.
MABN_CLONES void column_block(const float* __restrict__ d, const float* __restrict__ x,
                              int64_t rows, int64_t C, float* __restrict__ q1,
                              float* __restrict__ q2) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict__ dr = d + r * C;
    const float* __restrict__ xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      q1[c] += dr[c];
      q2[c] += dr[c] * xr[c];
    }
  }
}

// (sum d, sum d * x) of n values, in float32 (one block).
MABN_CLONES void row_block(const float* __restrict__ d, const float* __restrict__ x, int64_t n,
                           float* s1, float* s2) {
  float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t i = 0; i < n; ++i) {
    a1 += d[i];
    a2 += d[i] * x[i];
  }
  *s1 = a1;
  *s2 = a2;
}

// out[i] = d[i] * a + x[i] * b + k over one row of n values (without the d term when D is
// false); a, b, k are per-value arrays when V, else one value each. Written with the
// instruction set the CPU has (chosen once, at load), and with non-temporal (streaming) stores
// when `stream`: a large output then goes to memory without first being read into the cache,
// 3 memory passes instead of 4 (measured 15-25% faster on ResNet-50-sized tensors).
template <bool V, bool D>
inline float affine_value(const float* d, const float* x, const float* a, const float* b,
                          const float* k, int64_t i) {
  float v = x[i] * (V ? b[i] : *b) + (V ? k[i] : *k);
  if (D) v += d[i] * (V ? a[i] : *a);
  return v;
}

template <bool V, bool D>
void affine_row_default(const float* __restrict__ d, const float* __restrict__ x,
                        float* __restrict__ o, int64_t n, const float* a, const float* b,
                        const float* k, bool) {
  for (int64_t i = 0; i < n; ++i) o[i] = affine_value<V, D>(d, x, a, b, k, i);
}

#if defined(__GNUC__) && defined(__x86_64__)
template <bool V, bool D>
__attribute__((target("avx2,fma"))) void affine_row_avx2(
    const float* __restrict__ d, const float* __restrict__ x, float* __restrict__ o, int64_t n,
    const float* a, const float* b, const float* k, bool stream) {
  int64_t i = 0;
  if (stream)
    for (; i < n && (reinterpret_cast<uintptr_t>(o + i) & 31); ++i) o[i] = affine_value<V, D>(d, x, a, b, k, i);
  const __m256 sa = _mm256_set1_ps(D && !V ? *a : 0.f), sb = _mm256_set1_ps(V ? 0.f : *b),
               sk = _mm256_set1_ps(V ? 0.f : *k);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), V ? _mm256_loadu_ps(b + i) : sb,
                               V ? _mm256_loadu_ps(k + i) : sk);
    if (D) v = _mm256_fmadd_ps(_mm256_loadu_ps(d + i), V ? _mm256_loadu_ps(a + i) : sa, v);
    if (stream) _mm256_stream_ps(o + i, v); else _mm256_storeu_ps(o + i, v);
  }
  for (; i < n; ++i) o[i] = affine_value<V, D>(d, x, a, b, k, i);
}

template <bool V, bool D>
__attribute__((target("avx512f"))) void affine_row_avx512(
    const float* __restrict__ d, const float* __restrict__ x, float* __restrict__ o, int64_t n,
    const float* a, const float* b, const float* k, bool stream) {
  int64_t i = 0;
  if (stream)
    for (; i < n && (reinterpret_cast<uintptr_t>(o + i) & 63); ++i) o[i] = affine_value<V, D>(d, x, a, b, k, i);
  const __m512 sa = _mm512_set1_ps(D && !V ? *a : 0.f), sb = _mm512_set1_ps(V ? 0.f : *b),
               sk = _mm512_set1_ps(V ? 0.f : *k);
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), V ? _mm512_loadu_ps(b + i) : sb,
                               V ? _mm512_loadu_ps(k + i) : sk);
    if (D) v = _mm512_fmadd_ps(_mm512_loadu_ps(d + i), V ? _mm512_loadu_ps(a + i) : sa, v);
    if (stream) _mm512_stream_ps(o + i, v); else _mm512_storeu_ps(o + i, v);
  }
  for (; i < n; ++i) o[i] = affine_value<V, D>(d, x, a, b, k, i);
}

int instruction_level() {  // 2: AVX-512F, 1: AVX2 + FMA, 0: neither
  static const int level = __builtin_cpu_supports("avx512f") ? 2
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
  return level;
}
#else
int instruction_level() { return 0; }
#endif

template <bool V, bool D>
void affine_row(const float* d, const float* x, float* o, int64_t n, const float* a,
                const float* b, const float* k, bool stream) {
#if defined(__GNUC__) && defined(__x86_64__)
  const int level = instruction_level();
  if (level == 2) return affine_row_avx512<V, D>(d, x, o, n, a, b, k, stream);
  if (level == 1) return affine_row_avx2<V, D>(d, x, o, n, a, b, k, stream);
#endif
  affine_row_default<V, D>(d, x, o, n, a, b, k, stream);
}

// out = d * a + x * b + k (or x * b + k without d) on (N, P, Q) rows, coefficients (N, Q) if
// per_column else (N, P); with streaming stores if `stream` (the caller's choice: outputs too
// large to stay in the cache for the next layer, see mabn/kernels.py STREAM_BYTES).
void affine_rows(const float* dp, const torch::Tensor& x, const torch::Tensor& a,
                 const torch::Tensor& b, const torch::Tensor& k, bool per_column, bool stream,
                 torch::Tensor& out) {
  const int64_t N = x.size(0), P = x.size(1), Q = x.size(2);
  // Streaming stores only where every row is whole 64-byte cache lines (Q a multiple of 16
  // floats; torch's allocations are 64-byte aligned): rows that share a line with the next
  // one would mix streaming and ordinary stores in that line, which flushes the write-combining
  // buffers half-filled. Measured on an AMD EPYC (Zen 3), contiguous 32x2048x7x7 (rows of 49):
  // 8.3 ms with streaming against 0.9 ms without (results/bench_norm.md).
  stream = stream && Q % 16 == 0;
  const float* xp = x.data_ptr<float>();
  const float* ap = dp ? a.data_ptr<float>() : nullptr;
  const float* bp = b.data_ptr<float>();
  // An empty k means k = 0 (eq. 20 without the constant term: the modified form), read from a
  // row of zeros instead of a full-size tensor of them.
  const bool zero_k = k.numel() == 0;
  const std::vector<float> zeros(zero_k ? std::max<int64_t>(Q, 1) : 0, 0.f);
  const float* kp = zero_k ? nullptr : k.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(Q, 1));
  at::parallel_for(0, N * P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = per_column ? (row / P) * Q : row;  // offset of the row's coefficients
      const float* d = dp ? dp + row * Q : nullptr;
      const float* kr = zero_k ? zeros.data() : kp + c;
      if (per_column) {
        if (dp) affine_row<true, true>(d, xp + row * Q, op + row * Q, Q, ap + c, bp + c, kr, stream);
        else affine_row<true, false>(d, xp + row * Q, op + row * Q, Q, ap, bp + c, kr, stream);
      } else {
        if (dp) affine_row<false, true>(d, xp + row * Q, op + row * Q, Q, ap + c, bp + c, kr, stream);
        else affine_row<false, false>(d, xp + row * Q, op + row * Q, Q, ap, bp + c, kr, stream);
      }
    }
#if defined(__GNUC__) && defined(__x86_64__)
    if (stream) __builtin_ia32_sfence();  // streaming stores visible before the tensor is used
#endif
  });
}

void check_float_contiguous(const torch::Tensor& t, const char* name, int64_t dim,
                            bool may_be_empty = false) {
  TORCH_CHECK(t.device().is_cpu(), "mabn kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat, "mabn kernels: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "mabn kernels: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim || (may_be_empty && t.numel() == 0), "mabn kernels: ", name,
              " must have ", dim, " dimensions, got ", t.dim());
}

}  // namespace

// d, x: (G, L, C). Returns (2, G, C) float64: [sum d, sum d * x] over L.
torch::Tensor column_dot_sums(torch::Tensor d, torch::Tensor x) {
  check_float_contiguous(d, "d", 3);
  check_float_contiguous(x, "x", 3);
  TORCH_CHECK(d.sizes() == x.sizes(), "mabn kernels: d and x differ in shape");
  const int64_t G = d.size(0), L = d.size(1), C = d.size(2);
  auto result = torch::zeros({2, G, C}, d.options().dtype(torch::kDouble));
  if (G == 0 || L == 0 || C == 0) return result;
  // Split every group's rows into S slices so that there are at least two tasks per thread.
  const int64_t threads = at::get_num_threads();
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>((2 * threads + G - 1) / G, (L + kBlock - 1) / kBlock));
  std::vector<double> partial(static_cast<size_t>(G * S * 2 * C), 0.0);
  const float* dp = d.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, G * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q1(C), q2(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / S, s = task % S;
      const int64_t r0 = L * s / S, r1 = L * (s + 1) / S;
      double* o1 = partial.data() + task * 2 * C;
      double* o2 = o1 + C;
      for (int64_t r = r0; r < r1; r += kBlock) {
        const int64_t rows = std::min(r1, r + kBlock) - r;
        std::fill(q1.begin(), q1.end(), 0.f);
        std::fill(q2.begin(), q2.end(), 0.f);
        column_block(dp + (g * L + r) * C, xp + (g * L + r) * C, rows, C, q1.data(), q2.data());
        for (int64_t c = 0; c < C; ++c) {
          o1[c] += q1[c];
          o2[c] += q2[c];
        }
      }
    }
  });
  double* out = result.data_ptr<double>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t s = 0; s < S; ++s) {
      const double* o = partial.data() + (g * S + s) * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        out[g * C + c] += o[c];
        out[(G + g) * C + c] += o[C + c];
      }
    }
  return result;
}

// d, x: (R, Q). Returns (2, R) float64: [sum d, sum d * x] over Q.
torch::Tensor row_dot_sums(torch::Tensor d, torch::Tensor x) {
  check_float_contiguous(d, "d", 2);
  check_float_contiguous(x, "x", 2);
  TORCH_CHECK(d.sizes() == x.sizes(), "mabn kernels: d and x differ in shape");
  const int64_t R = d.size(0), Q = d.size(1);
  auto result = torch::zeros({2, R}, d.options().dtype(torch::kDouble));
  const float* dp = d.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  double* out = result.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(Q, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double t1 = 0.0, t2 = 0.0;
      for (int64_t q = 0; q < Q; q += kRowBlock) {
        float s1, s2;
        row_block(dp + r * Q + q, xp + r * Q + q, std::min(Q, q + kRowBlock) - q, &s1, &s2);
        t1 += s1;
        t2 += s2;
      }
      out[r] = t1;
      out[R + r] = t2;
    }
  });
  return result;
}

void check_output(const torch::Tensor& out, const torch::Tensor& x) {
  check_float_contiguous(out, "out", 3);
  TORCH_CHECK(out.sizes() == x.sizes(), "mabn kernels: out must have x's shape ", x.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(!out.is_same(x) && out.data_ptr() != x.data_ptr(), "mabn kernels: out must not be x");
}

void check_coefficients(const torch::Tensor& x, bool per_column,
                        std::initializer_list<const torch::Tensor*> coefficients) {
  const int64_t N = x.size(0), coef = per_column ? x.size(2) : x.size(1);
  for (const auto* t : coefficients)
    TORCH_CHECK((t->numel() == 0 && t == *std::prev(coefficients.end())) ||  // k may be empty
                    (t->dim() == 2 && t->size(0) == N && t->size(1) == coef),
                "mabn kernels: coefficients must be (",
                N, ", ", coef, "), got ", t->sizes());
}

// d, x, out: (N, P, Q); a, b, k: (N, Q) if per_column else (N, P), k may be empty (= 0). Writes d * a + x * b + k
// into out (the caller allocates it, so that the result can be a view of a tensor of its own
// layout), with streaming stores if `stream`, and returns it.
torch::Tensor multiply_adds(torch::Tensor d, torch::Tensor x, torch::Tensor a, torch::Tensor b,
                            torch::Tensor k, bool per_column, bool stream, torch::Tensor out) {
  check_float_contiguous(d, "d", 3);
  check_float_contiguous(x, "x", 3);
  check_float_contiguous(a, "a", 2);
  check_float_contiguous(b, "b", 2);
  check_float_contiguous(k, "k", 2, /*may_be_empty=*/true);
  TORCH_CHECK(d.sizes() == x.sizes(), "mabn kernels: d and x differ in shape");
  check_coefficients(x, per_column, {&a, &b, &k});
  check_output(out, x);
  affine_rows(d.data_ptr<float>(), x, a, b, k, per_column, stream, out);
  return out;
}

// x, out: (N, P, Q); scale, offset: (N, Q) if per_column else (N, P), offset may be empty (= 0). Writes x * scale + offset
// into out (streaming stores if `stream`) and returns it.
torch::Tensor scale_shift(torch::Tensor x, torch::Tensor scale, torch::Tensor offset, bool per_column,
                          bool stream, torch::Tensor out) {
  check_float_contiguous(x, "x", 3);
  check_float_contiguous(scale, "scale", 2);
  check_float_contiguous(offset, "offset", 2, /*may_be_empty=*/true);
  check_coefficients(x, per_column, {&scale, &offset});
  check_output(out, x);
  affine_rows(nullptr, x, scale, scale, offset, per_column, stream, out);
  return out;
}
