// Python bindings of mas_kernels._C. The GIL is released while a kernel runs.
// torch/csrc/utils/pybind.h (the Tensor and list casters), not the much
// heavier torch/extension.h.
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include "guard.h"
#include "ops.h"

#include <optional>
#include <string>
#include <vector>

namespace mas_kernels {
// dispatch.cpp: the C++ kernels on (and off) the dispatcher's CPU key.
void register_cpu_kernels();
void unregister_cpu_kernels();
}  // namespace mas_kernels

namespace {

// The torch release this module was compiled against ("2.13.0"); the loader
// refuses a module built for another release, whose ABI may differ.
std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "mas_kernels native CPU kernels: fused single-pass loops over many tensors (OpenMP)";
  m.def("abs_outer_accumulate_", &mas_kernels::abs_outer_accumulate_, py::arg("omega"), py::arg("a"), py::arg("b"),
        py::arg("alpha"), py::call_guard<py::gil_scoped_release>(),
        "omega += alpha * |a|^T @ |b| (fp32 accumulate), in place");
  m.def("abs_accumulate_", &mas_kernels::abs_accumulate_, py::arg("omegas"), py::arg("tensors"), py::arg("alpha"),
        py::call_guard<py::gil_scoped_release>(), "omega_i += alpha * |t_i| for every i, in place");
  m.def("penalty_grad_", &mas_kernels::penalty_grad_, py::arg("params"), py::arg("anchors"), py::arg("omegas"),
        py::arg("lam"), py::arg("grads"), py::call_guard<py::gil_scoped_release>(),
        "returns lam * sum_i sum omega_i (p_i - a_i)^2 (0-dim fp32); grads[i] += 2 lam omega_i (p_i - a_i)");
  m.def("abs_bmm_accumulate_", &mas_kernels::abs_bmm_accumulate_, py::arg("omega"), py::arg("a"), py::arg("b"),
        py::arg("alpha"), py::arg("memory_budget"), py::call_guard<py::gil_scoped_release>(),
        "omega += alpha * sum_s |a_s^T @ b_s| (fp32 accumulate), in place");
  m.def("abs_bmm_bmm_chunk", &mas_kernels::abs_bmm_bmm_chunk, py::arg("S"), py::arg("T"), py::arg("J"), py::arg("I"),
        py::arg("memory_budget"), "samples per chunked-bmm chunk abs_bmm_accumulate_ uses, 0 for its register tiles");
  m.def("conv_weight_abs_sum_", &mas_kernels::conv_weight_abs_sum_, py::arg("omega"), py::arg("x"), py::arg("delta"),
        py::arg("kernel"), py::arg("stride"), py::arg("dilation"), py::arg("padding"), py::arg("groups"), py::arg("alpha"),
        py::arg("memory_budget"), py::call_guard<py::gil_scoped_release>(),
        "omega += alpha * sum_k |g_k| for a convolution's per-sample weight gradients g_k (fp32, zero padding)");
  m.def("channel_sums", &mas_kernels::channel_sums, py::arg("x"), py::arg("d"), py::arg("mean"),
        py::call_guard<py::gil_scoped_release>(),
        "(N, C, 2): sum_l d * (x - mean_c) and sum_l d per sample and channel of (N, C, L) tensors");
  m.def("rnn_steps_forward", &mas_kernels::rnn_steps_forward, py::arg("mode"), py::arg("zi"), py::arg("w_hh"),
        py::arg("b_hh"), py::arg("h0"), py::arg("c0"), py::arg("reverse"), py::call_guard<py::gil_scoped_release>(),
        "one RNN/LSTM/GRU layer and direction step by step from its input projection: (h, saved, c)");
  m.def("rnn_steps_backward", &mas_kernels::rnn_steps_backward, py::arg("mode"), py::arg("h_seq"), py::arg("saved"),
        py::arg("c_seq"), py::arg("h0"), py::arg("c0"), py::arg("w_hh"), py::arg("dh_seq"), py::arg("dh_n"),
        py::arg("dc_n"), py::arg("reverse"), py::call_guard<py::gil_scoped_release>(),
        "backward through time of rnn_steps_forward: (dzi, dh0, dc0)");
  m.def("layer_norm_sums", &mas_kernels::layer_norm_sums, py::arg("x"), py::arg("d"), py::arg("eps"), py::arg("rms"),
        py::call_guard<py::gil_scoped_release>(),
        "(N, 2, D): per sample, sum_t d * x_hat and sum_t d of a LayerNorm's (RMSNorm's) (N, T, D) input and gradient");
  m.def("abs_position_sums_", &mas_kernels::abs_position_sums_, py::arg("acc"), py::arg("d"),
        py::call_guard<py::gil_scoped_release>(), "acc (D) += sum_s |sum_t d[s, t]| for d (S, T, D), in place");
  m.def("embedding_abs_rows_", &mas_kernels::embedding_abs_rows_, py::arg("acc"), py::arg("ids"), py::arg("d"),
        py::arg("padding_idx"), py::call_guard<py::gil_scoped_release>(),
        "acc (V, D) row v += |sum_{t: ids[s, t] = v} d[s, t]| per sample s and distinct id v, in place");
  m.def("layer_norm_abs_sums_", &mas_kernels::layer_norm_abs_sums_, py::arg("acc_w"), py::arg("acc_b"), py::arg("x"),
        py::arg("d"), py::arg("eps"), py::arg("rms"), py::call_guard<py::gil_scoped_release>(),
        "acc_w += sum_s |sum_t d * x_hat|, acc_b += sum_s |sum_t d| of a LayerNorm's (RMSNorm's) (N, T, D) input and "
        "gradient, in place");
  m.def("linear_abs_sums_", &mas_kernels::linear_abs_sums_, py::arg("accs_w"), py::arg("accs_b"), py::arg("deltas"),
        py::arg("xs"), py::arg("transposed"), py::arg("memory_budget"), py::call_guard<py::gil_scoped_release>(),
        "per layer i: accs_w[i] += sum_s |deltas[i]_s^T xs[i]_s| (transposed: |xs^T deltas|), accs_b[i] += "
        "sum_s |sum_t deltas[i]_s|, in place");
  m.def("channel_abs_sums_", &mas_kernels::channel_abs_sums_, py::arg("acc_w"), py::arg("acc_b"), py::arg("x"),
        py::arg("d"), py::arg("running_mean"), py::arg("running_var"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>(),
        "acc_w[c] += sum_s |sum_l d (x - mean_c)| / sqrt(var_c + eps), acc_b[c] += sum_s |sum_l d| of a BatchNorm's "
        "(N, C, *) input and gradient (running statistics), in place");
  m.def("register_cpu_kernels", &mas_kernels::register_cpu_kernels,
        "make the C++ kernels the CPU kernels of the mas_kernels:: ops (mas_kernels._backend calls it)");
  m.def("unregister_cpu_kernels", &mas_kernels::unregister_cpu_kernels,
        "take the C++ kernels off the ops' CPU key again");
  m.def("torch_version", &torch_version, "the torch release this module was built against");
  // The guards, for the Python kernels' guard (ops/*.py guard()): the checks the native kernels make.
  m.def("guard_penalty", [](const std::string& op, const std::vector<at::Tensor>& params,
                            const std::vector<at::Tensor>& anchors, const std::vector<at::Tensor>& omegas, double lam,
                            const std::optional<std::vector<at::Tensor>>& grads) {
    mas_kernels::guard_penalty(op.c_str(), params, anchors, omegas, lam, grads ? &*grads : nullptr);
  }, py::arg("op"), py::arg("params"), py::arg("anchors"), py::arg("omegas"), py::arg("lam"), py::arg("grads"),
        py::call_guard<py::gil_scoped_release>(), "the guard of penalty_grad_ (grads given) or penalty (None)");
  m.def("guard_abs_accumulate", &mas_kernels::guard_abs_accumulate, py::arg("omegas"), py::arg("tensors"),
        py::arg("alpha"), py::call_guard<py::gil_scoped_release>(), "the guard of abs_accumulate_");
  m.def("guard_abs_outer", &mas_kernels::guard_abs_outer, py::arg("omega"), py::arg("a"), py::arg("b"),
        py::arg("alpha"), py::call_guard<py::gil_scoped_release>(), "the guard of abs_outer_accumulate_");
  m.def("guard_abs_bmm", &mas_kernels::guard_abs_bmm, py::arg("omega"), py::arg("a"), py::arg("b"), py::arg("alpha"),
        py::arg("memory_budget"), py::call_guard<py::gil_scoped_release>(), "the guard of abs_bmm_accumulate_");
  m.def("check_no_overlap", &mas_kernels::check_no_overlap_py, py::arg("op"), py::arg("out_arg"), py::arg("outs"),
        py::arg("in_args"), py::arg("ins"), py::arg("elementwise"), py::arg("indexed"),
        py::call_guard<py::gil_scoped_release>(),
        "ValueError naming them unless no output shares memory with an input or another output (ops/_checks.py)");
  m.def("overlaps_itself", &mas_kernels::overlaps_itself, py::arg("t"),
        "whether two elements of t share memory (exact; ops/_checks.py)");
  m.def("min_memory_budget", []() { return mas_kernels::kMinMemoryBudget; },
        "the smallest memory_budget the guard of abs_bmm_accumulate_ accepts (bytes)");
  m.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "whether the kernels were compiled with OpenMP");
}
