// float64 calls of the native kernels: the ops' PyTorch definitions, written
// with ATen ops (mas_kernels/ops/*.py, the *_torch functions), entry by entry.
//
// Why not float64 versions of the fused loops: float64 serves float64 models
// and exactness tests (results to float64 rounding), where the loops' speed
// buys little and every templated loop would double its instantiations (the
// dtype dispatch of penalty.cpp is already params x anchors x grads). The
// rule is the PyTorch path's, so every backend gives the same values: an
// entry of penalty_grad_ with a float64 tensor is computed in float64, and the
// value is float64 when any tensor of the call is; the accumulations compute
// in omega's dtype (float32 or float64).
#include "float64.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>

namespace mas_kernels {

bool any_double(std::initializer_list<const std::vector<at::Tensor>*> lists) {
  for (const auto* list : lists)
    for (const auto& t : *list)
      if (t.scalar_type() == at::kDouble) return true;
  return false;
}

at::Tensor penalty_grad_f64(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& anchors,
                            const std::vector<at::Tensor>& omegas, double lam, const std::vector<at::Tensor>& grads) {
  const bool f64 = any_double({&params, &anchors, &omegas, &grads});
  at::Tensor total = at::zeros({}, at::TensorOptions().dtype(f64 ? at::kDouble : at::kFloat));
  for (size_t i = 0; i < params.size(); ++i) {
    const bool entry_f64 = params[i].scalar_type() == at::kDouble || anchors[i].scalar_type() == at::kDouble ||
                           omegas[i].scalar_type() == at::kDouble || grads[i].scalar_type() == at::kDouble;
    const auto ct = entry_f64 ? at::kDouble : at::kFloat;
    const at::Tensor d = params[i].to(ct).sub(anchors[i].to(ct));
    const at::Tensor od = omegas[i].to(ct).mul(d);
    total.add_(od.mul(d).sum());
    grads[i].add_(od, 2.0 * lam);
  }
  return total.mul_(lam);
}

void abs_accumulate_f64(const std::vector<at::Tensor>& omegas, const std::vector<at::Tensor>& tensors, double alpha) {
  for (size_t i = 0; i < omegas.size(); ++i) omegas[i].add_(tensors[i].abs().to(omegas[i].scalar_type()), alpha);
}

void abs_outer_f64(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha) {
  const auto dt = omega.scalar_type();
  omega.addmm_(a.abs().t().to(dt), b.abs().to(dt), /*beta=*/1.0, /*alpha=*/alpha);
}

namespace {

// mas_kernels/ops/abs_bmm.py chunk_plan: (samples, positions, rows, cols) per
// chunk such that the chunk's copies of a and b, its per-sample products and
// their sum fit `budget` bytes.
struct Plan {
  int64_t s, t, j, i;
};

Plan chunk_plan(int64_t S, int64_t T, int64_t J, int64_t I, int64_t memory_budget, int64_t itemsize) {
  const int64_t budget = memory_budget / itemsize;
  const int64_t one = T * (J + I) + 2 * J * I;
  if (one <= budget) {
    return {std::min(S, std::max<int64_t>(1, (budget - J * I) / (T * (J + I) + J * I))), T, J, I};
  }
  const auto x = static_cast<int64_t>((std::sqrt(4.0 * T * T + 8.0 * budget) - 2.0 * T) / 4.0);
  if (x >= 16) {
    int64_t rows = std::min(J, x);
    const int64_t cols = std::min(I, (budget - T * rows) / (T + 2 * rows));
    rows = std::min(J, (budget - T * cols) / (T + 2 * cols));
    return {1, T, rows, cols};
  }
  const int64_t y = std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(static_cast<double>(budget / 4))));
  const int64_t rows = std::min(J, y), cols = std::min(I, y);
  return {1, std::min(T, (budget - 2 * rows * cols) / (rows + cols)), rows, cols};
}

}  // namespace

void abs_bmm_f64(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha, int64_t memory_budget) {
  const int64_t S = a.size(0), T = a.size(1), J = a.size(2), I = b.size(2);
  if (omega.numel() == 0 || S == 0 || T == 0) return;
  const auto dt = omega.scalar_type();
  const int64_t itemsize = static_cast<int64_t>(omega.element_size());
  if (T == 1) {
    // |a_s^T b_s| = |a_s|^T |b_s|: one addmm_ per chunk of samples on abs copies.
    const int64_t step = std::max<int64_t>(1, memory_budget / (itemsize * (J + I)));
    for (int64_t s0 = 0; s0 < S; s0 += step) {
      const int64_t ns = std::min(step, S - s0);
      omega.addmm_(a.select(1, 0).narrow(0, s0, ns).to(dt).abs().t(), b.select(1, 0).narrow(0, s0, ns).to(dt).abs(),
                   /*beta=*/1.0, /*alpha=*/alpha);
    }
    return;
  }
  const Plan p = chunk_plan(S, T, J, I, memory_budget, itemsize);
  for (int64_t j0 = 0; j0 < J; j0 += p.j) {
    const int64_t nj = std::min(p.j, J - j0);
    for (int64_t i0 = 0; i0 < I; i0 += p.i) {
      const int64_t ni = std::min(p.i, I - i0);
      at::Tensor out = omega.narrow(0, j0, nj).narrow(1, i0, ni);
      for (int64_t s0 = 0; s0 < S; s0 += p.s) {
        const int64_t ns = std::min(p.s, S - s0);
        at::Tensor prod;
        for (int64_t t0 = 0; t0 < T; t0 += p.t) {
          const int64_t nt = std::min(p.t, T - t0);
          const at::Tensor x = a.narrow(0, s0, ns).narrow(1, t0, nt).narrow(2, j0, nj).to(dt).transpose(1, 2);
          const at::Tensor y = b.narrow(0, s0, ns).narrow(1, t0, nt).narrow(2, i0, ni).to(dt);
          prod = prod.defined() ? prod.baddbmm_(x, y) : at::bmm(x, y);
        }
        out.add_(prod.abs_().sum(0), alpha);
      }
    }
  }
}

}  // namespace mas_kernels
