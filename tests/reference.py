"""The oracle: the formulas of the paper and of the ops, literally, in float64.

Naive per-sample and per-element loops, written independently of
``mas_kernels`` (nothing here imports it). Slow on purpose; keep inputs small.
"""

from __future__ import annotations

import copy

import torch

F64 = torch.float64


# ---------------------------------------------------------------- the three ops
def abs_outer(omega, a, b, alpha):
    """omega + alpha * sum_k outer(|a_k|, |b_k|), one sample at a time."""
    out = omega.to(F64).clone()
    for k in range(a.shape[0]):
        out += alpha * torch.outer(a[k].to(F64).abs(), b[k].to(F64).abs())
    return out


def abs_accumulate(omegas, tensors, alpha):
    return [o.to(F64) + alpha * t.to(F64).abs() for o, t in zip(omegas, tensors)]


def penalty_and_grads(params, anchors, omegas, lam, grads):
    """(value, new grads): lam * sum Omega (p - a)^2 and grad + 2 lam Omega (p - a)."""
    value = torch.zeros((), dtype=F64)
    new_grads = []
    for p, a, o, g in zip(params, anchors, omegas, grads):
        d = p.to(F64) - a.to(F64)
        value += (o.to(F64) * d * d).sum()
        new_grads.append(g.to(F64) + 2.0 * lam * o.to(F64) * d)
    return lam * value, new_grads


def adam_step(p, g, m, v, vmax, a, o, *, lam, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step):
    """One Adam(W) step of one tensor in float64, the torch.optim formulas literally, with the MAS penalty
    gradient in the gradient: returns (p, m, v, vmax or None, Omega (p - a)^2 summed) after the step
    (``step`` is the count after the increment; a/o None: no penalty)."""
    p, g, m, v = (t.to(F64) for t in (p, g, m, v))
    sq = torch.zeros((), dtype=F64)
    if a is not None:
        d = p - a.to(F64)
        sq = (o.to(F64) * d * d).sum()
        g = g + 2.0 * lam * o.to(F64) * d
    if maximize:
        g = -g
    if decoupled:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    if vmax is not None:
        vmax = torch.maximum(vmax.to(F64), v)
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = (vmax if vmax is not None else v) / (1.0 - beta2 ** step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v, vmax, sq


def sgd_step(p, g, buf, a, o, *, lam, lr, weight_decay, momentum, dampening, nesterov, maximize):
    """One SGD step of one tensor in float64 (torch.optim.SGD literally, buf None on the first step),
    with the MAS penalty gradient: returns (p, buf or None, Omega (p - a)^2 summed)."""
    p, g = p.to(F64), g.to(F64)
    sq = torch.zeros((), dtype=F64)
    if a is not None:
        d = p - a.to(F64)
        sq = (o.to(F64) * d * d).sum()
        g = g + 2.0 * lam * o.to(F64) * d
    if maximize:
        g = -g
    g = g + weight_decay * p
    if momentum != 0:
        buf = g.clone() if buf is None else momentum * buf.to(F64) + (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf, sq


def abs_bmm(omega, a, b, alpha):
    """omega + alpha * sum_s |sum_t outer(a_st, b_st)|: per sample, the sum over positions first, then abs."""
    out = omega.to(F64).clone()
    for s in range(a.shape[0]):
        g = torch.zeros(a.shape[2], b.shape[2], dtype=F64)
        for t in range(a.shape[1]):
            g += torch.outer(a[s, t].to(F64), b[s, t].to(F64))
        out += alpha * g.abs()
    return out


def conv_weight_abs_sum(conv, x, delta):
    """sum_k |g_k| for a convolution's weight, g_k = d <conv(x_k), delta_k> / d W, one sample at a time in
    float64 (autograd through the layer's own forward: its padding mode, stride, dilation, groups)."""
    m = copy.deepcopy(conv).double()
    out = torch.zeros_like(m.weight)
    for k in range(x.shape[0]):
        y = m(x[k:k + 1].to(F64))
        (g,) = torch.autograd.grad((y * delta[k:k + 1].to(F64)).sum(), [m.weight])
        out += g.abs()
    return out


# ------------------------------------------------------------ MAS importance
def _named(model):
    return dict(model.named_parameters())


def _samples(x, dim):
    """The batch ``x`` (a tensor, or a dict of keyword tensors) one sample at a time, each a batch of one."""
    if isinstance(x, dict):
        n = next(v for v in x.values() if isinstance(v, torch.Tensor)).shape[0]
        for k in range(n):
            yield lambda m, k=k: m(**{key: v[k:k + 1] if isinstance(v, torch.Tensor) else v for key, v in x.items()})
    else:
        for k in range(x.shape[dim]):
            yield lambda m, k=k: m(x.narrow(dim, k, 1))


def global_exact(model, xs, output_fn=lambda o: o, dim=0):
    """(1/N) sum_k |d ||F(x_k)||^2 / d theta|: one sample per backward pass.

    Each batch is a tensor (samples in ``dim``) or a dict of keyword tensors (samples in dim 0).
    """
    params = _named(model)
    omega = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    n = 0
    for x in xs:
        for run in _samples(x, dim):
            out = output_fn(run(model))
            grads = torch.autograd.grad(out.double().pow(2).sum(), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    omega[name] += g.double().abs()
            n += 1
    return {k: v / n for k, v in omega.items()}


def global_batch(model, xs, output_fn=lambda o: o):
    """The released code: (1/N) sum_b |sum_{k in b} g_k|."""
    params = _named(model)
    omega = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    n = 0
    for x in xs:
        out = output_fn(model(x))
        grads = torch.autograd.grad(out.double().pow(2).sum(), list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                omega[name] += g.double().abs()
        n += x.shape[0]
    return {k: v / n for k, v in omega.items()}


def global_batch_avalanche(model, xs, output_fn=lambda o: o):
    """Avalanche's MASPlugin: (1/n_b) sum_b |sum_{k in b} g_k| / B_b, a mean over batches of batch means."""
    params = _named(model)
    omega = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    for x in xs:
        out = output_fn(model(x))
        grads = torch.autograd.grad(out.double().pow(2).sum(), list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                omega[name] += g.double().abs() / x.shape[0]
    return {k: v / len(xs) for k, v in omega.items()}


def local_linear(x, y):
    """(sum_k |y_k| |x_k|^T, sum_k |y_k|) for one Linear call; rows of extra dims are positions."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    w = torch.zeros(y.shape[1], x.shape[1], dtype=F64)
    for r in range(x.shape[0]):
        w += torch.outer(y[r].abs(), x[r].abs())
    return w, y.abs().sum(0)


def local_conv2d(conv, x, y):
    """Hebbian rule for a Conv2d over positions, by unfold + einsum (independent of conv weight-grads)."""
    import torch.nn.functional as F

    pads = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x.double(), pads, mode=mode) if any(pads) else x.double()
    cols = F.unfold(xp.abs(), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, C*kh*kw, L)
    ya = y.double().abs().flatten(2)  # (N, O, L)
    g = conv.groups
    o_per_g, c_per_g = conv.out_channels // g, conv.in_channels // g
    kk = cols.shape[1] // conv.in_channels
    w = torch.zeros(conv.weight.shape, dtype=F64)
    for gi in range(g):
        yc = ya[:, gi * o_per_g:(gi + 1) * o_per_g]
        xc = cols[:, gi * c_per_g * kk:(gi + 1) * c_per_g * kk]
        w[gi * o_per_g:(gi + 1) * o_per_g] = torch.einsum("nol,ncl->oc", yc, xc).view(o_per_g, *w.shape[1:])
    return w, ya.sum((0, 2))


def last_dim_x_hat(x, eps, rms):
    """A layer norm's (``rms``: an RMS norm's) normalized input over the last dim, in float64, literally."""
    x = x.double()
    if rms:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def local_norm(norm, x, y=None):
    """Hebbian numerators of a norm layer: sum |y * x_hat| (weight), sum |y| (bias), over samples and positions.

    ``x_hat`` comes from torch.nn.functional without the affine part (running statistics for a
    BatchNorm in eval mode, batch statistics in train mode).
    """
    import torch.nn.functional as F

    x = x.double()
    y = (norm(x.to(norm.weight.dtype)) if y is None else y).double().abs()
    if isinstance(norm, torch.nn.LayerNorm):
        xh = F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
        red = lambda t: t.reshape(-1, *norm.normalized_shape).sum(0)  # noqa: E731
    elif isinstance(norm, torch.nn.GroupNorm):
        xh = F.group_norm(x, norm.num_groups, eps=norm.eps)
        red = lambda t: t.sum([d for d in range(t.dim()) if d != 1])  # noqa: E731
    else:  # BatchNorm
        rm = None if norm.training else norm.running_mean.double()
        rv = None if norm.training else norm.running_var.double()
        xh = F.batch_norm(x, rm, rv, training=norm.training, eps=norm.eps)
        red = lambda t: t.sum([d for d in range(t.dim()) if d != 1])  # noqa: E731
    return red(y * xh.abs()), red(y)


# --------------------------------------------------------- local rule, whole models
def _outer_rows(y, x):
    """sum_r |y_r| |x_r|^T over the rows of (R, J) and (R, I), one row at a time."""
    w = torch.zeros(y.shape[1], x.shape[1], dtype=F64)
    for r in range(x.shape[0]):
        w += torch.outer(y[r].abs(), x[r].abs())
    return w


def _attention(q, k, v, heads, key_padding_mask=None, attn_mask=None):
    """softmax(q k^T / sqrt(d) + masks) v for (N, L, E) inputs, written out per head."""
    N, L, E = q.shape
    S, d = k.shape[1], E // heads
    qh = q.view(N, L, heads, d).transpose(1, 2)
    kh = k.view(N, S, heads, d).transpose(1, 2)
    vh = v.view(N, S, heads, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / d ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :].bool(), float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(N, L, E)


def _rnn_steps(m, x, hx=None):
    """Per layer and direction: (inputs x_t, previous states h_{t-1}, zi_t, zh_t), the cell written out,
    from the initial state ``hx`` (``h0``, LSTM ``(h0, c0)``; zeros when None)."""
    if not m.batch_first:
        x = x.transpose(0, 1)
    x = x.double()
    N, T, _ = x.shape
    dirs = 2 if m.bidirectional else 1
    H = m.hidden_size
    out = {}
    inp = x
    for layer in range(m.num_layers):
        seqs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, "weight_ih" + sfx).double(), getattr(m, "weight_hh" + sfx).double()
            b_ih = getattr(m, "bias_ih" + sfx).double() if m.bias else 0
            b_hh = getattr(m, "bias_hh" + sfx).double() if m.bias else 0
            h = torch.zeros(N, H, dtype=F64)
            c = torch.zeros(N, H, dtype=F64)
            if hx is not None:
                h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
                h = h0[layer * dirs + d].double()
                c = c0[layer * dirs + d].double() if c0 is not None else c
            rows = {"x": [], "h": [], "zi": [], "zh": []}
            hs = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                zi = inp[:, t] @ w_ih.T + b_ih
                zh = h @ w_hh.T + b_hh
                rows["x"].append(inp[:, t]); rows["h"].append(h); rows["zi"].append(zi); rows["zh"].append(zh)
                if m.mode == "LSTM":
                    i, f, g, o = (zi + zh).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif m.mode == "GRU":
                    (ri, ui, ni), (rh, uh, nh) = zi.chunk(3, 1), zh.chunk(3, 1)
                    r, u = torch.sigmoid(ri + rh), torch.sigmoid(ui + uh)
                    h = (1 - u) * torch.tanh(ni + r * nh) + u * h
                else:
                    h = torch.tanh(zi + zh) if m.mode == "RNN_TANH" else torch.relu(zi + zh)
                hs[t] = h
            out[sfx] = {k: torch.cat(v) for k, v in rows.items()}
            seqs.append(torch.stack(hs, 1))
        inp = torch.cat(seqs, 2)
    return out


def local_hebbian(model, xs, n):
    """The local rule's importance, (1/n) sum over batches, from forward hooks on every layer, in float64.

    Linear / transformers' Conv1D: sum_rows |y| |x|^T (bias sum |y|); Conv2d: unfold + einsum; Embedding:
    |y_t| into row id_t (not padding_idx); norms: sum |y x_hat| and sum |y|; MultiheadAttention: per
    projection |y||x|^T with the attention output recomputed by hand; RNNs: sum_t |zi_t||x_t|^T,
    |zh_t||h_{t-1}|^T; ViTEmbeddings: |y[:, 0]| (cls token), |y| (positions). Parameters registered in
    several modules add every use.
    """
    names = {id(p): nm for nm, p in model.named_parameters()}
    omega = {nm: torch.zeros_like(p, dtype=F64) for nm, p in model.named_parameters()}

    def add(p, value):
        if p is not None and id(p) in names:
            omega[names[id(p)]] += value

    def hook(m, args, kwargs, out):
        x = args[0] if args else next(iter(kwargs.values()))
        kind = type(m).__name__
        if isinstance(m, torch.nn.Linear) and not kind.startswith("NonDynamically"):
            y = out.double().reshape(-1, out.shape[-1]); x2 = x.double().reshape(-1, x.shape[-1])
            add(m.weight, _outer_rows(y, x2)); add(m.bias, y.abs().sum(0))
        elif kind == "Conv1D":
            y = out.double().reshape(-1, out.shape[-1]); x2 = x.double().reshape(-1, x.shape[-1])
            add(m.weight, _outer_rows(x2, y)); add(m.bias, y.abs().sum(0))
        elif isinstance(m, torch.nn.Conv2d):
            w, b = local_conv2d(m, x, out)
            add(m.weight, w); add(m.bias, b)
        elif isinstance(m, torch.nn.Embedding):
            ids, y = x.reshape(-1), out.double().reshape(x.numel(), -1).abs()
            rows = torch.zeros_like(m.weight, dtype=F64)
            for t in range(ids.numel()):
                if m.padding_idx is None or int(ids[t]) != m.padding_idx:
                    rows[ids[t]] += y[t]
            # a (1, T) input shared by a batch of n samples counts once per sample
            add(m.weight, rows * (n_batch[0] if x.shape[0] == 1 else 1))
        elif isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            w, b = local_norm(m, x, out)
            add(m.weight, w); add(m.bias, b)
        elif isinstance(m, torch.nn.MultiheadAttention):
            q = x
            k, v = (args[1], args[2]) if len(args) >= 3 else (kwargs.get("key", q), kwargs.get("value", q))
            if not m.batch_first:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            E = m.embed_dim
            W, B = m.in_proj_weight.double(), m.in_proj_bias.double()
            proj = []
            for i, t in enumerate((q, k, v)):
                t2 = t.double().reshape(-1, E)
                y = t2 @ W[i * E:(i + 1) * E].T + B[i * E:(i + 1) * E]
                wpart = torch.zeros_like(W); wpart[i * E:(i + 1) * E] = _outer_rows(y, t2)
                bpart = torch.zeros_like(B); bpart[i * E:(i + 1) * E] = y.abs().sum(0)
                add(m.in_proj_weight, wpart); add(m.in_proj_bias, bpart)
                proj.append(y.view(t.shape[0], t.shape[1], E))
            attn = _attention(*proj, m.num_heads, kwargs.get("key_padding_mask"), kwargs.get("attn_mask"))
            o = out[0].double()
            if not m.batch_first:
                o = o.transpose(0, 1)
            add(m.out_proj.weight, _outer_rows(o.reshape(-1, E), attn.reshape(-1, E)))
            add(m.out_proj.bias, o.reshape(-1, E).abs().sum(0))
        elif isinstance(m, torch.nn.RNNBase):
            for sfx, r in _rnn_steps(m, x, args[1] if len(args) > 1 else kwargs.get("hx")).items():
                add(getattr(m, "weight_ih" + sfx), _outer_rows(r["zi"], r["x"]))
                add(getattr(m, "weight_hh" + sfx), _outer_rows(r["zh"], r["h"]))
                if m.bias:
                    add(getattr(m, "bias_ih" + sfx), r["zi"].abs().sum(0))
                    add(getattr(m, "bias_hh" + sfx), r["zh"].abs().sum(0))
        elif kind.endswith("RMSNorm") or kind == "T5LayerNorm":
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
            eps = torch.finfo(x.dtype).eps if eps is None else eps
            y = out.double().abs()
            add(m.weight, (y * rms_x_hat(x, eps).abs()).reshape(-1, y.shape[-1]).sum(0))
        elif kind == "ViTEmbeddings":
            y = out.double().abs()
            add(m.cls_token, y[:, :1].sum(0, keepdim=True)); add(m.position_embeddings, y.sum(0, keepdim=True))

    n_batch = [0]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            for x in xs:
                n_batch[0] = (next(v for v in x.values()) if isinstance(x, dict) else x).shape[0]
                model(**x) if isinstance(x, dict) else model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v / n for k, v in omega.items()}


# ------------------------------------------- calls with several arguments, samples in any dim
def _slice(a, d, k):
    return a if d is None or not isinstance(a, torch.Tensor) else a.narrow(d, k, 1)


def _size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def global_exact_args(model, batches, dims, output_fn=lambda o: o):
    """(1/N) sum_k |d ||F(x_k)||^2 / d theta| for batches of positional arguments, each sample run alone:
    ``dims[i]`` is the dim where argument i keeps the samples (None: every sample gets it whole)."""
    params = _named(model)
    omega = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    n = 0
    for args in batches:
        for k in range(_size(args, dims)):
            out = output_fn(model(*[_slice(a, d, k) for a, d in zip(args, dims)]))
            grads = torch.autograd.grad(out.double().pow(2).sum(), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    omega[name] += g.double().abs()
            n += 1
    return {k: v / n for k, v in omega.items()}


def global_batch_args(model, batches, dims, output_fn=lambda o: o):
    """(1/N) sum_b |sum_{k in b} g_k| with N counted along ``dims`` (see :func:`global_exact_args`)."""
    params = _named(model)
    omega = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    n = 0
    for args in batches:
        out = output_fn(model(*args))
        grads = torch.autograd.grad(out.double().pow(2).sum(), list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                omega[name] += g.double().abs()
        n += _size(args, dims)
    return {k: v / n for k, v in omega.items()}


def rms_x_hat(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last dim, in float64 (the RMS norms of transformers' models)."""
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def per_sample_sum(model, xs, r, output_fn=lambda o: o):
    """sum_k r(d ||F(x_k)||^2 / d theta) / N with ``r`` elementwise (``abs``: MAS; ``square``: EWC's Fisher
    diagonal with the squared output norm as the loss), one sample at a time."""
    params = _named(model)
    out = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    n = 0
    for x in xs:
        for k in range(x.shape[0]):
            y = output_fn(model(x[k:k + 1]))
            grads = torch.autograd.grad(y.double().pow(2).sum(), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    out[name] += r(g.double())
            n += 1
    return {k: v / n for k, v in out.items()}
