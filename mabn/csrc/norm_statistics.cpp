// The statistics of one training forward and one backward of the batch-statistics layers, as
// loops over their (group, statistic, channel) values: the C++ versions of
// mabn.functional.forward_statistics and backward_statistics, which stay the reference (and the
// path of every other backend).
//
// Between the layer's memory-bound passes sit ~50 (forward) and ~50 (backward) operations on
// (G, C) tensors: SMA windows (eq. 13), EMAs (eq. 12), renormalization r, d (eq. 14, 19),
// the backward statistics g, Psi (eq. 5, 20) and eq. 20's coefficients. In eager torch each is
// a dispatched call, and at 7x7 maps the two functions cost as much as the layer's data passes;
// here each is a few vectorized loops over G*C values (microseconds). Values are float32, as in
// the Python functions; sums over groups and over SMA windows are accumulated in float64.
//
// Semantics: exactly those of the Python functions (their docstrings and mabn/norm.py's module
// docstring); the comments below name the Python lines they mirror. Tensors: float32, CPU,
// contiguous, except the float64 reductions s_dout, s_dout_x and the int64 counters.

#include "norm_statistics.h"

#include "norm_util.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

enum Stat { kBatch, kEma, kSma };

Stat parse_stat(const std::string& name, const char* option) {
  if (name == "batch") return kBatch;
  if (name == "ema") return kEma;
  if (name == "sma") return kSma;
  TORCH_CHECK(false, "mabn statistics: ", option, " must be \"batch\", \"ema\" or \"sma\", got \"", name, "\"");
  return kBatch;
}

void check_counter(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kLong && t.numel() == 1,
              "mabn statistics: ", name, " must be a one-element int64 CPU tensor");
}

// _sliding_mean: the SMA of every new row (G, K*C) over the last m = W + 1 rows of
// cat(window (W, K*C), new), sums over all m rows divided by the number of valid ones; then
// the window keeps the last W rows of that sequence (rows and validity updated in place).
// The window sums are running float64 sums (one row added and one dropped per group).
void sliding_mean(float* window, float* valid, int64_t W, const float* fresh, int64_t G, int64_t KC,
                  float* sma) {
  const int64_t rows = W + G;
  std::vector<float> seq(static_cast<size_t>(rows * KC));
  std::vector<double> seq_valid(static_cast<size_t>(rows), 1.0);
  std::copy(window, window + W * KC, seq.begin());
  std::copy(valid, valid + W, seq_valid.begin());
  std::copy(fresh, fresh + G * KC, seq.begin() + W * KC);
  std::vector<double> sum(static_cast<size_t>(KC), 0.0);
  double counted = 0.0;
  for (int64_t j = 0; j < W; ++j) {  // the first window's rows but its last
    counted += seq_valid[j];
    const float* row = seq.data() + j * KC;
    for (int64_t i = 0; i < KC; ++i) sum[i] += row[i];
  }
  for (int64_t g = 0; g < G; ++g) {  // group g's window: rows g .. g + W
    const float* in = seq.data() + (g + W) * KC;
    counted += seq_valid[g + W];
    const double scale = 1.0 / counted;
    for (int64_t i = 0; i < KC; ++i) {
      sum[i] += in[i];
      sma[g * KC + i] = static_cast<float>(sum[i] * scale);
    }
    const float* out = seq.data() + g * KC;
    counted -= seq_valid[g];
    for (int64_t i = 0; i < KC; ++i) sum[i] -= out[i];
  }
  std::copy(seq.begin() + G * KC, seq.end(), window);  // seq[G:]
  for (int64_t j = 0; j < W; ++j) valid[j] = static_cast<float>(seq_valid[G + j]);
}

// Per-column means over G rows of (G, n) values, summed in float64.
std::vector<float> column_means(const float* rows, int64_t G, int64_t n) {
  std::vector<double> sum(static_cast<size_t>(n), 0.0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < n; ++i) sum[i] += rows[g * n + i];
  std::vector<float> mean(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) mean[i] = static_cast<float>(sum[i] / G);
  return mean;
}

// _ema_update: running <- alpha * running + (1 - alpha) * value, or value where `first`.
void ema_update(float* running, const float* value, int64_t C, double alpha, bool first) {
  const float keep = static_cast<float>(alpha), take = static_cast<float>(1.0 - alpha);
  for (int64_t c = 0; c < C; ++c) running[c] = first ? value[c] : running[c] * keep + value[c] * take;
}

torch::Tensor undefined() { return torch::Tensor(); }

}  // namespace

ForwardStatistics forward_statistics(const torch::Tensor& batch, int64_t count, const ForwardBuffers& buffers,
                                     const LayerOptions& options) {
  const bool vanilla = options.vanilla, ema_first = options.ema_first;
  const int64_t warmup_iters = options.warmup_iters, renorm_warmup_iters = options.renorm_warmup_iters;
  const double r_max = options.r_max, d_max = options.d_max, eps = options.eps, alpha = options.alpha;
  const torch::Tensor &fp_window = buffers.fp_window, &fp_window_valid = buffers.fp_window_valid;
  const torch::Tensor &running_mean = buffers.running_mean, &running_var = buffers.running_var;
  const torch::Tensor& num_batches_tracked = buffers.num_batches_tracked;
  const Stat fp = parse_stat(options.fp_stats, "fp_stats"), bp = parse_stat(options.bp_stats, "bp_stats");
  TORCH_CHECK(batch.dim() == 3, "mabn statistics: batch must be (G, K, C), got ", batch.sizes());
  const int64_t G = batch.size(0), K = batch.size(1), C = batch.size(2), KC = K * C;
  const int64_t W = fp_window.size(0);
  TORCH_CHECK(K == (vanilla ? 2 : 1), "mabn statistics: batch has ", K, " statistics per group");
  check_float(batch, "batch", {G, K, C});
  check_float(fp_window, "fp_window", {W, K, C});
  check_float(fp_window_valid, "fp_window_valid", {W});
  check_float(running_mean, "running_mean", {C});
  check_float(running_var, "running_var", {C});
  check_counter(num_batches_tracked, "num_batches_tracked");
  const int64_t t = num_batches_tracked.item<int64_t>();  // t - 1, before this iteration
  const float* fresh = batch.data_ptr<float>();

  // ema_value = batch.mean(0); the variance EMA stores the unbiased estimate (vanilla).
  std::vector<float> ema_value = column_means(fresh, G, KC);
  if (vanilla)
    for (int64_t c = 0; c < C; ++c) ema_value[C + c] *= static_cast<float>(static_cast<double>(count) / (count - 1));
  // The SMA over the window and this iteration's groups (eq. 13), the window updated in place.
  std::vector<float> sma;
  if (fp == kSma || bp == kSma) {
    sma.resize(static_cast<size_t>(G * KC));
    sliding_mean(fp_window.data_ptr<float>(), fp_window_valid.data_ptr<float>(), W, fresh, G, KC, sma.data());
  }
  // The EMA before this iteration's update (eq. 12), or this batch's value on the first one.
  const bool first = ema_first && t == 0;
  std::vector<float> ema(static_cast<size_t>(KC));
  if (vanilla) std::copy(running_mean.data_ptr<float>(), running_mean.data_ptr<float>() + C, ema.begin());
  std::copy(running_var.data_ptr<float>(), running_var.data_ptr<float>() + C, ema.begin() + (K - 1) * C);
  if (first && (fp == kEma || bp == kEma)) ema = ema_value;
  const bool has_warm = warmup_iters > 0, warm = has_warm && t < warmup_iters;
  auto rows = [&](Stat which, int64_t g) -> const float* {  // _select, then the warm-up: (K, C)
    if (warm || which == kBatch) return fresh + g * KC;
    return which == kSma ? sma.data() + g * KC : ema.data();
  };

  auto f32 = batch.options();
  auto inv_std = torch::empty({G, C}, f32);
  auto shift = vanilla ? torch::empty({G, C}, f32) : undefined();
  const bool renorm = fp != bp || has_warm;
  auto r = renorm ? torch::empty({G, C}, f32) : undefined();
  auto d = renorm && vanilla ? torch::empty({G, C}, f32) : undefined();
  auto s0 = torch::empty({K, C}, f32);
  const int64_t limit = std::max(warmup_iters, renorm_warmup_iters);
  const bool renorm_off = limit > 0 && t < limit;
  const float epsf = static_cast<float>(eps), r_hi = static_cast<float>(r_max);
  const float r_lo = static_cast<float>(1.0 / r_max), d_hi = static_cast<float>(d_max);
  std::copy(rows(bp, 0), rows(bp, 0) + KC, s0.data_ptr<float>());
  for (int64_t g = 0; g < G; ++g) {
    const float* s = rows(bp, g);
    const float* f = rows(fp, g);
    const float* s_var = s + (K - 1) * C;  // the variance / chi^2 row
    const float* f_var = f + (K - 1) * C;
    float* inv = inv_std.data_ptr<float>() + g * C;
    for (int64_t c = 0; c < C; ++c) inv[c] = 1.0f / std::sqrt(s_var[c] + epsf);
    if (vanilla) std::copy(s, s + C, shift.data_ptr<float>() + g * C);
    if (!renorm) continue;
    // Eq. 14 / 19: r = clip(sqrt(v_s + eps) / sqrt(v_f + eps)), d = clip((mu_s - mu_f) / sqrt(v_f + eps)).
    float* rg = r.data_ptr<float>() + g * C;
    float* dg = vanilla ? d.data_ptr<float>() + g * C : nullptr;
    if (renorm_off) {  // r = 1, d = 0 during the renormalization warm-up
      std::fill(rg, rg + C, 1.0f);
      if (dg) std::fill(dg, dg + C, 0.0f);
      continue;
    }
    for (int64_t c = 0; c < C; ++c)  // (vectorized loops: no branches inside)
      rg[c] = std::min(std::max(std::sqrt(s_var[c] + epsf) / std::sqrt(f_var[c] + epsf), r_lo), r_hi);
    if (dg)
      for (int64_t c = 0; c < C; ++c)
        dg[c] = std::min(std::max((s[c] - f[c]) / std::sqrt(f_var[c] + epsf), -d_hi), d_hi);
  }
  // The EMAs and the counter, after use.
  if (vanilla) ema_update(running_mean.data_ptr<float>(), ema_value.data(), C, alpha, first);
  ema_update(running_var.data_ptr<float>(), ema_value.data() + (K - 1) * C, C, alpha, first);
  num_batches_tracked.add_(1);
  auto warm_t = has_warm ? torch::tensor(warm) : undefined();
  return ForwardStatistics{s0, inv_std, shift, r, d, warm_t};
}

BackwardStatistics backward_statistics(const torch::Tensor& s_dout, const torch::Tensor& s_dout_x,
                                       const Normalization& norm, torch::Tensor a, int64_t count, int64_t n,
                                       const BackwardBuffers& buffers, const LayerOptions& options) {
  const bool vanilla = options.vanilla, ema_first = options.ema_first, centred = norm.centred;
  const double alpha = options.alpha;
  const torch::Tensor &inv_std = norm.inv_std, &shift = norm.shift, &warm = norm.warm;
  const torch::Tensor &bp_window = buffers.bp_window, &bp_window_valid = buffers.bp_window_valid;
  const torch::Tensor &running_g = buffers.running_g, &running_psi = buffers.running_psi;
  const torch::Tensor& num_backward_tracked = buffers.num_backward_tracked;
  const Stat bp = parse_stat(options.bp_stats, "bp_stats");
  TORCH_CHECK(inv_std.dim() == 2, "mabn statistics: inv_std must be (G, C), got ", inv_std.sizes());
  const int64_t G = inv_std.size(0), C = inv_std.size(1), K = vanilla ? 2 : 1, KC = K * C;
  TORCH_CHECK(G > 0 && n % G == 0, "mabn statistics: ", n, " samples in ", G, " groups");
  for (const auto* t : {&s_dout, &s_dout_x})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kDouble && t->sizes() == inv_std.sizes(),
                "mabn statistics: s_dout and s_dout_x must be float64 (G, C) CPU tensors");
  a = a.contiguous();
  check_float(inv_std, "inv_std", {G, C});
  check_float(a, "a", {G, C});
  const bool has_shift = shift.defined();
  if (has_shift) check_float(shift, "shift", {G, C});
  const int64_t W = bp_window.size(0);
  check_float(bp_window, "bp_window", {W, K, C});
  check_float(bp_window_valid, "bp_window_valid", {W});
  check_float(running_g, "running_g", {C});
  check_float(running_psi, "running_psi", {C});
  check_counter(num_backward_tracked, "num_backward_tracked");
  const bool is_warm = warm.defined() && warm.item<bool>();
  const bool first = ema_first && num_backward_tracked.item<int64_t>() == 0;
  const auto s_d = s_dout.contiguous(), s_dx = s_dout_x.contiguous();
  const double* sd = s_d.data_ptr<double>();
  const double* sdx = s_dx.data_ptr<double>();
  const float* inv = inv_std.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* sh = has_shift ? shift.data_ptr<float>() : nullptr;

  auto f32 = inv_std.options();
  auto sum_dout = torch::empty({G, C}, f32), sum_dout_y = torch::empty({G, C}, f32);
  float* sum_d = sum_dout.data_ptr<float>();
  float* sum_dy = sum_dout_y.data_ptr<float>();
  // The affine parameters' gradient sums, sum(dout) and sum(dout * Y) = inv_std * sum(dout * (x - shift)),
  // and the groups' backward statistics (G, K, C): g_B = a * sum(dout) / count (vanilla) and
  // Psi_B = a * sum(dout * Y) / count (eq. 5 with G = a * dL/dout).
  const float per_count = static_cast<float>(1.0 / static_cast<double>(count));
  std::vector<float> stats(static_cast<size_t>(G * KC));
  for (int64_t g = 0; g < G; ++g) {
    float* psi_b = stats.data() + g * KC + (K - 1) * C;
    float* g_b = stats.data() + g * KC;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = g * C + c;
      const float d_sum = static_cast<float>(sd[i]), dx_sum = static_cast<float>(sdx[i]);  // .to(a.dtype)
      const float dy = inv[i] * (centred || !sh ? dx_sum : dx_sum - sh[i] * d_sum);
      sum_d[i] = d_sum;
      sum_dy[i] = dy;
      psi_b[c] = ap[i] * dy * per_count;
      if (vanilla) g_b[c] = ap[i] * d_sum * per_count;
    }
  }
  const std::vector<float> mean = column_means(stats.data(), G, KC);
  // (g_u, Psi_u) by bp_stats: the group's own, their SMA, or the EMA of previous backwards.
  std::vector<float> window_u;
  const float* u = stats.data();  // (G, K, C), or one (K, C) row for every group (u_step 0)
  int64_t u_step = KC;
  if (bp == kSma) {
    window_u.resize(static_cast<size_t>(G * KC));
    sliding_mean(bp_window.data_ptr<float>(), bp_window_valid.data_ptr<float>(), W, stats.data(), G, KC,
                 window_u.data());
    u = window_u.data();
  } else if (bp == kEma) {
    window_u.resize(static_cast<size_t>(KC));
    if (first) {
      window_u = mean;
    } else {
      if (vanilla) std::copy(running_g.data_ptr<float>(), running_g.data_ptr<float>() + C, window_u.begin());
      std::copy(running_psi.data_ptr<float>(), running_psi.data_ptr<float>() + C, window_u.begin() + (K - 1) * C);
    }
    u = window_u.data();
    u_step = 0;
  }
  if (is_warm) {  // the warm-up: the groups' own statistics
    u = stats.data();
    u_step = KC;
  }
  if (vanilla) ema_update(running_g.data_ptr<float>(), mean.data(), C, alpha, first);
  ema_update(running_psi.data_ptr<float>(), mean.data() + (K - 1) * C, C, alpha, first);
  num_backward_tracked.add_(1);

  // Eq. 20: dL/dx = dout * (a inv) + x * (-Psi_u inv^2) + (Psi_u inv^2 shift - g_u inv), one row
  // of coefficients per sample (its group's).
  const bool has_const = sh != nullptr || vanilla;
  auto a_rows = torch::empty({n, C}, f32), b_rows = torch::empty({n, C}, f32);
  auto k_rows = has_const ? torch::empty({n, C}, f32) : undefined();
  float* ar = a_rows.data_ptr<float>();
  float* br = b_rows.data_ptr<float>();
  float* kr = has_const ? k_rows.data_ptr<float>() : nullptr;
  const int64_t per_group = n / G;
  for (int64_t g = 0; g < G; ++g) {
    const float* g_u = u + g * u_step;
    const float* psi_u = g_u + (K - 1) * C;
    const int64_t row = g * per_group * C;  // the group's first sample
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = g * C + c;
      const float coef_x = -psi_u[c] * inv[i] * inv[i];
      ar[row + c] = ap[i] * inv[i];
      br[row + c] = coef_x;
      if (kr) kr[row + c] = (sh ? -coef_x * sh[i] : 0.0f) - (vanilla ? g_u[c] * inv[i] : 0.0f);
    }
  }
  repeat_group_rows({ar, br, kr}, G, per_group, C);
  auto psi0 = torch::empty({C}, f32);
  auto g0 = vanilla ? torch::empty({C}, f32) : undefined();
  std::copy(u + (K - 1) * C, u + KC, psi0.data_ptr<float>());  // group 0's
  if (vanilla) std::copy(u, u + C, g0.data_ptr<float>());
  return BackwardStatistics{a_rows, b_rows, k_rows, sum_dout_y, sum_dout, g0, psi0};
}
