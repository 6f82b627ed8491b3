"""What the Triton kernels become on a GPU, checked without one; and the launch path of a training step.

* The compile audit's CI subset (``python -m mas_kernels.audit --ci``): real
  sm_80 and sm_90 compiles of a representative set of kernels, dtypes and
  autotune configs, which must not spill, must fit shared memory, must move
  full chunks with 128-bit accesses, must use tensor cores for 16-bit inputs
  and must keep step-varying scalars as runtime arguments. It runs in a
  subprocess: under ``TRITON_INTERPRET=1`` (this suite's setting without a
  GPU) ``triton.jit`` builds interpreted functions, which cannot be compiled.
* The audit's PTX/TTGIR reading, on small hand-written samples.
* The multi-tensor launch path: a warm call reuses its address table, makes
  no host synchronization and uploads only the pointers that changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mas_kernels as mk
from mas_kernels import audit

# Slow: the CI subset's compiles (~50 s on 2 cores) are one module fixture that every test here uses.
pytestmark = [pytest.mark.skipif(not mk.backend_info().triton["installed"], reason="Triton is not installed"),
              pytest.mark.slow]


# ------------------------------------------------------------ the CI subset
@pytest.fixture(scope="module")
def ci_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run([sys.executable, "-m", "mas_kernels.audit", "--ci", "--quiet", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), f"the audit did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    records = json.loads(out.read_text())
    return records, proc


def test_ci_subset_is_clean(ci_records):
    records, proc = ci_records
    bad = [f"{r['op']} {r['kernel']} sm_{r['arch']} {r['dtypes']} {r['case']} {r['config']}: {'; '.join(audit.check(r))}"
           for r in records if audit.check(r)]
    assert not bad, "compile audit problems:\n" + "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ci_subset_covers_every_kernel_and_property(ci_records):
    records, _ = ci_records
    assert {r["op"] for r in records} == {e.op for e in audit.ENTRIES}
    assert {r["arch"] for r in records} == set(audit.ARCHS)
    for e in audit.ENTRIES:
        mine = [r for r in records if r["op"] == e.op]
        if e.chunked:
            # both the fast path (aligned pointers) and the safe path for misaligned views
            assert {r["full_chunk_path"] for r in mine} == {True, False}, e.op
        assert all(r["scalars_runtime"] for r in mine), e.op
    for e in audit.ENTRIES:
        if not e.tensor_cores:
            continue
        mine = [r for r in records if r["op"] == e.op]
        sixteen = [r for r in mine if set(r["dtypes"].values()) <= {"f16", "bf16"}]
        assert sixteen and all("tensor_cores" in r["expect"] and r["mma"] for r in sixteen), e.op
        assert any("wgmma" in r["mma"] for r in sixteen if r["arch"] == 90), e.op
        # every autotune config of a rule is compiled, and the rule is part of the autotune key
        assert all("PRECISION" in r["autotune_key"] for r in mine), e.op
    bmm = [r for r in records if r["op"] == "abs_bmm_accumulate_"]
    # omega accumulated in place and split samples' partial sums; TF32 on tensor cores with
    # every global access 128 bits wide (check() holds the aligned cases to that)
    assert {r["config"]["ACCUMULATE"] for r in bmm} == {True, False}
    tf32 = [r for r in bmm if r["config"]["PRECISION"] == "tf32" and r["dtypes"] == {"a": "f32", "b": "f32"}]
    assert tf32 and all(r["mma"] and "tf32" in r["mma"] and "vector_io" in r["expect"] for r in tf32)


def test_every_entry_has_ci_cases():
    for e in audit.ENTRIES:
        cases = e.cases()
        assert any(c.ci for c in cases), f"{e.op}: no case in the CI subset"
        assert len({(c.label, tuple(c.dtypes.items()), c.allow_tf32) for c in cases}) == len(cases), e.op


# ------------------------------------------------------ reading the machine code
_PTX = """
.version 8.4
.target sm_90a
	.loc	1 20 9                          // k.py:20:9
	// begin inline asm
	.loc	1 21 9
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	// end inline asm
	.loc	1 22 9
	ld.global.b64 { %rd5 }, [ %rd6 + 0 ];
	.loc	1 23 5
	cp.async.cg.shared.global [ %r9 + 0 ], [ %rd7 + 0 ], 0x10, %r10;
	.loc	1 24 5
	@%p2 st.global.b16 [ %rd8 + 0 ], { %rs1 };
	wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%r1}, %rd1, %rd2, p, 1, 1, 1, 1;
	.file	1 "/src/k.py"
"""

_TTGIR = """
    %x = tt.load %p : tensor<1024x!tt.ptr<f32>, #blocked> loc(#loc3)
    %n = tt.load %q {tt.divisibility = dense<16> : tensor<1xi32>} : !tt.ptr<i64> loc(#loc4)
    tt.store %r, %v, %m : tensor<1024x!tt.ptr<f16>, #blocked> loc(#loc5)
#loc1 = loc("/src/k.py":20:9)
#loc2 = loc("/src/k.py":22:9)
#loc3 = loc("x"(#loc1))
#loc4 = loc(callsite(#loc2 at #loc1))
#loc6 = loc("/src/k.py":24:5)
#loc5 = loc(callsite(#loc6 at #loc1))
"""


def test_ptx_accesses_widths_and_positions():
    acc = audit._ptx_accesses(_PTX)
    assert [(a["kind"], a["bits"], a["where"][1]) for a in acc] == [
        ("load", 128, 20),   # inside inline asm: the position of the asm statement
        ("load", 64, 22),
        ("load", 128, 23),   # cp.async of 16 bytes
        ("store", 16, 24),
    ]
    assert acc[0]["where"][0] == "/src/k.py"


def test_ttgir_accesses_tensor_scalar_masked():
    tt = audit._ttgir_accesses(_TTGIR)
    assert tt[("/src/k.py", 20, 9)] == {"tensor": True, "masked": False, "op": "tt.load"}
    assert tt[("/src/k.py", 22, 9)] == {"tensor": False, "masked": False, "op": "tt.load"}
    assert tt[("/src/k.py", 24, 5)] == {"tensor": True, "masked": True, "op": "tt.store"}


def test_check_flags_each_problem():
    clean = {"op": "abs_outer_accumulate_", "compiled": True, "error": None, "spill_bytes": 0, "smem_bytes": 1024,
             "smem_limit": 2048, "scalars_runtime": True, "scalar_args": {"alpha": "fp32"}, "full_chunk_path": None,
             "load_bits": [128, 128], "store_bits": [128, 128], "dtypes": {"a": "f16", "b": "bf16"},
             "mma": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "expect": ["vector_io", "tensor_cores"],
             "arch": 80}
    assert audit.check(clean) == []
    for change, word in [({"spill_bytes": 8}, "spills"), ({"smem_bytes": 4096}, "shared memory"),
                         ({"mma": None}, "tensor-core"), ({"scalars_runtime": False}, "runtime"),
                         ({"load_bits": [16, 128]}, "128 bits"),
                         ({"op": "penalty_grad_", "full_chunk_path": True, "store_bits": [32, 128]}, "full-chunk"),
                         ({"compiled": False, "error": "boom"}, "does not compile")]:
        problems = audit.check({**clean, **change})
        assert problems and any(word in p for p in problems), (change, problems)


# ------------------------------------------------------- the launch path, warm
class _Stub:
    """Stands in for a Triton kernel: records each launch's grid and arguments instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
        return launch


_SYNCING = ["item", "tolist", "cpu", "numpy", "to", "__bool__", "__int__", "__float__", "__index__"]


@pytest.fixture
def sync_counter():
    """Counts calls that would make the host wait for a device (on CUDA tensors): ``.item()``, ``bool(t)``, ..."""
    calls = []
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}
    saved_sync = torch.cuda.synchronize

    def wrap(name):
        original = saved[name]

        def counted(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return counted

    def start():
        for name in _SYNCING:
            setattr(torch.Tensor, name, wrap(name))
        torch.cuda.synchronize = lambda *a, **k: calls.append("synchronize")

    def stop():
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        torch.cuda.synchronize = saved_sync

    yield calls, start, stop
    stop()


@pytest.fixture
def launch_path(monkeypatch):
    pytest.importorskip("triton")
    from mas_kernels.ops.triton import _table, multi_tensor

    stubs = {"penalty": _Stub(), "abs": _Stub()}
    monkeypatch.setattr(multi_tensor, "_penalty_grad_kernel", stubs["penalty"])
    monkeypatch.setattr(multi_tensor, "_abs_accumulate_kernel", stubs["abs"])
    uploads = []
    upload = _table._upload
    monkeypatch.setattr(_table, "_upload", lambda host, device, out=None: uploads.append(host.numel()) or
                        upload(host, device, out))
    _table.clear()
    return multi_tensor, stubs, uploads


def _penalty_lists(sizes, dtype=torch.float32):
    params = [torch.randn(n, dtype=dtype) for n in sizes]
    anchors = [torch.randn(n, dtype=dtype) for n in sizes]
    omegas = [torch.rand(n) for n in sizes]
    grads = [torch.zeros(n, dtype=dtype) for n in sizes]
    return params, anchors, omegas, grads


def test_penalty_warm_call_reuses_the_table_without_sync(launch_path, sync_counter):
    mt, stubs, uploads = launch_path
    calls, start, stop = sync_counter
    sizes = [400 * 784, 400, 4000, 10]
    params, anchors, omegas, grads = _penalty_lists(sizes)
    start()
    bool(torch.ones(()))  # the counter sees what it should
    stop()
    assert calls == ["__bool__"]
    calls.clear()
    mt.penalty_grad_triton(params, anchors, omegas, 0.5, grads)  # cold: builds the table
    (grid, args, kwargs), = stubs["penalty"].launches
    assert kwargs["ALIGNED"] is True
    table_ptr = args[0].data_ptr()
    n_uploads = len(uploads)

    # Warm, same lists: nothing is copied, nothing waits, the same table is launched.
    start()
    mt.penalty_grad_triton(params, anchors, omegas, 0.5, grads)
    stop()
    assert calls == [] and len(uploads) == n_uploads
    assert stubs["penalty"].launches[-1][1][0].data_ptr() == table_ptr

    # Warm, the grads reallocated (zero_grad(set_to_none=True) + backward): one upload, of the grads' pointers.
    new_grads = [torch.zeros(n) for n in sizes]
    start()
    mt.penalty_grad_triton(params, anchors, omegas, 0.25, new_grads)
    stop()
    assert calls == []
    assert uploads[n_uploads:] == [len(sizes)]
    grid, args, kwargs = stubs["penalty"].launches[-1]
    assert args[0].data_ptr() == table_ptr
    assert args[3].tolist() == [g.data_ptr() for g in new_grads]   # the grads' slot now points at them
    assert args[0].tolist() == [p.data_ptr() for p in params]
    assert args[8] == 0.5  # 2 * lam, a runtime argument


def test_abs_accumulate_warm_call_without_sync(launch_path, sync_counter):
    mt, stubs, uploads = launch_path
    calls, start, stop = sync_counter
    omegas = [torch.zeros(n) for n in (5000, 7)]
    grads = [torch.randn(n, dtype=torch.bfloat16) for n in (5000, 7)]
    mt.abs_accumulate_triton(omegas, grads, 1.0)
    n_uploads = len(uploads)
    start()
    mt.abs_accumulate_triton(omegas, grads, 1.0)
    mt.abs_accumulate_triton(omegas, [g.clone() for g in grads], 0.5)
    stop()
    assert calls == []
    assert uploads[n_uploads:] == [2]  # only the new tensors' pointers
    assert [la[2]["ALIGNED"] for la in stubs["abs"].launches] == [True] * 3


def test_misaligned_views_take_the_masked_path(launch_path):
    mt, stubs, _ = launch_path
    params, anchors, omegas, grads = _penalty_lists([3000, 3000, 10])
    omegas[1] = torch.rand(3001)[1:]  # 4 bytes into its storage: not 16-byte aligned
    mt.penalty_grad_triton(params, anchors, omegas, 0.5, grads)
    launches = stubs["penalty"].launches
    assert [la[2]["ALIGNED"] for la in launches] == [True, False]
    aligned, masked = launches
    assert aligned[1][2].tolist() == [omegas[0].data_ptr(), omegas[2].data_ptr()]
    assert masked[1][2].tolist() == [omegas[1].data_ptr()]
    assert masked[0] == (2,)  # 3000 elements: two chunks of 2048


def test_optimizer_step_warm_call_reuses_the_table(monkeypatch, sync_counter):
    # mk.optim's Adam step on the Triton path: a warm call with the same tensors uploads nothing and
    # reads no device value; the one host read is of the step counts, which torch.optim keeps on the
    # CPU (a list of 0-dim CPU tensors: no device synchronization). lr and the bias corrections
    # change every step and are plain arguments of the launch.
    pytest.importorskip("triton")
    from mas_kernels.ops.triton import _table, optim_step

    stub = _Stub()
    monkeypatch.setattr(optim_step, "_adam_kernel", stub)
    uploads = []
    upload = _table._upload
    monkeypatch.setattr(_table, "_upload", lambda host, device, out=None: uploads.append(host.numel()) or
                        upload(host, device, out))
    _table.clear()
    calls, start, stop = sync_counter
    sizes = [400 * 784, 400, 4000, 10]
    params, anchors, omegas, grads = _penalty_lists(sizes)
    m, v = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
    steps = [torch.tensor(0.0) for _ in sizes]

    def call(lr):
        return optim_step.adam_penalty_step_triton(params, grads, m, v, [], steps, anchors, omegas, 0.5, lr, 0.9,
                                                   0.999, 1e-8, 0.01, True, False)

    call(1e-3)  # cold: builds the table
    n_uploads = len(uploads)
    start()
    call(2e-3)
    stop()
    assert calls == ["tolist"] and len(uploads) == n_uploads
    (_, args1, kw1), (_, args2, kw2) = stub.launches
    assert args1[0].data_ptr() == args2[0].data_ptr() and kw1["ALIGNED"] and kw2["ALIGNED"]
    # neg_step_size = -lr / (1 - beta1^step): step 1 with lr 1e-3, then step 2 with lr 2e-3
    assert args1[18] == pytest.approx(-1e-3 / 0.1) and args2[18] == pytest.approx(-2e-3 / (1 - 0.81))
    assert [s.item() for s in steps] == [2.0] * 4
