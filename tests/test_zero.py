"""The MAS penalty under DeepSpeed ZeRO-0/1/2/3 (two gloo ranks on CPU): the update equals one process's.

Optional: skipped, with the reason shown, where ``deepspeed`` is not installed (``pip install deepspeed``;
it runs on CPU with gloo).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mas_kernels as mk
from tests.test_distributed import WORLD, spawn
from tests.test_fsdp import batches, mlp, union

deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional: pip install deepspeed)")

STAGES = (0, 1, 2, 3)
LR = 0.5


def _engine(stage: int):
    model = mlp(seed=11)  # not the parameters the state's theta* was taken from
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config)
    return engine


def _full_params(engine, stage: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    if stage == 3:
        return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _w_zero(rank: int, tmp: Path, device, stages) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("LOCAL_RANK", str(rank))
    out = {}
    for stage in stages:
        try:
            engine = _engine(stage)
            if stage in (1, 2):  # MAS's own add_penalty_grad_ would write .grad, which ZeRO ignores: refused
                mas = mk.MAS(engine, importance="global")
                assert not any(n.startswith("module.") for n in mas.tracked)
                with pytest.raises(NotImplementedError, match="ZeRO-.*ZeroPenalty"):
                    mas.add_penalty_grad_()
            if stage == 3:
                with pytest.raises(NotImplementedError, match="ZeRO-3"):
                    mk.MAS(engine)
            before = _full_params(engine, stage)
            pen = mk.ZeroPenalty(engine, tmp / "state.safetensors")
            x = batches(rank, seed=40 + stage)[0]
            engine.backward(engine(x).pow(2).mean())
            value = pen.add_penalty_grad_()
            engine.step()
            total = torch.tensor([float(value)])
            dist.all_reduce(total)
            out[stage] = (before, _full_params(engine, stage), float(total))
        except BaseException:
            (tmp / f"error-zero{stage}-{rank}.txt").write_text(traceback.format_exc())
            raise
        dist.barrier()
    torch.save(out, tmp / f"zero-rank{rank}.pt")


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    mas = mk.MAS(mlp(), importance="global", lam=0.7)
    mas.estimate(union())
    mas.consolidate()
    mas.save(tmp / "state.safetensors")
    try:
        spawn(_w_zero, tmp, "gloo", STAGES)
    except Exception as exc:
        detail = "\n".join(f.read_text() for f in tmp.glob("error-*.txt")) or str(exc)
        pytest.fail(f"the ZeRO workers failed:\n{detail}", pytrace=False)
    return tmp, mas


@pytest.mark.parametrize("stage", STAGES)
def test_zero_penalty_update_equals_one_process(ran, stage):
    tmp, mas = ran
    for rank in range(WORLD):
        before, after, total = torch.load(tmp / f"zero-rank{rank}.pt")[stage]
        replica = mlp(seed=11)
        with torch.no_grad():
            for n, p in replica.named_parameters():
                p.copy_(before[n])
        for r in range(WORLD):  # DeepSpeed averages the ranks' gradients
            (replica(batches(r, seed=40 + stage)[0]).pow(2).mean() / WORLD).backward()
        value = 0.0
        for n, p in replica.named_parameters():
            d = p.detach() - mas.anchors[n]
            value += 0.7 * float((mas.omega[n] * d * d).sum())
            want = p.detach() - LR * (p.grad + 2 * 0.7 * mas.omega[n] * d)
            torch.testing.assert_close(after[n], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"ZeRO-{stage} {n}: {m}")
        if stage == 0:  # whole parameters: every rank's value is the whole penalty
            value *= WORLD
        assert abs(total - value) <= 1e-5 * max(1.0, value)
