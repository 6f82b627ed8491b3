"""``mk.optim``: the optimizer step with the MAS penalty fused in, against ``add_penalty_grad_()`` + ``torch.optim``.

* Training runs (a small MLP and a small CNN, many steps) against the same
  model trained with ``mas.add_penalty_grad_()`` then the torch optimizer's
  own step, on every backend: parameters, optimizer state and the penalty's
  value to float tolerance; Adam, AdamW, amsgrad, maximize, SGD with momentum,
  dampening, nesterov, both weight-decay conventions.
* ``state_dict`` both ways with ``torch.optim`` (a fused torch AdamW too),
  LR schedulers, param groups, closures, frozen, unused and untracked
  parameters, before the first ``consolidate()``, float64 parameters.
* The ops themselves against the float64 oracle (``tests/reference.py``):
  16-bit storage, strided and misaligned tensors, per-tensor step counts,
  ``opcheck``, version counters, and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mas_kernels as mk
from mas_kernels.ops._checks import FLOAT_DTYPES
from tests import reference as ref
from tests.helpers import BF16, F16, F32, F64, assert_close

OPS = torch.ops.mas_kernels
LAM = 0.7


# ------------------------------------------------------------------ models
def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 3 * 3, 3))


def _data(kind, n_steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (5, 6) if kind == "mlp" else (2, 3, 8, 8)
    return [(torch.randn(*shape, generator=g), torch.randn(shape[0], 3, generator=g)) for _ in range(n_steps)]


def _twins(kind="mlp", consolidate=True, **mas_kwargs):
    """(model, mas) twice with equal weights and equal MAS state, weights moved away from theta*."""
    torch.manual_seed(0)
    model = _mlp() if kind == "mlp" else _cnn()
    twin = copy.deepcopy(model)
    mas = mk.MAS(model, lam=LAM, **mas_kwargs)
    mas_twin = mk.MAS(twin, lam=LAM, **mas_kwargs)
    if consolidate:
        mas.estimate([_data(kind, 1, seed=7)[0][0]]).consolidate()
        mas_twin.load_state_dict(mas.state_dict())
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                noise = 0.1 * torch.randn_like(p)
                p.add_(noise)
                q.add_(noise)
    return (model, mas), (twin, mas_twin)


def _backward(model, x, y):
    nn.functional.mse_loss(model(x), y).backward()


def _assert_same_training(model, ref_model, opt, ref_opt, atol=2e-6, rtol=2e-5):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p, q, atol=atol, rtol=rtol, name=name)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for k, st in sd["state"].items():
        assert st.keys() == ref_sd["state"][k].keys(), k
        for key, value in st.items():
            assert_close(value, ref_sd["state"][k][key], atol=atol, rtol=rtol, name=f"state[{k}][{key}]")


def _train(pair, ref_pair, make_opt, make_ref_opt, data, sched=None, check_value=True):
    (model, mas), (ref_model, ref_mas) = pair, ref_pair
    opt, ref_opt = make_opt(model.parameters(), mas), make_ref_opt(ref_model.parameters())
    scheds = [sched(opt), sched(ref_opt)] if sched else []
    for x, y in data:
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            _backward(m, x, y)
        want = ref_mas.add_penalty_grad_()
        ref_opt.step()
        opt.step()
        if check_value:
            assert_close(opt.last_penalty, want, atol=1e-6, rtol=1e-5, name="last_penalty")
        for s in scheds:
            s.step()
    return opt, ref_opt


CONFIGS = {
    "AdamW": (lambda ps, mas: mk.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, mas=mas),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    "Adam coupled wd": (lambda ps, mas: mk.optim.Adam(ps, lr=1e-2, weight_decay=0.1, mas=mas),
                        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1)),
    "AdamW amsgrad maximize": (
        lambda ps, mas: mk.optim.AdamW(ps, lr=1e-3, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True,
                                       maximize=True, mas=mas),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True, maximize=True)),
    "SGD momentum dampening wd": (
        lambda ps, mas: mk.optim.SGD(ps, lr=5e-2, momentum=0.9, dampening=0.1, weight_decay=0.01, mas=mas),
        lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD nesterov": (lambda ps, mas: mk.optim.SGD(ps, lr=5e-2, momentum=0.9, nesterov=True, mas=mas),
                     lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, nesterov=True)),
    "SGD plain maximize": (lambda ps, mas: mk.optim.SGD(ps, lr=5e-2, maximize=True, mas=mas),
                           lambda ps: torch.optim.SGD(ps, lr=5e-2, maximize=True)),
}


# ------------------------------------------------------ training vs torch.optim
def _steps(backend, n):
    # The Triton interpreter costs ~0.1 s a launch: fewer steps there (each step checks the same kernel).
    return n if backend != "triton" else 20


@pytest.mark.parametrize("config", list(CONFIGS))
def test_mlp_50_steps_equal_add_penalty_grad_then_torch_step(backend, config):
    pair, ref_pair = _twins("mlp")
    opt, ref_opt = _train(pair, ref_pair, *CONFIGS[config], _data("mlp", _steps(backend, 50)))
    _assert_same_training(pair[0], ref_pair[0], opt, ref_opt)


@pytest.mark.parametrize("config", ["AdamW", "SGD momentum dampening wd"])
def test_cnn_steps_equal_add_penalty_grad_then_torch_step(backend, config):
    pair, ref_pair = _twins("cnn")
    opt, ref_opt = _train(pair, ref_pair, *CONFIGS[config], _data("cnn", _steps(backend, 20)))
    _assert_same_training(pair[0], ref_pair[0], opt, ref_opt)


def test_training_moves_the_model_and_the_penalty_pulls_back(backend):
    # Not a tautology of the comparisons above: the penalty's pull is there (the value falls with a
    # strong lam, and rises without it).
    values = {}
    for lam in (0.0, 50.0):
        (model, mas), _ = _twins("mlp")
        mas.lam = lam
        opt = mk.optim.SGD(model.parameters(), lr=1e-2, mas=mas)
        for x, y in _data("mlp", 30):
            opt.zero_grad()
            _backward(model, x, y)
            opt.step()
        mas.lam = 1.0
        values[lam] = float(mas.penalty().detach())
    assert values[50.0] < 0.2 * values[0.0]


def test_lr_scheduler_and_lam_change(backend):
    pair, ref_pair = _twins("mlp")
    make, make_ref = CONFIGS["AdamW"]
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k))  # noqa: E731
    data = _data("mlp", 12)
    opt, ref_opt = _train(pair, ref_pair, make, make_ref, data[:6], sched=sched)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] != 1e-2
    pair[1].lam = ref_pair[1].lam = 0.1  # read at every step
    for x, y in data[6:]:
        for m, o in ((pair[0], opt), (ref_pair[0], ref_opt)):
            o.zero_grad()
            _backward(m, x, y)
        want = ref_pair[1].add_penalty_grad_()
        ref_opt.step()
        opt.step()
        assert_close(opt.last_penalty, want, atol=1e-7, rtol=1e-5)
    _assert_same_training(pair[0], ref_pair[0], opt, ref_opt)


def test_param_groups_untracked_frozen_and_unused_params(backend):
    # Group 0: the first layer (lr 1e-2, wd 0.1); group 1: the rest (lr 3e-3, no wd). The wrapper tracks
    # all but the last bias (untracked: plain update); the middle layer is frozen (never moved); the
    # extra head is unused by the forward (no .grad: the penalty gives it one, as add_penalty_grad_ does).
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head2 = _mlp(), nn.Linear(3, 3)
            self.body[2].requires_grad_(False)

        def forward(self, x):
            return self.body(x)

    def groups(model):
        b = model.body
        return [{"params": list(b[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
                {"params": [b[2].weight, b[2].bias, b[4].weight, b[4].bias, *model.head2.parameters()],
                 "lr": 3e-3, "weight_decay": 0.0}]

    torch.manual_seed(0)
    model = TwoHeads()
    twin = copy.deepcopy(model)
    track = lambda n, p: n != "body.4.bias"  # noqa: E731
    mas, ref_mas = mk.MAS(model, lam=LAM, params=track), mk.MAS(twin, lam=LAM, params=track)
    mas.estimate([torch.randn(8, 6)]).consolidate()
    ref_mas.load_state_dict(mas.state_dict())
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            noise = 0.1 * torch.randn_like(p)
            p.add_(noise)
            q.add_(noise)
    frozen = model.body[2].weight.clone()
    opt = mk.optim.AdamW(groups(model), mas=mas)
    ref_opt = torch.optim.AdamW(groups(twin))
    for x, y in _data("mlp", 8):
        for m, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            _backward(m, x, y)
        want = ref_mas.add_penalty_grad_()
        ref_opt.step()
        opt.step()
        assert_close(opt.last_penalty, want, atol=1e-7, rtol=1e-5)
    _assert_same_training(model, twin, opt, ref_opt)
    assert torch.equal(model.body[2].weight, frozen) and model.body[2].weight not in opt.state
    assert "body.4.bias" not in mas.tracked and model.body[4].bias in opt.state
    assert model.head2.weight.grad is not None and model.head2.weight in opt.state


def test_before_the_first_consolidate_it_is_plain_adamw(backend):
    pair, ref_pair = _twins("mlp", consolidate=False)
    (model, mas), (twin, _) = pair, ref_pair
    opt = mk.optim.AdamW(model.parameters(), lr=1e-2, mas=mas)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for x, y in _data("mlp", 10):
        for m, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            _backward(m, x, y)
            o.step()
        assert opt.last_penalty.item() == 0.0
    _assert_same_training(model, twin, opt, ref_opt)


def test_closure_and_step_hooks(backend):
    pair, ref_pair = _twins("mlp")
    (model, mas), (twin, ref_mas) = pair, ref_pair
    opt = mk.optim.SGD(model.parameters(), lr=1e-2, momentum=0.5, mas=mas)
    ref_opt = torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.5)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    for x, y in _data("mlp", 4):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        got = opt.step(closure)
        ref_opt.zero_grad()
        want = nn.functional.mse_loss(twin(x), y)
        want.backward()
        ref_mas.add_penalty_grad_()
        ref_opt.step()
        assert_close(got.detach(), want.detach())
    assert len(calls) == 4
    _assert_same_training(model, twin, opt, ref_opt)


def test_inside_torch_compile_no_recompile_for_lr_or_lam(backend):
    import torch._dynamo.testing

    pair, ref_pair = _twins("mlp")
    (model, mas), (twin, ref_mas) = pair, ref_pair
    opt = mk.optim.AdamW(model.parameters(), lr=1e-2, mas=mas)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)) for o in (opt, ref_opt)]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter)
    def train_step(x, y):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    torch._dynamo.reset()
    frames = []
    for i, (x, y) in enumerate(_data("mlp", 6)):
        train_step(x, y)
        ref_opt.zero_grad()
        _backward(twin, x, y)
        ref_mas.add_penalty_grad_()
        ref_opt.step()
        for s in scheds:
            s.step()
        if i == 2:
            mas.lam = ref_mas.lam = 0.2
        frames.append(counter.frame_count)
    assert frames[-1] == frames[1], frames  # new lr every step, new lam once: nothing recompiled
    _assert_same_training(model, twin, opt, ref_opt)


# ------------------------------------------------------------ state_dict
@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours", "torch fused->ours"])
def test_state_dict_round_trip_with_torch_optim(backend, direction):
    pair, ref_pair = _twins("mlp")
    (model, mas), (twin, ref_mas) = pair, ref_pair
    data = _data("mlp", 10)
    hp = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    ours = mk.optim.AdamW(model.parameters(), mas=mas, **hp)
    theirs = torch.optim.AdamW(twin.parameters(), fused=direction == "torch fused->ours", **hp)

    def run(first, batches):
        for x, y in batches:
            for m, o in ((model, ours), (twin, theirs)):
                o.zero_grad()
                _backward(m, x, y)
            ref_mas.add_penalty_grad_()
            theirs.step()
            ours.step()

    run(True, data[:5])
    if direction == "ours->torch":
        theirs = torch.optim.AdamW(twin.parameters(), lr=1.0)  # hyperparameters come from the state
        theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # as torch.save + torch.load: no shared tensors
    else:
        ours = mk.optim.AdamW(model.parameters(), lr=1.0, mas=mas)
        ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
        assert not ours.param_groups[0]["fused"] and ours.param_groups[0]["amsgrad"]
        assert all(st["step"].device.type == "cpu" for st in ours.state.values())
    run(False, data[5:])
    _assert_same_training(model, twin, ours, theirs)


def test_sgd_state_dict_round_trip(backend):
    pair, ref_pair = _twins("mlp")
    (model, mas), (twin, ref_mas) = pair, ref_pair
    ours = mk.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True, mas=mas)
    theirs = torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    for i, (x, y) in enumerate(_data("mlp", 6)):
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            _backward(m, x, y)
        ref_mas.add_penalty_grad_()
        theirs.step()
        ours.step()
        if i == 2:
            theirs, fresh = torch.optim.SGD(twin.parameters(), lr=0.5), mk.optim.SGD(model.parameters(), mas=mas)
            theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
            fresh.load_state_dict(copy.deepcopy(theirs.state_dict()))
            ours = fresh
    _assert_same_training(model, twin, ours, theirs)


def test_is_a_torch_optimizer_and_pickles(backend):
    (model, mas), _ = _twins("mlp")
    opt = mk.optim.AdamW(model.parameters(), mas=mas)
    assert isinstance(opt, torch.optim.AdamW) and isinstance(opt, torch.optim.Optimizer)
    assert isinstance(mk.optim.Adam(model.parameters(), mas=mas), torch.optim.Adam)
    assert isinstance(mk.optim.SGD(model.parameters(), mas=mas), torch.optim.SGD)
    copied = copy.deepcopy(opt)
    assert copied.mas is not None


# --------------------------------------------------------------- dtypes
def test_float64_untracked_params_run_in_float64(backend):
    # A float64 parameter the wrapper does not track: the kernels take 16/32-bit floats, so it gets the
    # PyTorch definition in its own precision (the same as torch's step to float64 rounding).
    torch.manual_seed(0)
    model = _mlp()
    model.scale = nn.Parameter(torch.randn(3, dtype=F64))
    twin = copy.deepcopy(model)
    mas = mk.MAS(model, lam=LAM, params=lambda n, p: n != "scale")
    mas.estimate([torch.randn(8, 6)]).consolidate()
    opt = mk.optim.AdamW(model.parameters(), lr=1e-2, mas=mas)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for x, y in _data("mlp", 5):
        for m, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            (nn.functional.mse_loss(m(x), y) + (m.scale ** 2).sum()).backward()
        ref_opt.step()
        opt.step()
    torch.testing.assert_close(model.scale, twin.scale, atol=1e-12, rtol=1e-12)
    assert opt.state[model.scale]["exp_avg"].dtype == F64


@pytest.mark.skipif(F64 not in FLOAT_DTYPES, reason="the ops take float32/float16/bfloat16 tensors (no float64 "
                    "penalty yet): a tracked float64 parameter is refused by mk.MAS itself")
def test_float64_tracked_params(backend):
    pair, ref_pair = _twins("mlp")
    pair[0].double()
    ref_pair[0].double()
    opt, ref_opt = _train(pair, ref_pair, *CONFIGS["AdamW"], [(x.double(), y.double()) for x, y in _data("mlp", 5)])
    _assert_same_training(pair[0], ref_pair[0], opt, ref_opt, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ refusals
def test_refusals_name_the_culprit():
    (model, mas), _ = _twins("mlp")
    params = list(model.parameters())
    for flag in ("fused", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"mk.optim.AdamW: {flag}=True"):
            mk.optim.AdamW(params, mas=mas, **{flag: True})
    with pytest.raises(ValueError, match="mk.optim.SGD: fused=True"):
        mk.optim.SGD(params, mas=mas, fused=True)
    with pytest.raises(TypeError, match="mas must be an mk.MAS"):
        mk.optim.AdamW(params, mas=model)
    with pytest.raises(TypeError):
        mk.optim.AdamW(params)  # mas is required
    opt = mk.optim.AdamW(params, mas=mas)
    sd = torch.optim.AdamW(params, differentiable=True).state_dict()
    with pytest.raises(ValueError, match=r"param_groups\[0\] was saved with differentiable=True"):
        opt.load_state_dict(sd)
    opt.param_groups[0]["capturable"] = True
    _backward(model, *_data("mlp", 1)[0])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['capturable'\]=True"):
        opt.step()
    c = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    c.grad = torch.randn_like(c)
    with pytest.raises(ValueError, match="complex"):
        mk.optim.AdamW([c], mas=mas).step()


# ------------------------------------------------------- the ops vs the oracle
def _lists(sizes, dtype, penalty=True, layout="contiguous"):
    def make(n, dt, fill=torch.randn):
        if layout == "transposed" and n % 4 == 0:
            return fill(4, n // 4, dtype=F32).to(dt).t()
        if layout == "offset":
            return fill(n + 1, dtype=F32).to(dt)[1:]
        return fill(n, dtype=F32).to(dt)

    params = [make(n, dtype) for n in sizes]
    grads = [make(n, dtype) for n in sizes]
    m = [make(n, dtype) * 0.1 for n in sizes]
    v = [make(n, dtype, torch.rand) * 0.1 for n in sizes]
    anchors = [p.float() + 0.1 * torch.randn(p.shape) for p in params] if penalty else []
    omegas = [torch.rand(p.shape) for p in params] if penalty else []
    return params, grads, m, v, anchors, omegas


HP = dict(lam=0.3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("decoupled,amsgrad,penalty", [(True, False, True), (False, True, True), (True, True, False)])
def test_adam_op_against_the_oracle(backend, dtype, layout, decoupled, amsgrad, penalty):
    sizes = [3000, 8, 0, 4100]  # a partial last chunk (Triton blocks of 2048), a tiny and an empty tensor
    params, grads, m, v, anchors, omegas = _lists(sizes, dtype, penalty, layout)
    vmax = [x * 1.5 for x in v] if amsgrad else []
    steps = [torch.tensor(float(k)) for k in (0, 4, 4, 9)]  # per-tensor step counts: several launch groups
    before = [[t.clone() for t in xs] for xs in (params, grads, m, v, vmax)]
    value = OPS.adam_penalty_step_(params, grads, m, v, vmax, steps, anchors, omegas, HP["lam"], HP["lr"],
                                   HP["beta1"], HP["beta2"], HP["eps"], HP["weight_decay"], decoupled, False)
    assert [s.item() for s in steps] == [1.0, 5.0, 5.0, 10.0]
    total = 0.0
    for i in range(len(sizes)):
        want = ref.adam_step(before[0][i], before[1][i], before[2][i], before[3][i],
                             before[4][i] if amsgrad else None, anchors[i] if penalty else None,
                             omegas[i] if penalty else None, lam=HP["lam"], lr=HP["lr"], beta1=HP["beta1"],
                             beta2=HP["beta2"], eps=HP["eps"], weight_decay=HP["weight_decay"], decoupled=decoupled,
                             maximize=False, step=steps[i].item())
        # The update divides by sqrt(v) + eps: an element's relative error is that of m, v (each once rounded).
        assert_close(params[i], want[0], scale=before[0][i].abs().double() + HP["lr"] * 20, name=f"params[{i}]")
        assert_close(m[i], want[1], name=f"exp_avgs[{i}]")
        assert_close(v[i], want[2], name=f"exp_avg_sqs[{i}]")
        if amsgrad:
            assert_close(vmax[i], want[3], name=f"max_exp_avg_sqs[{i}]")
        total += float(want[4])
        assert torch.equal(grads[i], before[1][i])  # the gradient is read, never written
    assert_close(value, torch.tensor(HP["lam"] * total, dtype=F64), dtype=F32)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("momentum,nesterov,first", [(0.0, False, False), (0.9, True, False), (0.9, False, True)])
def test_sgd_op_against_the_oracle(backend, dtype, momentum, nesterov, first):
    sizes = [3000, 8, 4100]
    params, grads, bufs, _, anchors, omegas = _lists(sizes, dtype, True, "offset")
    bufs = bufs if momentum else []
    before = [[t.clone() for t in xs] for xs in (params, bufs)]
    value = OPS.sgd_penalty_step_(params, grads, bufs, anchors, omegas, 0.3, 1e-2, 0.01, momentum, 0.0 if nesterov
                                  else 0.2, nesterov, True, first)
    total = 0.0
    for i in range(len(sizes)):
        want = ref.sgd_step(before[0][i], grads[i], None if (first or not momentum) else before[1][i], anchors[i],
                            omegas[i], lam=0.3, lr=1e-2, weight_decay=0.01, momentum=momentum,
                            dampening=0.0 if nesterov else 0.2, nesterov=nesterov, maximize=True)
        assert_close(params[i], want[0], scale=before[0][i].abs().double() + 0.1, name=f"params[{i}]")
        if momentum:
            assert_close(bufs[i], want[1], name=f"momentum_buffers[{i}]")
        total += float(want[2])
    assert_close(value, torch.tensor(0.3 * total, dtype=F64), dtype=F32)


def test_ops_opcheck(backend):
    params, grads, m, v, anchors, omegas = _lists([6, 5], F32)
    steps = [torch.tensor(2.0), torch.tensor(2.0)]
    results = torch.library.opcheck(OPS.adam_penalty_step_.default,
                                    (params, grads, m, v, [], steps, anchors, omegas, 0.3, 1e-2, 0.9, 0.999, 1e-8,
                                     0.0, True, False))
    assert all(r == "SUCCESS" for r in results.values()), results
    results = torch.library.opcheck(OPS.sgd_penalty_step_.default,
                                    (params, grads, m, anchors, omegas, 0.3, 1e-2, 0.0, 0.9, 0.0, False, False, False))
    assert all(r == "SUCCESS" for r in results.values()), results


def test_ops_bump_versions_and_leave_inputs(backend):
    params, grads, m, v, anchors, omegas = _lists([6, 5], F32)
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    written = params + m + v + steps
    before = [t._version for t in written]
    inputs = [t.clone() for t in grads + anchors + omegas]
    OPS.adam_penalty_step_(params, grads, m, v, [], steps, anchors, omegas, 0.3, 1e-2, 0.9, 0.999, 1e-8, 0.0, True,
                           False)
    assert all(t._version > b for t, b in zip(written, before))
    assert all(torch.equal(a, b) for a, b in zip(grads + anchors + omegas, inputs))


def test_ops_refuse_bad_calls_before_writing(backend):
    params, grads, m, v, anchors, omegas = _lists([6, 5], F32)
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    saved = [t.clone() for t in params + m + v]

    def adam(**kw):
        args = dict(params=params, grads=grads, exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=[], state_steps=steps,
                    anchors=anchors, omegas=omegas, lam=0.3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, decoupled_weight_decay=True, maximize=False)
        args.update(kw)
        return OPS.adam_penalty_step_(*args.values())

    with pytest.raises(ValueError, match="lr"):
        adam(lr=float("nan"))
    with pytest.raises(ValueError, match="lam"):
        adam(lam=1e39)
    with pytest.raises(ValueError, match="grads has 1 tensors"):
        adam(grads=grads[:1])
    with pytest.raises(ValueError, match="anchors and omegas"):
        adam(omegas=omegas[:1])
    with pytest.raises(ValueError, match="same memory|share memory"):
        adam(exp_avgs=[m[0], v[1]])
    with pytest.raises(ValueError, match="momentum_buffers"):
        OPS.sgd_penalty_step_(params, grads, [], anchors, omegas, 0.3, 1e-2, 0.0, 0.9, 0.0, False, False, False)
    assert all(torch.equal(a, b) for a, b in zip(params + m + v, saved))
    assert all(s.item() == 0.0 for s in steps)
