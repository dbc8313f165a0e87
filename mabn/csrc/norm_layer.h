// Declarations of norm_layer.cpp's functions, bound to Python in norm_kernels.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

// One training forward of a batch-statistics layer (mabn.norm._NativeNormalize.forward).
// Returns ({out, inv_std, shift, r, d, warm, s0}, centred); undefined tensors for Python's None.
// `stream`: write the output with streaming stores (mabn.kernels.stream; its rows permitting).
std::tuple<std::vector<torch::Tensor>, bool> train_forward(
    torch::Tensor x, int64_t groups, torch::Tensor weight, torch::Tensor bias, torch::Tensor fp_window,
    torch::Tensor fp_window_valid, torch::Tensor running_mean, torch::Tensor running_var,
    torch::Tensor num_batches_tracked, bool vanilla, const std::string& fp_stats, const std::string& bp_stats,
    bool ema_first, int64_t warmup_iters, int64_t renorm_warmup_iters, double r_max, double d_max, double eps,
    double alpha, double cancellation_ratio, bool stream);

// Its backward (mabn.norm._NativeNormalize.backward). Returns {dx, grad_weight, grad_bias, g0, psi0};
// `stream` as above, for dx.
std::vector<torch::Tensor> train_backward(
    torch::Tensor dout, torch::Tensor x, torch::Tensor weight, torch::Tensor inv_std,
    std::optional<torch::Tensor> shift, std::optional<torch::Tensor> r, std::optional<torch::Tensor> d,
    std::optional<torch::Tensor> warm, bool centred, torch::Tensor bp_window, torch::Tensor bp_window_valid,
    torch::Tensor running_g, torch::Tensor running_psi, torch::Tensor num_backward_tracked, bool vanilla,
    const std::string& bp_stats, bool ema_first, double alpha, bool stream);
