// rnn_steps_forward / rnn_steps_backward: one layer and direction of an RNN, LSTM or GRU, step by step,
// for the exact rule's per-sample gate gradients (mas_kernels/estimators/rules/rnn_native.py).
//
// The input projection zi = x W_ih^T + b (N, T, G*H) is one GEMM over every
// step, done by the caller; only the recurrence runs here, per step one GEMM
// with W_hh (at::addmm_out / at::mm_out, single call each) and fused
// elementwise loops. Forward saves what the backward reads (activated gates,
// tanh(c) and c for LSTM; r, z, n and W_hn h + b_hn for GRU; h for RNN);
// backward through time gives dzi (N, T, G*H), the gradient w.r.t. the
// pre-activations of the gates' input part, and the gradients w.r.t. the
// initial state. The recurrent part's gradient dzh equals dzi (the gates add
// zi + zh) except GRU's n gate, dzh_n = dzi_n * r (the caller forms it).
//
// Gate orders as torch's: LSTM i, f, g, o; GRU r, z, n. Transcendentals go
// through ATen's vectorized sigmoid/tanh, once per step over the whole gate
// block (LSTM: tanh(g) = 2 sigmoid(2 g) - 1, the g rows arrive pre-scaled by 2).
#include "ops.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <string>
#include <tuple>

namespace mas_kernels {

namespace {

enum class Mode { kTanh, kRelu, kLstm, kGru };

Mode parse_mode(const std::string& mode) {
  if (mode == "RNN_TANH") return Mode::kTanh;
  if (mode == "RNN_RELU") return Mode::kRelu;
  if (mode == "LSTM") return Mode::kLstm;
  if (mode == "GRU") return Mode::kGru;
  TORCH_CHECK(false, "mas_kernels rnn_steps: unknown mode ", mode);
}

int64_t gates_of(Mode m) { return m == Mode::kLstm ? 4 : m == Mode::kGru ? 3 : 1; }

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "mas_kernels rnn_steps: ",
              name, " must be a contiguous float32 CPU tensor");
}

}  // namespace

// zi (N, T, G*H) with every bias in it but GRU's b_hn (LSTM: the g columns times 2); w_hh (G*H, H) (LSTM: the g
// rows times 2); b_hh (G*H) for GRU, else empty; h0, c0 (N, H) (c0 empty but for LSTM).
// Returns (h (N, T, H), saved (N, T, S*H), c (N, T, H) or empty): saved holds LSTM i, f, g, o (activated) and
// tanh(c); GRU r, z, n, W_hn h + b_hn; nothing for RNN.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_steps_forward(const std::string& mode_name, const at::Tensor& zi,
                                                                 const at::Tensor& w_hh, const at::Tensor& b_hh,
                                                                 const at::Tensor& h0, const at::Tensor& c0,
                                                                 bool reverse) {
  const Mode mode = parse_mode(mode_name);
  check_f32(zi, "zi");
  check_f32(w_hh, "w_hh");
  check_f32(h0, "h0");
  const int64_t N = zi.size(0), T = zi.size(1), GH = zi.size(2), H = h0.size(1), G = gates_of(mode);
  TORCH_CHECK(GH == G * H && w_hh.size(0) == GH && w_hh.size(1) == H && h0.size(0) == N,
              "mas_kernels rnn_steps_forward: shapes do not match: zi ", zi.sizes(), ", w_hh ", w_hh.sizes(), ", h0 ",
              h0.sizes());
  if (mode == Mode::kLstm) check_f32(c0, "c0");
  if (mode == Mode::kGru) check_f32(b_hh, "b_hh");
  const auto opts = zi.options();
  at::Tensor h_seq = at::empty({N, T, H}, opts);
  const int64_t S = mode == Mode::kLstm ? 5 : mode == Mode::kGru ? 4 : 0;
  at::Tensor saved = at::empty({N, T, S * H}, opts);
  at::Tensor c_seq = mode == Mode::kLstm ? at::empty({N, T, H}, opts) : at::Tensor();
  at::Tensor gates = at::empty({N, GH}, opts);
  at::Tensor act = at::empty({N, mode == Mode::kGru ? 2 * H : GH}, opts);
  at::Tensor tc = at::empty({N, H}, opts);
  const at::Tensor w_t = w_hh.t();
  const float* const pzi = zi.const_data_ptr<float>();
  float* const ph = h_seq.data_ptr<float>();
  float* const ps = saved.data_ptr<float>();
  float* const pc = mode == Mode::kLstm ? c_seq.data_ptr<float>() : nullptr;
  float* const pg = gates.data_ptr<float>();
  float* const pa = act.data_ptr<float>();
  float* const ptc = tc.data_ptr<float>();
  at::Tensor h_prev = h0, c_prev = c0;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? T - 1 - step : step;
    // Recurrent product: LSTM/RNN the whole pre-activation zi + h W_hh^T; GRU zh = h W_hh^T + b_hh apart.
    if (mode == Mode::kGru) {
      at::addmm_out(gates, b_hh, h_prev, w_t);
    } else {
      at::mm_out(gates, h_prev, w_t);
    }
    const at::Tensor h_now = h_seq.select(1, t);
    float* const hn = ph + t * H;  // row k at hn + k * T * H
    const float* const hp = h_prev.const_data_ptr<float>();
    const int64_t hp_stride = h_prev.stride(0);
    if (mode == Mode::kTanh || mode == Mode::kRelu) {
      for (int64_t k = 0; k < N; ++k) {
        const float* z = pzi + (k * T + t) * GH;
        float* g = pg + k * GH;
        for (int64_t j = 0; j < H; ++j) g[j] += z[j];
      }
      if (mode == Mode::kTanh) {
        at::tanh_(gates);
      } else {
        gates.clamp_min_(0.0);
      }
      for (int64_t k = 0; k < N; ++k) std::copy(pg + k * H, pg + (k + 1) * H, hn + k * T * H);
    } else if (mode == Mode::kLstm) {
      for (int64_t k = 0; k < N; ++k) {
        const float* z = pzi + (k * T + t) * GH;
        float* g = pg + k * GH;
        for (int64_t j = 0; j < GH; ++j) g[j] += z[j];
      }
      at::sigmoid_out(act, gates);
      const float* const cp = c_prev.const_data_ptr<float>();
      const int64_t cp_stride = c_prev.stride(0);
      float* const cn = pc + t * H;
      for (int64_t k = 0; k < N; ++k) {
        float* a = pa + k * GH;
        float* cnk = cn + k * T * H;
        const float* cpk = cp + k * cp_stride;
        for (int64_t j = 0; j < H; ++j) {
          const float gg = 2.0f * a[2 * H + j] - 1.0f;  // tanh of the unscaled g
          a[2 * H + j] = gg;
          cnk[j] = a[H + j] * cpk[j] + a[j] * gg;
        }
      }
      const at::Tensor c_now = c_seq.select(1, t);
      at::tanh_out(tc, c_now);
      for (int64_t k = 0; k < N; ++k) {
        const float* a = pa + k * GH;
        const float* tck = ptc + k * H;
        float* hnk = hn + k * T * H;
        float* sk = ps + (k * T + t) * 5 * H;
        std::copy(a, a + GH, sk);
        std::copy(tck, tck + H, sk + GH);
        for (int64_t j = 0; j < H; ++j) hnk[j] = a[3 * H + j] * tck[j];
      }
      c_prev = c_now;
    } else {  // GRU
      for (int64_t k = 0; k < N; ++k) {
        const float* z = pzi + (k * T + t) * GH;
        const float* g = pg + k * GH;
        float* a = pa + k * 2 * H;
        for (int64_t j = 0; j < 2 * H; ++j) a[j] = z[j] + g[j];
      }
      at::sigmoid_(act);  // r, z
      for (int64_t k = 0; k < N; ++k) {
        const float* z = pzi + (k * T + t) * GH;
        const float* g = pg + k * GH;
        const float* a = pa + k * 2 * H;
        float* n = ptc + k * H;
        for (int64_t j = 0; j < H; ++j) n[j] = z[2 * H + j] + a[j] * g[2 * H + j];
      }
      at::tanh_(tc);  // n
      for (int64_t k = 0; k < N; ++k) {
        const float* g = pg + k * GH;
        const float* a = pa + k * 2 * H;
        const float* n = ptc + k * H;
        const float* hpk = hp + k * hp_stride;
        float* hnk = hn + k * T * H;
        float* sk = ps + (k * T + t) * 4 * H;
        std::copy(a, a + 2 * H, sk);
        std::copy(n, n + H, sk + 2 * H);
        std::copy(g + 2 * H, g + 3 * H, sk + 3 * H);
        for (int64_t j = 0; j < H; ++j) hnk[j] = (1.0f - a[H + j]) * n[j] + a[H + j] * hpk[j];
      }
    }
    h_prev = h_now;
  }
  if (mode == Mode::kTanh || mode == Mode::kRelu) saved = at::Tensor();
  return {h_seq, saved, c_seq};
}

// Backward through time of one layer and direction. dh_seq (N, T, H): the loss gradient w.r.t. each step's
// output h_t from outside the recurrence; dh_n, dc_n (N, H) w.r.t. the final state (dc_n empty but for LSTM).
// w_hh as given to the forward (LSTM g rows times 2). Returns (dzi (N, T, G*H) w.r.t. the unscaled
// pre-activations, dh0, dc0 or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_steps_backward(
    const std::string& mode_name, const at::Tensor& h_seq, const at::Tensor& saved, const at::Tensor& c_seq,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& dh_seq,
    const at::Tensor& dh_n, const at::Tensor& dc_n, bool reverse) {
  const Mode mode = parse_mode(mode_name);
  check_f32(h_seq, "h_seq");
  check_f32(dh_seq, "dh_seq");
  check_f32(dh_n, "dh_n");
  check_f32(h0, "h0");
  check_f32(w_hh, "w_hh");
  const int64_t N = h_seq.size(0), T = h_seq.size(1), H = h_seq.size(2), G = gates_of(mode), GH = G * H;
  TORCH_CHECK(dh_seq.sizes() == h_seq.sizes() && dh_n.size(0) == N && dh_n.size(1) == H && w_hh.size(0) == GH,
              "mas_kernels rnn_steps_backward: shapes do not match");
  if (mode == Mode::kLstm) {
    check_f32(c_seq, "c_seq");
    check_f32(c0, "c0");
    check_f32(dc_n, "dc_n");
  }
  if (mode == Mode::kLstm || mode == Mode::kGru) check_f32(saved, "saved");
  const auto opts = h_seq.options();
  at::Tensor dzi = at::empty({N, T, GH}, opts);
  at::Tensor dz = at::empty({N, GH}, opts);  // this step's dzh (LSTM: for the g rows scaled by 2)
  at::Tensor dh = dh_n.clone();
  at::Tensor dc = mode == Mode::kLstm ? dc_n.clone() : at::Tensor();
  at::Tensor dh_rec = at::empty({N, H}, opts);
  const float* const ph = h_seq.const_data_ptr<float>();
  const float* const ps = saved.defined() ? saved.const_data_ptr<float>() : nullptr;
  const float* const pc = mode == Mode::kLstm ? c_seq.const_data_ptr<float>() : nullptr;
  const float* const pdh_seq = dh_seq.const_data_ptr<float>();
  float* const pdzi = dzi.data_ptr<float>();
  float* const pdz = dz.data_ptr<float>();
  float* const pdh = dh.data_ptr<float>();
  float* const pdc = mode == Mode::kLstm ? dc.data_ptr<float>() : nullptr;
  const float* const ph0 = h0.const_data_ptr<float>();
  const float* const pc0 = mode == Mode::kLstm ? c0.const_data_ptr<float>() : nullptr;
  for (int64_t step = T - 1; step >= 0; --step) {
    const int64_t t = reverse ? T - 1 - step : step;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step that ran before t (none at step 0)
    for (int64_t k = 0; k < N; ++k) {
      float* dhk = pdh + k * H;
      const float* ext = pdh_seq + (k * T + t) * H;
      for (int64_t j = 0; j < H; ++j) dhk[j] += ext[j];
      const float* hk = ph + (k * T + t) * H;
      const float* hpk = step == 0 ? ph0 + k * H : ph + (k * T + t_prev) * H;
      float* dzik = pdzi + (k * T + t) * GH;
      float* dzk = pdz + k * GH;
      if (mode == Mode::kTanh) {
        for (int64_t j = 0; j < H; ++j) dzk[j] = dzik[j] = dhk[j] * (1.0f - hk[j] * hk[j]);
      } else if (mode == Mode::kRelu) {
        for (int64_t j = 0; j < H; ++j) dzk[j] = dzik[j] = hk[j] > 0.0f ? dhk[j] : 0.0f;
      } else if (mode == Mode::kLstm) {
        const float* sk = ps + (k * T + t) * 5 * H;
        const float *i = sk, *f = sk + H, *g = sk + 2 * H, *o = sk + 3 * H, *tc = sk + 4 * H;
        const float* cpk = step == 0 ? pc0 + k * H : pc + (k * T + t_prev) * H;
        float* dck = pdc + k * H;
        for (int64_t j = 0; j < H; ++j) {
          const float dcj = dck[j] + dhk[j] * o[j] * (1.0f - tc[j] * tc[j]);
          const float di = dcj * g[j] * i[j] * (1.0f - i[j]);
          const float df = dcj * cpk[j] * f[j] * (1.0f - f[j]);
          const float dg = dcj * i[j] * (1.0f - g[j] * g[j]);
          const float dO = dhk[j] * tc[j] * o[j] * (1.0f - o[j]);
          dzik[j] = di;
          dzik[H + j] = df;
          dzik[2 * H + j] = dg;
          dzik[3 * H + j] = dO;
          dzk[j] = di;
          dzk[H + j] = df;
          dzk[2 * H + j] = 0.5f * dg;  // w.r.t. the doubled g rows of w_hh
          dzk[3 * H + j] = dO;
          dck[j] = dcj * f[j];
        }
      } else {  // GRU
        const float* sk = ps + (k * T + t) * 4 * H;
        const float *r = sk, *z = sk + H, *n = sk + 2 * H, *zhn = sk + 3 * H;
        for (int64_t j = 0; j < H; ++j) {
          const float dn = dhk[j] * (1.0f - z[j]) * (1.0f - n[j] * n[j]);
          const float dzg = dhk[j] * (hpk[j] - n[j]) * z[j] * (1.0f - z[j]);
          const float dr = dn * zhn[j] * r[j] * (1.0f - r[j]);
          dzik[j] = dr;
          dzik[H + j] = dzg;
          dzik[2 * H + j] = dn;
          dzk[j] = dr;
          dzk[H + j] = dzg;
          dzk[2 * H + j] = dn * r[j];
          dhk[j] *= z[j];  // the direct path h_prev -> h
        }
      }
      if (mode != Mode::kGru) std::fill(dhk, dhk + H, 0.0f);
    }
    at::mm_out(dh_rec, dz, w_hh);
    const float* const prec = dh_rec.const_data_ptr<float>();
    for (int64_t e = 0; e < N * H; ++e) pdh[e] += prec[e];
  }
  return {dzi, dh, dc};
}

}  // namespace mas_kernels
