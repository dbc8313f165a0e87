// Declarations of norm_kernels.cpp's kernels, for the layer functions of norm_layer.cpp.
#pragma once

#include <torch/extension.h>

torch::Tensor column_dot_sums(torch::Tensor d, torch::Tensor x);
torch::Tensor row_dot_sums(torch::Tensor d, torch::Tensor x);
torch::Tensor multiply_adds(torch::Tensor d, torch::Tensor x, torch::Tensor a, torch::Tensor b,
                            torch::Tensor k, bool per_column, bool stream, torch::Tensor out);
torch::Tensor scale_shift(torch::Tensor x, torch::Tensor scale, torch::Tensor offset, bool per_column,
                          bool stream, torch::Tensor out);
