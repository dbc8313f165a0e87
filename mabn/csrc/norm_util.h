// Small helpers shared by norm_statistics.cpp and norm_layer.cpp.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

// A contiguous float32 CPU tensor of exactly `shape`, or an error naming `name`.
inline void check_float(const torch::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
              "mabn: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "mabn: ", name, " must have shape ",
              at::IntArrayRef(shape), ", got ", t.sizes());
}

// (N, C) per-sample rows whose first row of every group of `per_group` consecutive samples is
// filled: copies it to the group's other rows, in each of `rows`.
inline void repeat_group_rows(std::initializer_list<float*> rows, int64_t groups, int64_t per_group, int64_t C) {
  for (float* t : rows) {
    if (t == nullptr) continue;
    for (int64_t g = 0; g < groups; ++g) {
      const float* first = t + g * per_group * C;
      for (int64_t s = 1; s < per_group; ++s) std::copy(first, first + C, t + (g * per_group + s) * C);
    }
  }
}
