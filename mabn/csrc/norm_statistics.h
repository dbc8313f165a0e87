// Declarations of norm_statistics.cpp's functions (the C++ twins of mabn.functional's
// forward_statistics and backward_statistics).
#pragma once

#include <torch/extension.h>

#include "norm_types.h"

// forward_statistics: the statistics of one training forward from the groups' batch statistics
// `batch` (G, K, C); updates the buffers (after use).
ForwardStatistics forward_statistics(const torch::Tensor& batch, int64_t count, const ForwardBuffers& buffers,
                                     const LayerOptions& options);

// backward_statistics: from the groups' float64 reductions s_dout, s_dout_x (G, C), with a = weight * r
// (G, C), for n samples; updates the buffers (after use).
BackwardStatistics backward_statistics(const torch::Tensor& s_dout, const torch::Tensor& s_dout_x,
                                       const Normalization& norm, torch::Tensor a, int64_t count, int64_t n,
                                       const BackwardBuffers& buffers, const LayerOptions& options);
