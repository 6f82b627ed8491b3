r"""The exact rule's RNN/LSTM/GRU forward and backward through the native step loop (``csrc/rnn_steps.cpp``).

In the recorded pass the layer runs as one autograd function: per layer and
direction, ``zi = x W_ih^T + b`` is one GEMM over every step and the
recurrence runs natively (one GEMM with ``W_hh`` and fused elementwise loops
per step); its backward runs back through time natively, giving the main
backward the gradient w.r.t. the layer's input and initial state and
recording ``dzi`` (N, T, G*H) per layer and direction for the rule: sample
k's ``g_Wih = sum_t dzi_kt x_kt^T``, ``g_Whh = sum_t dzh_kt h_k,t-1^T`` (``dzh
= dzi`` but GRU's n gate, ``dzi_n * r``). It stands in for the Python
step-by-step replay (:class:`~mas_kernels.estimators.rules.rnn.Replay`) where
the native kernels serve the CPU and the layer and its input are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _backend, _native

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _params(module, layer: int, reverse: bool):
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    return tuple(getattr(module, f"{kind}{sfx}", None) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def serves(module, x) -> bool:
    """Whether the native step loop runs this call: a float32 layer and input on a CPU that the native kernels
    serve, no LSTM projection, at least one step."""
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() in (2, 3) and x.numel() > 0 and _backend.choose(x.device) == "native"
            and not getattr(module, "proj_size", 0)
            and all(p.dtype == torch.float32 for p in module.parameters(recurse=False)))


class _Layers:
    """Per layer and direction, the float32 weights as the step loop takes them (LSTM: g rows doubled)."""

    def __init__(self, module):
        self.mode, self.H = module.mode, module.hidden_size
        self.dirs = 2 if module.bidirectional else 1
        self.w: dict = {}
        for layer in range(module.num_layers):
            for d in range(self.dirs):
                w_ih, w_hh, b_ih, b_hh = (None if p is None else p.detach() for p in _params(module, layer, d == 1))
                bias = None
                if self.mode == "GRU":
                    bias = b_ih
                elif b_ih is not None:
                    bias = b_ih + b_hh
                w_loop = w_hh
                if self.mode == "LSTM":  # tanh(g) = 2 sigmoid(2 g) - 1: one sigmoid over every gate
                    w_loop = w_hh.clone()
                    w_loop[2 * self.H:3 * self.H] *= 2
                self.w[(layer, d)] = (w_ih, bias, w_loop.contiguous(), b_hh)


class _NativeRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rep, x, h0, c0, anchor):  # noqa: ARG004 - anchor: a graph input the backward must reach
        ctx.rep = rep
        return rep.run_forward(x, h0, c0)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        dx, dh0, dc0 = ctx.rep.run_backward(d_out, d_hn, d_cn)
        return None, dx, dh0, dc0, torch.zeros(())


class NativeReplay:
    """One call of an RNN layer through the native step loop, with the interface of the Python replay the rule
    reads: :meth:`outputs`, :meth:`targets`, :meth:`grads` and ``inputs[(layer, reverse)] = (x, h_prev, ...)``.

    ``x`` (N, T, D) batch-first and ``hx`` (the call's initial state with a batch dim, or None) as the rule's
    ``_batched`` gives them; ``unbatched``: the call's input had no batch dim.
    """

    def __init__(self, module, x, hx, unbatched: bool):
        self.module = module
        self.unbatched = unbatched
        self.dtype = x.dtype
        self.layers = _Layers(module)
        self.dzi: dict = {}
        self.inputs: dict = {}
        self._saved: dict = {}
        n, H = x.shape[0], module.hidden_size
        rows = module.num_layers * self.layers.dirs
        if hx is None:
            h0 = x.new_zeros(rows, n, H)
            c0 = x.new_zeros(rows, n, H) if module.mode == "LSTM" else None
        elif module.mode == "LSTM":
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        self.anchor = torch.zeros((), requires_grad=True)
        out = _NativeRNN.apply(self, x, h0, c0, self.anchor)
        self.output, self.h_n = out[0], out[1]
        self.c_n = out[2] if module.mode == "LSTM" else None

    # ------------------------------------------------------------------ passes
    def run_forward(self, x, h0, c0):
        lib = _native.lib()
        m, L = self.module, self.layers
        mode, H, dirs = L.mode, L.H, L.dirs
        h0, c0 = h0.detach().float(), (None if c0 is None else c0.detach().float())
        empty = x.new_empty(0)
        inp = x.detach().contiguous()
        hs_n, cs_n = [], []
        for layer in range(m.num_layers):
            seqs = []
            for d in range(dirs):
                idx = layer * dirs + d
                w_ih, bias, w_loop, b_hh = L.w[(layer, d)]
                zi = F.linear(inp, w_ih, bias)
                if mode == "LSTM":
                    zi[..., 2 * H:3 * H] *= 2
                h_first = h0[idx].contiguous()
                c_first = c0[idx].contiguous() if c0 is not None else empty
                b_loop = b_hh if (mode == "GRU" and b_hh is not None) else (
                    torch.zeros(3 * H) if mode == "GRU" else empty)
                h, saved, c = lib.rnn_steps_forward(mode, zi.contiguous(), w_loop, b_loop, h_first, c_first, d == 1)
                first = h_first.unsqueeze(1)
                prev = torch.cat([first, h[:, :-1]], 1) if d == 0 else torch.cat([h[:, 1:], first], 1)
                r = saved[..., :H] if mode == "GRU" else None
                self.inputs[(layer, d == 1)] = (inp, prev, None, None, r)
                self._saved[(layer, d)] = (h, saved, c, h_first, c_first)
                seqs.append(h)
                last = h[:, -1] if d == 0 else h[:, 0]
                hs_n.append(last)
                if mode == "LSTM":
                    cs_n.append(c[:, -1] if d == 0 else c[:, 0])
            inp = torch.cat(seqs, 2) if dirs == 2 else seqs[0]
        h_n = torch.stack(hs_n, 0)
        c_n = torch.stack(cs_n, 0) if cs_n else h_n.new_empty(0)
        return inp, h_n, c_n

    def run_backward(self, d_out, d_hn, d_cn):
        lib = _native.lib()
        m, L = self.module, self.layers
        mode, H, dirs = L.mode, L.H, L.dirs
        top = m.num_layers - 1
        h_top = self._saved[(top, 0)][0]
        n, steps = h_top.shape[:2]
        d_seq = torch.zeros(n, steps, dirs * H) if d_out is None else d_out.float()
        zeros_state = torch.zeros(n, H)
        dh0s, dc0s = [None] * (m.num_layers * dirs), [None] * (m.num_layers * dirs)
        for layer in range(top, -1, -1):
            d_inp = None
            for d in range(dirs):
                idx = layer * dirs + d
                h, saved, c, h_first, c_first = self._saved.pop((layer, d))
                w_ih, _, w_loop, _ = L.w[(layer, d)]
                dh_seq = d_seq[..., d * H:(d + 1) * H].contiguous()
                dh_n = zeros_state if d_hn is None else d_hn[idx].float().contiguous()
                dc_n = (zeros_state if d_cn is None or d_cn.numel() == 0 else d_cn[idx].float().contiguous()) \
                    if mode == "LSTM" else h.new_empty(0)
                dzi, dh0, dc0 = lib.rnn_steps_backward(mode, h, saved if saved is not None else h.new_empty(0),
                                                        c if c is not None else h.new_empty(0), h_first, c_first,
                                                        w_loop, dh_seq, dh_n, dc_n, d == 1)
                self.dzi[(layer, d == 1)] = dzi
                dh0s[idx], dc0s[idx] = dh0, (dc0 if mode == "LSTM" else None)
                part = dzi @ w_ih
                d_inp = part if d_inp is None else d_inp + part
            d_seq = d_inp
        dh0 = torch.stack(dh0s, 0)
        dc0 = torch.stack(dc0s, 0) if mode == "LSTM" else None
        return d_seq, dh0, dc0

    # ------------------------------------------------------------------ what the rule reads
    def outputs(self):
        """What the layer itself returns: ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``) in its layout."""
        return layer_outputs(self.module, self.output, self.h_n, self.c_n, self.unbatched)

    def targets(self) -> list:
        """The tensor a backward must reach for the step loop's backward (and so :attr:`dzi`) to run."""
        return [self.anchor]

    def grads(self) -> dict:
        """(layer, reverse) -> (dzi, dzh) from what the main backward recorded (zeros where it reached none)."""
        out = {}
        for key, (x, _, _, _, r) in self.inputs.items():
            dzi = self.dzi.get(key)
            if dzi is None:
                dzi = x.new_zeros(*x.shape[:2], _GATES[self.module.mode] * self.module.hidden_size)
            if r is None:
                out[key] = (dzi, dzi)
            else:
                H = r.shape[-1]
                out[key] = (dzi, torch.cat([dzi[..., :2 * H], dzi[..., 2 * H:] * r], -1))
        return out


def layer_outputs(module, output, h_n, c_n, unbatched: bool, cast=None):
    """An RNN layer's return value from a replay's ``(N, T, dirs * H)`` output and ``(layers * dirs, N, H)``
    states: ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``) in the layer's layout (and ``cast``)."""
    # contiguous, as the layer's own output is (a model may .view() it: the word_language_model example)
    out = (output if module.batch_first else output.transpose(0, 1)).contiguous()
    if unbatched:
        out = out.squeeze(0 if module.batch_first else 1)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    if cast is not None:
        out, h_n, c_n = cast(out), cast(h_n), None if c_n is None else cast(c_n)
    return (out, (h_n, c_n)) if module.mode == "LSTM" else (out, h_n)
