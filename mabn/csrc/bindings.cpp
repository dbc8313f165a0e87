// The Python module of mabn's C++ extension (built and loaded by mabn/kernels.py): the kernels of
// norm_kernels.cpp, the statistics of norm_statistics.cpp, the layer of norm_layer.cpp, and the
// argument structs of norm_types.h (keyword constructors, readable fields).

#include <torch/extension.h>

#include "norm_kernels.h"
#include "norm_layer.h"
#include "norm_statistics.h"
#include "norm_types.h"

namespace py = pybind11;

namespace {

// The results' fields are read as copies (a tensor handle, a Normalization), never as references
// into the result: a reference keeps the whole result alive as long as the field's Python object,
// and a result that holds the layer's output, kept alive by the output's own autograd context,
// would never be freed.
void bind_types(py::module_& m) {
  py::class_<LayerOptions>(m, "LayerOptions", "a layer's options (mabn.options.NormOptions)")
      .def(py::init([](bool vanilla, std::string fp_stats, std::string bp_stats, bool ema_first,
                       int64_t warmup_iters, int64_t renorm_warmup_iters, double r_max, double d_max, double eps,
                       double alpha, double cancellation_ratio) {
             return LayerOptions{vanilla, std::move(fp_stats), std::move(bp_stats), ema_first, warmup_iters,
                                 renorm_warmup_iters, r_max, d_max, eps, alpha, cancellation_ratio};
           }),
           py::kw_only(), py::arg("vanilla"), py::arg("fp_stats"), py::arg("bp_stats"), py::arg("ema_first"),
           py::arg("warmup_iters"), py::arg("renorm_warmup_iters"), py::arg("r_max"), py::arg("d_max"),
           py::arg("eps"), py::arg("alpha"), py::arg("cancellation_ratio"))
      .def_readonly("vanilla", &LayerOptions::vanilla)
      .def_readonly("fp_stats", &LayerOptions::fp_stats)
      .def_readonly("bp_stats", &LayerOptions::bp_stats)
      .def_readonly("alpha", &LayerOptions::alpha);
  py::class_<ForwardBuffers>(m, "ForwardBuffers", "the buffers a training forward updates")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>(),
           py::arg("fp_window"), py::arg("fp_window_valid"), py::arg("running_mean"), py::arg("running_var"),
           py::arg("num_batches_tracked"));
  py::class_<BackwardBuffers>(m, "BackwardBuffers", "the buffers a backward updates")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>(),
           py::arg("bp_window"), py::arg("bp_window_valid"), py::arg("running_g"), py::arg("running_psi"),
           py::arg("num_backward_tracked"));
  py::class_<ForwardStatistics>(m, "ForwardStatistics", "forward_statistics' results (None: undefined)")
      .def_property_readonly("s0", [](const ForwardStatistics& s) { return s.s0; })
      .def_property_readonly("inv_std", [](const ForwardStatistics& s) { return s.inv_std; })
      .def_property_readonly("shift", [](const ForwardStatistics& s) { return s.shift; })
      .def_property_readonly("r", [](const ForwardStatistics& s) { return s.r; })
      .def_property_readonly("d", [](const ForwardStatistics& s) { return s.d; })
      .def_property_readonly("warm", [](const ForwardStatistics& s) { return s.warm; });
  py::class_<Normalization>(m, "Normalization", "what a training forward hands its backward")
      .def_property_readonly("inv_std", [](const Normalization& s) { return s.inv_std; })
      .def_property_readonly("shift", [](const Normalization& s) { return s.shift; })
      .def_property_readonly("r", [](const Normalization& s) { return s.r; })
      .def_property_readonly("d", [](const Normalization& s) { return s.d; })
      .def_property_readonly("warm", [](const Normalization& s) { return s.warm; })
      .def_property_readonly("centred", [](const Normalization& s) { return s.centred; });
  py::class_<TrainForward>(m, "TrainForward", "train_forward's results")
      .def_property_readonly("out", [](const TrainForward& s) { return s.out; })
      .def_property_readonly("norm", [](const TrainForward& s) { return s.norm; })
      .def_property_readonly("s0", [](const TrainForward& s) { return s.s0; });
  py::class_<TrainBackward>(m, "TrainBackward", "train_backward's results")
      .def_property_readonly("dx", [](const TrainBackward& s) { return s.dx; })
      .def_property_readonly("grad_weight", [](const TrainBackward& s) { return s.grad_weight; })
      .def_property_readonly("grad_bias", [](const TrainBackward& s) { return s.grad_bias; })
      .def_property_readonly("g0", [](const TrainBackward& s) { return s.g0; })
      .def_property_readonly("psi0", [](const TrainBackward& s) { return s.psi0; });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_types(m);
  m.def("column_dot_sums", &column_dot_sums, "per-(group, channel) sum(d), sum(d*x) of (G, L, C) rows");
  m.def("row_dot_sums", &row_dot_sums, "per-row sum(d), sum(d*x) of (R, Q) rows");
  m.def("multiply_adds", &multiply_adds, "d * a + x * b + k with per-(sample, channel) coefficients");
  m.def("scale_shift", &scale_shift, "x * scale + offset with per-(sample, channel) coefficients");
  m.def("forward_statistics", &forward_statistics, "mabn.functional.forward_statistics in C++",
        py::arg("batch"), py::arg("count"), py::arg("buffers"), py::arg("options"));
  m.def("train_forward", &train_forward, "a layer's training forward (norm_layer.cpp)", py::arg("x"),
        py::arg("groups"), py::arg("weight"), py::arg("bias"), py::arg("buffers"), py::arg("options"),
        py::arg("stream"));
  m.def("train_backward", &train_backward, "its backward (norm_layer.cpp)", py::arg("dout"), py::arg("x"),
        py::arg("weight"), py::arg("norm"), py::arg("buffers"), py::arg("options"), py::arg("stream"));
}
