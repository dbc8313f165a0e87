// CPU kernels of the eager batch-statistics layers (mabn/norm.py), loaded by mabn/kernels.py.
//
// Three memory-bound loops that eager torch can only express as several kernels or as one call
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
//
// float32 inputs only (the layers compute in float32 or float64; float64 keeps torch's ops).
// Sums are accumulated in float32 over blocks of at most kBlock values and the blocks added in
// float64, so the result's error does not grow with the number of summed values.
// Parallel over rows / row blocks with at::parallel_for (torch's intra-op threads).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

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

MABN_CLONES void affine3_scalar(const float* __restrict__ d, const float* __restrict__ x,
                                float* __restrict__ out, int64_t n, float a, float b, float k) {
  for (int64_t i = 0; i < n; ++i) out[i] = d[i] * a + x[i] * b + k;
}

MABN_CLONES void affine3_vector(const float* __restrict__ d, const float* __restrict__ x,
                                float* __restrict__ out, int64_t n, const float* __restrict__ a,
                                const float* __restrict__ b, const float* __restrict__ k) {
  for (int64_t i = 0; i < n; ++i) out[i] = d[i] * a[i] + x[i] * b[i] + k[i];
}

void check_float_contiguous(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "mabn kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat, "mabn kernels: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "mabn kernels: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, "mabn kernels: ", name, " must have ", dim, " dimensions, got ",
              t.dim());
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

// d, x: (N, P, Q); a, b, k: (N, Q) if per_column else (N, P). Returns d * a + x * b + k (N, P, Q).
torch::Tensor multiply_adds(torch::Tensor d, torch::Tensor x, torch::Tensor a, torch::Tensor b,
                            torch::Tensor k, bool per_column) {
  check_float_contiguous(d, "d", 3);
  check_float_contiguous(x, "x", 3);
  check_float_contiguous(a, "a", 2);
  check_float_contiguous(b, "b", 2);
  check_float_contiguous(k, "k", 2);
  TORCH_CHECK(d.sizes() == x.sizes(), "mabn kernels: d and x differ in shape");
  const int64_t N = d.size(0), P = d.size(1), Q = d.size(2);
  const int64_t coef = per_column ? Q : P;
  for (const auto* t : {&a, &b, &k})
    TORCH_CHECK(t->size(0) == N && t->size(1) == coef, "mabn kernels: coefficients must be (",
                N, ", ", coef, "), got ", t->sizes());
  auto out = torch::empty_like(d);
  const float* dp = d.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(Q, 1));
  at::parallel_for(0, N * P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / P;
      if (per_column) {
        affine3_vector(dp + row * Q, xp + row * Q, op + row * Q, Q, ap + n * Q, bp + n * Q, kp + n * Q);
      } else {
        affine3_scalar(dp + row * Q, xp + row * Q, op + row * Q, Q, ap[row], bp[row], kp[row]);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("column_dot_sums", &column_dot_sums, "per-(group, channel) sum(d), sum(d*x) of (G, L, C) rows");
  m.def("row_dot_sums", &row_dot_sums, "per-row sum(d), sum(d*x) of (R, Q) rows");
  m.def("multiply_adds", &multiply_adds, "d * a + x * b + k with per-(sample, channel) coefficients");
}
