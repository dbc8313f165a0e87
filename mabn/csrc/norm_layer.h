// Declarations of norm_layer.cpp's functions: a layer's training forward and its backward.
#pragma once

#include <torch/extension.h>

#include "norm_types.h"

// One training forward of a batch-statistics layer on x (float32, contiguous or channels_last) in
// `groups` normalization groups. `stream`: write the output with streaming stores
// (mabn.kernels.stream; its rows permitting).
TrainForward train_forward(const torch::Tensor& x, int64_t groups, const torch::Tensor& weight,
                           const torch::Tensor& bias, const ForwardBuffers& buffers, const LayerOptions& options,
                           bool stream);

// Its backward (eq. 20), given the forward's normalization; `stream` as above, for dx.
TrainBackward train_backward(const torch::Tensor& dout, const torch::Tensor& x, const torch::Tensor& weight,
                             const Normalization& norm, const BackwardBuffers& buffers,
                             const LayerOptions& options, bool stream);
