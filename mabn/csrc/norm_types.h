// The arguments and results of the layer's C++ entry points (norm_statistics.cpp, norm_layer.cpp),
// grouped: a layer's options, its forward and backward buffers, and what one pass hands the next.
// Bound to Python in bindings.cpp; undefined tensors stand for Python's None.
#pragma once

#include <torch/extension.h>

#include <string>

// A layer's options (mabn.options.NormOptions) and the constant of its cancellation test.
struct LayerOptions {
  bool vanilla = true;             // form "vanilla" (eq. 1) or "modified" (eq. 15)
  std::string fp_stats = "batch";  // "batch", "ema" or "sma"
  std::string bp_stats = "batch";
  bool ema_first = true;           // ema_init "first": the EMAs start at the first value
  int64_t warmup_iters = 0;
  int64_t renorm_warmup_iters = 0;
  double r_max = 5.0;
  double d_max = 5.0;
  double eps = 1e-5;
  double alpha = 0.9;               // the paper's weight of the OLD value (eq. 12)
  double cancellation_ratio = 16.0;  // mabn.functional.CANCELLATION_RATIO
};

// The buffers one training forward reads and updates in place (eq. 12, 13).
struct ForwardBuffers {
  torch::Tensor fp_window, fp_window_valid, running_mean, running_var, num_batches_tracked;
};

// The buffers one backward reads and updates in place.
struct BackwardBuffers {
  torch::Tensor bp_window, bp_window_valid, running_g, running_psi, num_backward_tracked;
};

// The forward statistics (mabn.functional.forward_statistics): the bp_stats statistic of the first
// group s0 (K, C); inv_std and shift (G, C; shift undefined for the modified form); r, d (G, C),
// undefined where 1 and 0; the warm-up flag, undefined without warm-up.
struct ForwardStatistics {
  torch::Tensor s0, inv_std, shift, r, d, warm;
};

// What a training forward hands its backward: the normalization it applied, and whether the
// vanilla statistics were computed centred (the backward then reduces dout * (x - shift)).
struct Normalization {
  torch::Tensor inv_std, shift, r, d, warm;
  bool centred = false;
};

// A training forward's results: the output, the normalization, and s0 as above.
struct TrainForward {
  torch::Tensor out;
  Normalization norm;
  torch::Tensor s0;
};

// The backward statistics and eq. 20's per-sample coefficients
// (mabn.functional.backward_statistics): dL/dx = dout * a_rows + x * b_rows + k_rows (k_rows
// undefined when 0); the affine gradient sums (G, C); g_u (undefined for the modified form) and
// Psi_u of the first group.
struct BackwardStatistics {
  torch::Tensor a_rows, b_rows, k_rows, sum_dout_y, sum_dout, g0, psi0;
};

// A backward's results.
struct TrainBackward {
  torch::Tensor dx, grad_weight, grad_bias, g0, psi0;
};
