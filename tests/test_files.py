"""Files that never clobber and never load wrong (issue 21, items 13-17).

Each test breaks a promise of ``MAS.save``/``MAS.load`` the way a user, a
full disk or a killed process would, and checks that the call is refused by
name with nothing changed (the state, the target, the folder). Expected
states come from the wrapper that saved (``_same_state``), never from the
loader under test.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch
from torch import nn

import mas_kernels as mk
from mas_kernels import checkpoint

F64 = torch.float64


def _trained(**kwargs):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    mas = mk.MAS(model, importance="global_batch", **kwargs)
    mas.estimate([torch.randn(8, 6)]).consolidate()
    mas.estimate([torch.randn(3, 6)])  # an open task: the accumulator and num_samples are state too
    return model, mas


def _snapshot(mas):
    sd = mas.state_dict()
    return {k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in sd.items()}


def _same_state(mas, sd):
    now = mas.state_dict()
    for part in checkpoint.PARTS:
        for n, t in sd[part].items():
            assert torch.equal(now[part][n], t), (part, n)
    for key in ("num_samples", "num_batches", "samples_consolidated", "num_tasks"):
        assert now[key] == sd[key], key


# ------------------------------------------------------- 13. values beyond the range they load into
@pytest.mark.parametrize("part,name", [("omega", "0.weight"), ("anchors", "2.bias"), ("accumulator", "2.weight")])
def test_float64_beyond_float32_range_refused_by_name(tmp_path, part, name):
    # A float64 value of 1e39 would load into float32 storage as inf (and the penalty as NaN).
    model, mas = _trained()
    target = mk.MAS(model, importance="global_batch")
    before = _snapshot(target)
    sd = mas.state_dict()
    sd[part] = {n: t.to(F64) for n, t in sd[part].items()}
    sd[part][name] = sd[part][name].clone()
    sd[part][name].view(-1)[0] = 1e39
    match = rf"MAS.load_state_dict: {part}\['{name}'\] has values beyond the range of torch.float32"
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    _same_state(target, before)
    # The same through a file.
    parts = {p: sd[p] for p in checkpoint.PARTS}
    checkpoint.write(tmp_path / "big.st", parts, {k: sd[k] for k in ("num_samples", "num_batches",
                                                                    "samples_consolidated", "num_tasks")})
    with pytest.raises(ValueError, match=match.replace("load_state_dict", "load_state_dict")):
        target.load(tmp_path / "big.st")
    _same_state(target, before)


def test_float64_values_load_into_a_float64_state():
    # The range is the storage's: a float64 state takes them.
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    mas = mk.MAS(model, importance="global_batch", omega_dtype=F64)
    mas.estimate([torch.randn(8, 6, dtype=F64)]).consolidate()
    sd = mas.state_dict()
    sd["omega"]["0.weight"].view(-1)[0] = 1e39
    other = mk.MAS(model, importance="global_batch", omega_dtype=F64)
    other.load_state_dict(sd)
    assert other.omega["0.weight"].view(-1)[0].item() == 1e39


def test_bfloat16_storage_refuses_what_would_round_to_inf():
    model, mas = _trained()
    target = mk.MAS(model, importance="global_batch", omega_dtype=torch.bfloat16)
    sd = mas.state_dict()
    sd["omega"]["2.bias"] = sd["omega"]["2.bias"].clone()
    sd["omega"]["2.bias"][0] = torch.finfo(torch.float32).max  # finite in float32, inf in bfloat16
    with pytest.raises(ValueError, match=r"omega\['2.bias'\] has values beyond the range of torch.bfloat16"):
        target.load_state_dict(sd)


# ------------------------------------------------------- 14. the header's counts under a checksum
def _header(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data, 8, 8 + n


FIELDS = {
    # field: (its value as written in the header's JSON, the same length changed)
    "num_tasks": ('"num_tasks":"1"', '"num_tasks":"0"'),
    "num_samples": ('"num_samples":"3"', '"num_samples":"9"'),
    "num_batches": ('"num_batches":"1"', '"num_batches":"0"'),
    "samples_consolidated": ('"samples_consolidated":"8"', '"samples_consolidated":"0"'),
    "lam": ('"lam":"1.0"', '"lam":"9.0"'),
    "combine": ('"combine":"\\"sum\\""', '"combine":"\\"sux\\""'),
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_one_flipped_header_byte_is_refused_by_name(tmp_path, field):
    # "num_tasks":"1" -> "0" used to load silently and turn the penalty off.
    model, mas = _trained()
    path = tmp_path / "state.st"
    mas.save(path)
    data, start, end = _header(path)
    header = data[start:end].decode()
    old, new = FIELDS[field]
    assert header.count(old) == 1, (old, header)
    (tmp_path / "flipped.st").write_bytes(data[:start] + header.replace(old, new).encode() + data[end:])
    other = mk.MAS(model, importance="global_batch")
    before = _snapshot(other)
    with pytest.raises(ValueError, match=rf"MAS.load: .* is corrupt: its metadata field '{field}'"):
        other.load(tmp_path / "flipped.st")
    _same_state(other, before)
    other.load(path)  # the original loads
    _same_state(other, mas.state_dict())


def test_header_field_added_or_removed_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, mas = _trained()
    path = tmp_path / "state.st"
    mas.save(path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    other = mk.MAS(model, importance="global_batch")
    save_file(tensors, str(tmp_path / "more.st"), metadata={**meta, "num_tasks2": "5"})
    with pytest.raises(ValueError, match="metadata field 'num_tasks2' is not one it was written with"):
        other.load(tmp_path / "more.st")
    save_file(tensors, str(tmp_path / "less.st"), metadata={k: v for k, v in meta.items() if k != "num_batches"})
    with pytest.raises(ValueError, match="metadata field 'num_batches' is missing"):
        other.load(tmp_path / "less.st")
    assert other.num_tasks == 0


# ------------------------------------------------------- 15. only regular files are replaced
def _fifo(path):
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["fifo", "folder", "link to a fifo", "link to a folder"])
def test_save_onto_anything_but_a_regular_file_is_refused_unchanged(tmp_path, kind):
    _, mas = _trained()
    (tmp_path / "real").mkdir()
    thing = tmp_path / "real" / "thing"
    if "fifo" in kind:
        _fifo(thing)
    else:
        thing.mkdir()
    path = thing if not kind.startswith("link") else tmp_path / "link.st"
    if kind.startswith("link"):
        path.symlink_to(thing)
    code = errno.EISDIR if "folder" in kind else errno.EINVAL
    what = "a folder" if "folder" in kind else "a FIFO"
    with pytest.raises(OSError, match=rf"MAS.save: '.*(link.st|thing)'.* is {what}, not a regular file") as exc:
        mas.save(path)
    assert exc.value.errno == code and exc.value.filename == str(path)
    assert (stat.S_ISFIFO if "fifo" in kind else stat.S_ISDIR)(os.stat(thing).st_mode)
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["thing"]  # no temp file either
    if "folder" in kind:
        assert not list(thing.iterdir())


def test_load_of_a_folder_or_fifo_is_an_oserror_naming_the_call_and_path(tmp_path):
    _, mas = _trained()
    before = _snapshot(mas)
    with pytest.raises(IsADirectoryError, match="MAS.load: .* is a folder, not a regular file") as exc:
        mas.load(tmp_path)
    assert exc.value.filename == str(tmp_path)
    with pytest.raises(OSError, match="MAS.load: .* is a FIFO, not a regular file"):  # would block forever
        mas.load(_fifo(tmp_path / "pipe"))
    _same_state(mas, before)


# ------------------------------------------------------- 16. temp files of killed saves
def test_temp_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    # A real process dies (SIGKILL) with its temp file written: the next save of that target removes it.
    _, mas = _trained()
    target = tmp_path / "state.st"
    prefix = checkpoint._temp_prefix(os.path.realpath(target))
    child = ("import os, sys; f = open(os.path.join(sys.argv[1], sys.argv[2] + str(os.getpid()) + '.x1.mas-tmp'), 'wb'); "
             "f.write(b'half a state'); f.flush(); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path), prefix], timeout=60)
    assert proc.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(prefix) and left[0].endswith(".mas-tmp")
    # A running save of the same target in another process (pid 1 is alive), one of another
    # target, and an unrelated file stay.
    alive = tmp_path / f"{prefix}1.x2.mas-tmp"
    other = tmp_path / f"{checkpoint._temp_prefix(str(tmp_path / 'other.st'))}{proc_pid_dead()}.x3.mas-tmp"
    mine = tmp_path / "notes.txt"
    for p in (alive, other, mine):
        p.write_bytes(b"x")
    mas.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["state.st", alive.name, other.name, mine.name])
    mk.MAS(mas.module, importance="global_batch").load(target)


def proc_pid_dead() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    return int(proc.stdout)


# ------------------------------------------------------- 17. a full disk, named
def test_full_disk_is_an_oserror_naming_the_call_and_the_path(tmp_path, monkeypatch):
    # safetensors reports a full disk as its own SafetensorError ("... (os error 28)"), which named
    # neither MAS.save nor the path; the message below is the one it gives on a full tmpfs.
    import safetensors.torch as st
    from safetensors import SafetensorError

    _, mas = _trained()
    path = tmp_path / "keep.st"
    path.write_bytes(b"old contents")

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"part")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError, match=r"MAS.save: writing .*keep.st.* failed \(No space left on device\)") as exc:
        mas.save(path)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(path)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.st"]


def test_lam_and_counts_round_trip(tmp_path):
    # The checksummed header still round-trips every field.
    _, mas = _trained(lam=0.37)
    mas.save(tmp_path / "s.st")
    parts, meta = checkpoint.read(tmp_path / "s.st")
    assert meta["lam"] == 0.37 and meta["num_tasks"] == 1 and meta["num_samples"] == 3
    assert set(meta["checksums"]["meta"]) == set(meta) - {"checksums"}
    assert not math.isnan(meta["lam"]) and json.dumps(meta["lam"]) == "0.37"
