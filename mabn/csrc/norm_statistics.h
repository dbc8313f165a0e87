// Declarations of norm_statistics.cpp's functions, bound to Python in norm_kernels.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

// _forward_statistics: returns {s0, inv_std, shift, r, d, warm} (undefined tensors for Python's
// None) and updates fp_window, fp_window_valid, running_mean, running_var, num_batches_tracked.
std::vector<torch::Tensor> forward_statistics(
    torch::Tensor batch, int64_t count, torch::Tensor fp_window, torch::Tensor fp_window_valid,
    torch::Tensor running_mean, torch::Tensor running_var, torch::Tensor num_batches_tracked,
    bool vanilla, const std::string& fp_stats, const std::string& bp_stats, bool ema_first,
    int64_t warmup_iters, int64_t renorm_warmup_iters, double r_max, double d_max, double eps,
    double alpha);

// _backward_statistics: returns {a_rows, b_rows, k_rows, sum_dout_y, sum_dout, g0, psi0} and
// updates bp_window, bp_window_valid, running_g, running_psi, num_backward_tracked.
std::vector<torch::Tensor> backward_statistics(
    torch::Tensor s_dout, torch::Tensor s_dout_x, torch::Tensor inv_std, std::optional<torch::Tensor> shift,
    torch::Tensor a, int64_t count, int64_t n, std::optional<torch::Tensor> warm, bool centred,
    torch::Tensor bp_window, torch::Tensor bp_window_valid, torch::Tensor running_g, torch::Tensor running_psi,
    torch::Tensor num_backward_tracked, bool vanilla, const std::string& bp_stats, bool ema_first, double alpha);
