r"""``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: every layer and direction; the exact rule replays them step by step.

Each input weight ``W_ih`` and recurrent weight ``W_hh`` acts like a Linear
at every time step: ``zi_t = W_ih x_t + b_ih``, ``zh_t = W_hh h_{t-1} + b_hh``
(the gates of all kinds come from these: LSTM ``i, f, g, o``, GRU ``r, z,
n`` with ``r * zh_n``). The rule replays a recorded call of the layer step
by step from its recorded input and initial state (fp32, the layer's own
weights), and backpropagates the recorded gradients of its outputs (the
sequence, ``h_n``, ``c_n``) through the replay to get ``dzi_t``/``dzh_t`` per
sample and step. Per sample k then ``g_Wih = sum_t dzi_kt x_kt^T``, ``g_Whh =
sum_t dzh_kt h_k,t-1^T``, ``g_bih = sum_t dzi_kt``, ``g_bhh = sum_t dzh_kt``:
one ``abs_bmm`` each (exact). Local (the Linear convention at every step):
``sum |zi_t| |x_t|^T``, ``sum |zh_t| |h_{t-1}|^T`` and the biases ``sum |z|``, with
no step loop (:func:`fused_pre_activations`: each layer through the fused
kernel, then one GEMM per weight over every step).

Not served (a worded error): LSTM ``proj_size > 0``, dropout between layers
in train mode, ``PackedSequence`` inputs.
"""

from __future__ import annotations

import torch
from torch import _VF

from ..capture import Call
from . import rnn_native
from .base import Rule, abs_outer_, cat_uses, work_dtype

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _names(layer: int, reverse: bool) -> tuple[str, str, str, str]:
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    return f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}"


class Replay:
    """One call of an RNN replayed step by step: per layer and direction, the steps' inputs and pre-activations.

    ``zi`` of a layer and direction is one GEMM over every step (the inputs are
    known up front); only ``zh`` follows the recurrence. Gradients are taken
    w.r.t. ``zi`` alone: the gates add ``zi + zh``, so ``dzh = dzi`` except
    for GRU's ``n`` gate, ``dzh_n = dzi_n * r``.
    """

    def __init__(self, module, call, inline: bool = False):
        """Build the graph from the call's inputs, detached and made to require grad; ``inline``: keep
        the inputs' own graph instead (the replay stands in for the layer's forward) and record each
        ``zi``'s gradient as the main backward passes (:attr:`dzi`)."""
        self.module = module
        self.dzi: dict = {}
        x, hx, self.unbatched = _batched(module, call)
        self.dtype = x.dtype
        self.dt = dt = _wdt(module)
        if inline:
            x = x.to(dt)
        else:
            x = x.detach().to(dt).requires_grad_()
        steps = x.shape[1]
        dirs = 2 if module.bidirectional else 1
        h0, c0 = _initial_state(module, x, hx, keep_graph=inline)
        # (layer, reverse) -> (x (N, T, in), h_prev (N, T, H), zi (N, T, GH), zh (N, T, GH), r (GRU) or None)
        self.inputs: dict = {}
        outs_h, outs_c = [], []
        inp = x
        for layer in range(module.num_layers):
            seqs = []
            for d in range(dirs):
                w_ih, w_hh, b_ih, b_hh = (getattr(module, nm, None) for nm in _names(layer, d == 1))
                w_hh = w_hh.detach().to(self.dt)
                b_hh = b_hh.detach().to(self.dt) if b_hh is not None else None
                b_in = None if b_ih is None else b_ih.detach().to(self.dt)
                # The recurrent product is never needed alone (dzh = dzi, the gates add zi + zh): b_hh
                # goes into zi and each step is one addmm. GRU's n gate multiplies zh by r: GRU keeps zh apart.
                fused = module.mode != "GRU"
                if fused and b_hh is not None:
                    b_in, b_hh = (b_hh if b_in is None else b_in + b_hh), None
                zi = torch.nn.functional.linear(inp, w_ih.detach().to(self.dt), b_in)
                if inline and not zi.requires_grad:  # inputs that need no gradient: the graph starts here
                    zi.requires_grad_()
                idx = layer * dirs + d
                h = h0[idx]
                c = c0[idx] if c0 is not None else None
                order = range(steps - 1, -1, -1) if d == 1 else range(steps)
                hs, prevs, zhs, rs = [None] * steps, [None] * steps, [None] * steps, [None] * steps
                zi_t = zi.unbind(1)  # one backward node for all steps (zi[:, t] would write a zeros-filled copy each)
                w_hh_t = w_hh.T
                for t in order:
                    prevs[t] = h
                    if fused:
                        h, c = self._fused_cell(torch.addmm(zi_t[t], h, w_hh_t), c)
                    else:
                        zh = torch.nn.functional.linear(h, w_hh, b_hh)
                        zhs[t] = zh
                        h, c, rs[t] = self._cell(zi_t[t], zh, h, c)
                    hs[t] = h
                r = torch.stack(rs, 1).detach() if module.mode == "GRU" else None
                zh_all = None if fused else torch.stack(zhs, 1)
                self.inputs[(layer, d == 1)] = (inp, torch.stack(prevs, 1), zi, zh_all, r)
                if inline and zi.requires_grad:
                    zi.register_hook(_store(self.dzi, (layer, d == 1)))
                seqs.append(torch.stack(hs, 1))
                outs_h.append(h)
                if c is not None:
                    outs_c.append(c)
            inp = torch.cat(seqs, 2) if dirs == 2 else seqs[0]
        self.output = inp  # (N, T, dirs * H)
        self.h_n = torch.stack(outs_h, 0)
        self.c_n = torch.stack(outs_c, 0) if outs_c else None

    def outputs(self):
        """What the layer itself returns: ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``) in its layout and dtype."""
        return rnn_native.layer_outputs(self.module, self.output, self.h_n, self.c_n, self.unbatched,
                                        cast=lambda t: t.to(self.dtype))

    def targets(self) -> list:
        """The tensors a backward must reach for :attr:`dzi` to be recorded."""
        return [v[2] for v in self.inputs.values() if v[2].requires_grad]

    def grads(self) -> dict:
        """(layer, reverse) -> (dzi, dzh) from what the main backward recorded."""
        out = {}
        for key, (_, _, zi, _, r) in self.inputs.items():
            dzi = self.dzi.get(key)
            dzi = torch.zeros_like(zi) if dzi is None else dzi.to(self.dt)
            out[key] = (dzi, _dzh(dzi, r))
        return out

    def _fused_cell(self, gates, c):
        """One step from the summed pre-activations (RNN, LSTM), in few ops: ``(h, c)``."""
        mode = self.module.mode
        if mode == "RNN_TANH":
            return torch.tanh(gates), None
        if mode == "RNN_RELU":
            return torch.relu(gates), None
        # chunk, not slices: its backward is one cat, where each slice's is a zero-filled full-size copy
        i, f, g, o = gates.chunk(4, 1)
        c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        return torch.sigmoid(o) * torch.tanh(c), c

    def _cell(self, zi, zh, h, c):
        mode = self.module.mode
        if mode == "RNN_TANH":
            return torch.tanh(zi + zh), None, None
        if mode == "RNN_RELU":
            return torch.relu(zi + zh), None, None
        if mode == "LSTM":
            i, f, g, o = (zi + zh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c, None
        ri, zi_, ni = zi.chunk(3, 1)
        rh, zh_, nh = zh.chunk(3, 1)
        r = torch.sigmoid(ri + rh)
        u = torch.sigmoid(zi_ + zh_)
        nn_ = torch.tanh(ni + r * nh)
        return (1 - u) * nn_ + u * h, None, r

    def backward(self, call) -> dict:
        """(layer, reverse) -> (dzi (N, T, G*H), dzh (N, T, G*H)) from the recorded output gradients."""
        module = self.module
        outs, grads = [], []
        deltas = call.deltas
        if deltas[0] is not None:
            d = deltas[0].to(self.dt)
            if self.unbatched:
                d = d.unsqueeze(0 if module.batch_first else 1)
            outs.append(self.output)
            grads.append(d if module.batch_first else d.transpose(0, 1))
        states = [self.h_n] + ([self.c_n] if self.c_n is not None else [])
        for i, st in enumerate(states):
            d = deltas[1 + i] if len(deltas) > 1 + i else None
            if d is not None:
                outs.append(st)
                grads.append(d.to(self.dt).unsqueeze(1) if self.unbatched else d.to(self.dt))
        if not outs:
            return {}
        keys = list(self.inputs)
        wrt = [self.inputs[k][2] for k in keys]
        got = torch.autograd.grad(outs, wrt, grads, allow_unused=True)
        out = {}
        for k, z, dzi in zip(keys, wrt, got):
            dzi = torch.zeros_like(z) if dzi is None else dzi
            out[k] = (dzi, _dzh(dzi, self.inputs[k][4]))
        return out


def _batched(module, call):
    """The call's input as ``(N, T, D)`` and its initial state with a batch dim: ``(x, hx, unbatched)``."""
    x = call.args[0] if call.args else call.kwargs["input"]
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0 if module.batch_first else 1)
        if hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    if not module.batch_first:
        x = x.transpose(0, 1)
    return x, hx, unbatched


def _initial_state(module, x, hx, keep_graph: bool = False):
    """``(h0, c0)`` in ``x``'s dtype, ``(layers * dirs, N, H)`` (zeros where the call gave none; ``c0`` None but for LSTM);
    ``keep_graph``: on the call's own graph (an initial state computed by upstream layers passes their
    gradient on), else detached."""
    dirs = 2 if module.bidirectional else 1
    if hx is None:
        h0 = x.new_zeros(module.num_layers * dirs, x.shape[0], module.hidden_size, dtype=x.dtype)
        return h0, (h0 if module.mode == "LSTM" else None)
    own = (lambda t: t.to(x.dtype)) if keep_graph else (lambda t: t.detach().to(x.dtype))  # noqa: E731
    if module.mode == "LSTM":
        return tuple(own(t) for t in hx)
    return own(hx), None


# The fused forward of one mode (what nn.RNNBase.forward calls): (input, hx, weights, has_biases, num_layers,
# dropout, train, bidirectional, batch_first) -> (output, h_n[, c_n]).
_FUSED = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh,
          "RNN_RELU": _VF.rnn_relu}


def fused_pre_activations(module, call) -> dict:
    """(layer, reverse) -> ``(x, h_prev, zi, zh)``, each ``(N, T, .)`` in fp32, for the local rule, with no
    step loop: a layer's output sequence is every ``h_t``, so ``h_{t-1}`` is that sequence shifted by one
    step (the initial state first; the reverse direction shifts the other way), and ``zi = W_ih x_t +
    b_ih``, ``zh = W_hh h_{t-1} + b_hh`` are one GEMM each over every step. The last layer's sequence
    is the call's recorded output; each layer below it runs alone through the fused kernel (fp32, the
    layer's own weights) to give the next layer its input."""
    x, hx, unbatched = _batched(module, call)
    dt = _wdt(module)
    last = call.outputs[0].detach()
    if unbatched:
        last = last.unsqueeze(0 if module.batch_first else 1)
    last = (last if module.batch_first else last.transpose(0, 1)).to(dt)
    inp = x.detach().to(dt).contiguous()
    h0, c0 = _initial_state(module, inp, hx)
    dirs, H = (2 if module.bidirectional else 1), module.hidden_size
    out = {}
    for layer in range(module.num_layers):
        params = [[getattr(module, nm, None) for nm in _names(layer, d == 1)] for d in range(dirs)]
        if layer == module.num_layers - 1:
            seq = last
        else:
            flat = [p.detach().to(dt) for ps in params for p in ps if p is not None]
            rows = slice(layer * dirs, (layer + 1) * dirs)
            state = (h0[rows].contiguous(), c0[rows].contiguous()) if c0 is not None else h0[rows].contiguous()
            seq = _FUSED[module.mode](inp, state, flat, module.bias, 1, 0.0, False, dirs == 2, True)[0]
        for d, (w_ih, w_hh, b_ih, b_hh) in enumerate(params):
            h, first = seq[..., d * H:(d + 1) * H], h0[layer * dirs + d].unsqueeze(1)
            prev = torch.cat([first, h[:, :-1]], 1) if d == 0 else torch.cat([h[:, 1:], first], 1)
            f = torch.nn.functional.linear
            zi = f(inp, w_ih.detach().to(dt), None if b_ih is None else b_ih.detach().to(dt))
            zh = f(prev, w_hh.detach().to(dt), None if b_hh is None else b_hh.detach().to(dt))
            out[(layer, d == 1)] = (inp, prev, zi, zh)
        inp = seq
    return out


def _wdt(module) -> torch.dtype:
    """The dtype the replay computes in: float64 for a float64 layer, float32 otherwise."""
    return work_dtype(*module.parameters())


def _dzh(dzi: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """The recurrent pre-activations' gradient: ``dzi`` itself (gates add ``zi + zh``), except GRU's n gate."""
    if r is None:
        return dzi
    H = r.shape[-1]
    return torch.cat([dzi[..., :2 * H], dzi[..., 2 * H:] * r], -1)


def _store(slots: dict, key):
    def hook(grad):
        slots[key] = grad
    return hook


class RNNRule(Rule):
    """``nn.RNN``/``nn.LSTM``/``nn.GRU``: ``weight_ih_l{k}[_reverse]``, ``weight_hh_...``, ``bias_ih_...``, ``bias_hh_...``."""

    def covers(self, module):
        return [n for n, _ in module.named_parameters(recurse=False)]

    own_layout = True

    def unbatched(self, layer, x):
        return x.dim() == 2

    def api_layout(self, layer, x):
        return "unbatched" if x.dim() == 2 else (0 if layer.module.batch_first else 1)

    def inline_forward(self, layer, args: tuple, kwargs: dict):
        """The layer's forward for the exact rule's recorded pass: the step-by-step replay itself, on the
        inputs' own graph, so the one backward gives every step's gate gradients. ``(outputs, replay)``."""
        call = Call(args, kwargs, None, [], [])
        self._check_input(layer, call)
        if rnn_native.serves(layer.module, call.x):  # the native step loop (rnn_native.py)
            rep = rnn_native.NativeReplay(layer.module, *_batched(layer.module, call))
        else:
            rep = Replay(layer.module, call, inline=True)
        return rep.outputs(), rep

    def check(self, layer):
        m = layer.module
        if getattr(m, "proj_size", 0):
            raise ValueError(f"MAS: LSTM layer {layer.name!r} has proj_size={m.proj_size}, which the per-layer "
                             "rules do not serve; use importance='global_batch' for this model")
        if m.training and m.dropout > 0 and m.num_layers > 1:
            raise ValueError(f"MAS: RNN layer {layer.name!r} applies dropout between its layers in train mode; "
                             "estimate in eval mode (the default) or use importance='global_batch'")

    def _check_input(self, layer, call):
        x = call.args[0] if call.args else call.kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"MAS: layer {layer.name!r} got a {type(x).__name__}, not a tensor; the rule of "
                f"{type(layer.module).__name__} needs padded tensor inputs: pad the batch (no "
                "pack_padded_sequence), or use importance='global' (its layers then get the per-sample "
                "fallback) or 'global_batch'"
            )

    def _factors(self, layer, calls, ctx):
        """attr -> list over calls of (a, b) with sample k's gradient a_k^T b_k (biases: (dz, None))."""
        self.check(layer)
        out: dict = {}
        for call in calls:
            self._check_input(layer, call)
            if all(d is None for d in call.deltas):
                continue
            rep = getattr(call, "replay", None)
            if rep is not None:  # the recorded pass ran the replay itself: its backward recorded dz
                dz = rep.grads()
            else:
                with torch.enable_grad():
                    rep = Replay(layer.module, call)
                    dz = rep.backward(call)
            for (lyr, rev), (dzi, dzh) in dz.items():
                x, h_prev = rep.inputs[(lyr, rev)][:2]
                w_ih, w_hh, b_ih, b_hh = _names(lyr, rev)
                out.setdefault(w_ih, []).append((dzi, x.detach()))
                out.setdefault(w_hh, []).append((dzh, h_prev.detach()))
                out.setdefault(b_ih, []).append((dzi, None))
                out.setdefault(b_hh, []).append((dzh, None))
        return out

    def exact(self, layer, calls, ctx, accs):
        for attr, pairs in self._factors(layer, calls, ctx).items():
            if attr not in accs:
                continue
            if pairs[0][1] is None:  # a bias: sum over steps (and calls) per sample, then r(.)
                ctx.reduce.dense_(accs[attr], sum(a.sum(1) for a, _ in pairs))
            else:
                a = cat_uses([p[0] for p in pairs])
                b = cat_uses([p[1] for p in pairs])
                ctx.reduce.bmm_(accs[attr], a, b, ctx.budget)

    def factors(self, layer, calls, ctx, attr):
        pairs = self._factors(layer, calls, ctx).get(attr)
        if not pairs or pairs[0][1] is None:
            return None
        return cat_uses([p[0] for p in pairs]), cat_uses([p[1] for p in pairs])

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        got = self._factors(layer, calls, ctx)
        out = {}
        for attr in attrs:
            pairs = got.get(attr, [])
            shape = getattr(layer.module, attr).shape
            total = torch.zeros((hi - lo, *shape), device=getattr(layer.module, attr).device,
                                dtype=_wdt(layer.module))
            for a, b in pairs:
                a = a[lo:hi]
                total += a.sum(1) if b is None else a.transpose(1, 2) @ b[lo:hi]
            out[attr] = total
        return out

    def local(self, layer, call, accs):
        self.check(layer)
        self._check_input(layer, call)
        with torch.no_grad():
            pre = fused_pre_activations(layer.module, call)
        for (lyr, rev), (x, h_prev, zi, zh) in pre.items():
            w_ih, w_hh, b_ih, b_hh = _names(lyr, rev)
            zi = zi.reshape(-1, zi.shape[-1])
            zh = zh.reshape(-1, zh.shape[-1])
            if w_ih in accs:
                abs_outer_(accs[w_ih], zi, x.reshape(-1, x.shape[-1]))
            if w_hh in accs:
                abs_outer_(accs[w_hh], zh, h_prev.reshape(-1, h_prev.shape[-1]))
            if b_ih in accs:
                accs[b_ih].add_(zi.abs().sum(0))
            if b_hh in accs:
                accs[b_hh].add_(zh.abs().sum(0))
