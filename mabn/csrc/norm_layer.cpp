// A batch-statistics layer's training forward and backward as one C++ call each: the "cpp_layer"
// backend of eager float32 CPU layers (mabn/backends/cpp.py), built from the kernels of
// norm_kernels.cpp and the statistics of norm_statistics.cpp. mabn.functional.train_forward and
// its autograd Function Normalize stay the reference (and the path of every other backend); this file does the
// same steps in the same order, so that a layer's fixed cost per call is two calls, not the
// ~100 dispatched torch operations and autograd nodes of the Python path (about 0.6 ms per
// layer and iteration on the CPUs measured, results/speed.md).
//
// Forward (eq. 2 / 15, 12-14, 19): per-(group, channel) sums of x and x^2 in one pass, the
// groups' batch statistics (vanilla: mean and biased variance, from torch's centred var_mean
// where mean^2 > cancellation_ratio * (var + eps) makes E[x^2] - mu^2 inexact in float32), the
// forward statistics, then out = x * scale + offset with per-(sample, channel) coefficients
//   scale = weight * r * inv_std,  offset = weight * d + bias - scale * shift.
// Backward (eq. 20): sums of dout and dout * x (dout * (x - shift) when centred) in one pass,
// the backward statistics and coefficients, dx = dout * a + x * b + k in one pass, and the
// affine parameters' gradients sum_g(sum(dout * Y) * r + sum(dout) * d) and sum_g(sum(dout)).

#include "norm_layer.h"

#include "norm_kernels.h"
#include "norm_statistics.h"
#include "norm_util.h"

namespace {

struct Rows {
  torch::Tensor rows;  // (N, H*W, C) for channels_last, (N, C, H*W) for contiguous: a view
  bool per_column;     // channels_last: the coefficients index the last (channel) axis
};

Rows rows_of(const torch::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  if (t.is_contiguous()) return {t.view({N, C, HW}), false};
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "mabn layer: tensors must be contiguous or channels_last");
  return {t.permute({0, 2, 3, 1}).view({N, HW, C}), true};
}

// Per-(group, channel) sum(d) and sum(d * x), float64 (G, C) each; d and x of one layout.
std::pair<torch::Tensor, torch::Tensor> group_dot_sums(const Rows& d, const Rows& x, int64_t G) {
  const int64_t C = x.per_column ? x.rows.size(2) : x.rows.size(1);
  if (x.per_column) {
    auto s = column_dot_sums(d.rows.reshape({G, -1, C}), x.rows.reshape({G, -1, C}));
    return {s[0], s[1]};
  }
  const int64_t N = x.rows.size(0);
  auto s = row_dot_sums(d.rows.reshape({N * C, -1}), x.rows.reshape({N * C, -1})).view({2, G, N / G, C}).sum(2);
  return {s[0], s[1]};
}

void check_input(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 4,
              "mabn layer: ", name, " must be a 4-D float32 CPU tensor");
}

}  // namespace

TrainForward train_forward(const torch::Tensor& x, int64_t groups, const torch::Tensor& weight,
                           const torch::Tensor& bias, const ForwardBuffers& buffers, const LayerOptions& options,
                           bool stream) {
  const bool vanilla = options.vanilla;
  check_input(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(groups > 0 && N % groups == 0, "mabn layer: ", N, " samples in ", groups, " groups");
  check_float(weight, "weight", {C});
  check_float(bias, "bias", {C});
  const int64_t b = N / groups, count = b * H * W;
  const Rows xr = rows_of(x);
  at::NoGradGuard no_grad;

  // The groups' batch statistics (G, K, C).
  auto [s1, s2] = group_dot_sums(xr, xr, groups);
  auto second = s2 / static_cast<double>(count);
  bool centred = false;
  torch::Tensor batch;
  if (vanilla) {
    auto mean = s1 / static_cast<double>(count);
    auto var = (second - mean * mean).clamp_min(0.0);
    if ((mean * mean > options.cancellation_ratio * (var + options.eps)).any().item<bool>()) {
      auto [v, m] = at::var_mean(x.view({groups, b, C, H, W}), at::IntArrayRef{1, 3, 4}, std::optional<at::Scalar>(0), false);
      var = v;
      mean = m;
      centred = true;
    }
    batch = at::stack({mean, var}, 1).to(torch::kFloat).contiguous();
  } else {
    batch = second.unsqueeze(1).to(torch::kFloat).contiguous();
  }
  const ForwardStatistics st = forward_statistics(batch, count, buffers, options);
  const torch::Tensor &inv_std = st.inv_std, &shift = st.shift, &r = st.r, &d = st.d;

  // out = x * scale + offset, one row of coefficients per sample (its group's).
  auto scale = torch::empty({N, C}, x.options()), offset = torch::empty({N, C}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  const float* inv = inv_std.data_ptr<float>();
  const float* sh = shift.defined() ? shift.data_ptr<float>() : nullptr;
  const float* rp = r.defined() ? r.data_ptr<float>() : nullptr;
  const float* dp = d.defined() ? d.data_ptr<float>() : nullptr;
  float* sc = scale.data_ptr<float>();
  float* of = offset.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t row = g * b * C;  // the group's first sample
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = g * C + c;
      const float a = rp ? w[c] * rp[i] : w[c];  // a = weight * r, c = weight * d + bias
      const float cc = dp ? bi[c] + w[c] * dp[i] : bi[c];
      const float s = a * inv[i];
      sc[row + c] = s;
      of[row + c] = sh ? cc - s * sh[i] : cc;
    }
  }
  repeat_group_rows({sc, of}, groups, b, C);
  auto out = torch::empty_like(x);  // x's layout
  const Rows outr = rows_of(out);
  scale_shift(xr.rows, scale, offset, xr.per_column, stream, outr.rows);
  return TrainForward{out, Normalization{inv_std, shift, r, d, st.warm, centred}, st.s0};
}

TrainBackward train_backward(const torch::Tensor& dout, const torch::Tensor& x, const torch::Tensor& weight,
                             const Normalization& norm, const BackwardBuffers& buffers,
                             const LayerOptions& options, bool stream) {
  const torch::Tensor &inv_std = norm.inv_std, &shift = norm.shift, &r = norm.r, &d = norm.d;
  const bool centred = norm.centred;
  check_input(x, "x");
  check_input(dout, "dout");
  TORCH_CHECK(dout.sizes() == x.sizes(), "mabn layer: dout and x differ in shape");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(inv_std.dim() == 2 && inv_std.size(1) == C, "mabn layer: inv_std must be (G, C)");
  const int64_t groups = inv_std.size(0), b = N / groups, count = b * H * W;
  check_float(weight, "weight", {C});
  at::NoGradGuard no_grad;
  const Rows xr = rows_of(x), dr = rows_of(dout);
  TORCH_CHECK(xr.per_column == dr.per_column, "mabn layer: dout and x must have one layout");
  const bool has_shift = shift.defined(), has_r = r.defined(), has_d = d.defined();
  TORCH_CHECK(!centred || has_shift, "mabn layer: the centred reduction needs the shift");

  // sum(dout) and sum(dout * x), or sum(dout * (x - shift)) for badly centred inputs.
  torch::Tensor s_dout, s_dout_x;
  if (centred) {
    auto per_sample = shift.repeat_interleave(b, 0).view({N, C, 1, 1});
    auto xc = x - per_sample;  // (x's layout)
    std::tie(s_dout, s_dout_x) = group_dot_sums(dr, rows_of(xc), groups);
  } else {
    std::tie(s_dout, s_dout_x) = group_dot_sums(dr, xr, groups);
  }
  auto a = has_r ? weight * r : weight.expand({groups, C}).contiguous();
  const BackwardStatistics st = backward_statistics(s_dout, s_dout_x, norm, a, count, N, buffers, options);
  const torch::Tensor &sum_dout_y = st.sum_dout_y, &sum_dout = st.sum_dout;
  auto dx = torch::empty_like(x);
  const Rows dxr = rows_of(dx);
  multiply_adds(dr.rows, xr.rows, st.a_rows, st.b_rows, st.k_rows.defined() ? st.k_rows : torch::empty({0}, x.options()),
                xr.per_column, stream, dxr.rows);
  // The affine parameters' gradients through a = weight * r and c = weight * d + bias.
  auto grad_weight = (has_r ? sum_dout_y * r : sum_dout_y).sum(0);
  if (has_d) grad_weight = grad_weight + (sum_dout * d).sum(0);
  auto grad_bias = sum_dout.sum(0);
  return TrainBackward{dx, grad_weight, grad_bias, st.g0, st.psi0};
}
