"""The one file format of a MAS state: safetensors, no pickle; the one writer and the one reader.

A file holds ``omega/<name>``, ``anchors/<name>`` and ``accumulator/<name>``
tensors (``<name>`` the parameter's ``named_parameters()`` name) and JSON
metadata: ``format`` = :data:`FORMAT`, the wrapper's settings and counts, and
``checksums``: a CRC32 of each part's tensors (names, dtypes, shapes, bytes)
and, under ``"meta"``, one of each other metadata field as written (the
counts, ``lam``, the settings), so a flipped byte anywhere is named.

:func:`write` guarantees, for the path the user gave:

* a reader never sees a torn file: the bytes go into one temp file in the
  target's folder, which is fsynced and then renamed into place (the folder
  is fsynced after the rename, so the new name survives a crash); on any
  failure the temp file is removed and the target is untouched;
* a temp file left by a save that was killed (its process gone) is removed by
  the next save of the same target: temp files are named
  ``.<target>.<host>.<pid>.<random>.mas-tmp`` (:func:`_temp_prefix`);
* only a regular file (or a symlink to one) is replaced: a folder, a FIFO or
  a device node (``/dev/null``) is refused before anything is written;
* a file it replaces keeps its permission bits; a new file gets the umask's
  default (``0o666 & ~umask``), as ``open()`` would give it;
* a symlink is written through: its target is replaced, the link stays;
* errors are ``OSError`` naming the call and the user's path (a missing or
  read-only folder says which, a full disk says so).

:func:`read` checks the path (a regular file), the container, the format and
the checksums (files written before checksums existed still load) before
handing the parts back; the caller checks names, shapes and values before it
changes anything.
"""

from __future__ import annotations

import errno
import functools
import json
import numbers
import os
import re
import socket
import stat
import tempfile
import zlib
from typing import Any

import torch

FORMAT = "mas_kernels.MAS/1"
PARTS = ("omega", "anchors", "accumulator")


def check_path(path, who: str) -> str:
    """``path`` as a ``str``; ``TypeError`` naming it for anything else (bytes included)."""
    raw = os.fspath(path) if isinstance(path, os.PathLike) else path
    if isinstance(raw, bytes):
        raise TypeError(f"{who}: path must be a str or a pathlib.Path, got bytes {raw!r}; "
                        f"pass {raw!r}.decode() (or os.fsdecode(path))")
    if not isinstance(raw, str):
        raise TypeError(f"{who}: path must be a str or a pathlib.Path, got {type(path).__name__}")
    if not raw:
        raise ValueError(f"{who}: path is empty")
    return raw


def _bytes(t: torch.Tensor):
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def checksum(named: dict[str, torch.Tensor]) -> str:
    """CRC32 of the tensors (sorted by name: name, dtype, shape, then the bytes), as 8 hex digits."""
    crc = 0
    for name in sorted(named):
        t = named[name].detach().contiguous().cpu()
        crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(_bytes(t), crc)
    return f"{crc:08x}"


def _gf2_times(mat: tuple, vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: tuple) -> tuple:
    return tuple(_gf2_times(mat, mat[n]) for n in range(32))


@functools.lru_cache(maxsize=4096)
def _zeros_operator(length: int) -> tuple:
    """The GF(2) matrix that advances a CRC32 over ``length`` zero bytes (zlib's crc32_combine, by squaring)."""
    op = tuple([0xEDB88320] + [1 << n for n in range(31)])  # one zero bit
    op = _gf2_square(_gf2_square(op))  # four zero bits
    result = None
    while length:
        op = _gf2_square(op)  # one zero byte, then 2, 4, ... bytes
        if length & 1:
            result = op if result is None else tuple(_gf2_times(op, result[n]) for n in range(32))
        length >>= 1
    return result


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and ``len2 = len(b)``
    (zlib's ``crc32_combine``, which Python's zlib does not expose): ranks that each read a slice of a tensor
    check the file's CRC32 of the whole tensor together."""
    if len2 <= 0:
        return crc1
    return _gf2_times(_zeros_operator(len2), crc1) ^ crc2


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it straight back)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a folder that cannot be opened (e.g. on Windows) cannot be fsynced either
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):  # file systems without it
            raise
    finally:
        os.close(fd)


def _named_error(exc: OSError, who: str, what: str, path: str) -> OSError:
    return type(exc)(exc.errno, f"{who}: {what} ({exc.strerror})", path)


_OS_ERROR = re.compile(r"os error (\d+)")


def _io_error(exc: Exception) -> OSError | None:
    """safetensors' own error for a failed read or write (``SafetensorError: ... (os error 28)``) as the
    ``OSError`` it stands for (the subclass for its errno); None when it is not an I/O error."""
    if isinstance(exc, OSError):
        return exc
    found = _OS_ERROR.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(path: str, target: str, who: str, verb: str) -> os.stat_result | None:
    """``os.stat(target)``, or None when it does not exist; an ``OSError`` naming ``who`` and ``path``
    when it is anything but a regular file (a folder, a FIFO, ``/dev/null``...)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        return st
    kind = _kind(st.st_mode)
    code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
    via = "" if target == os.path.abspath(path) else f" ({target!r}, where it leads)"
    err = OSError(code, os.strerror(code))
    raise type(err)(code, f"{who}: {path!r}{via} is {kind}, not a regular file; {who} {verb} regular files only, "
                          "so nothing was done", path)


def _temp_prefix(target: str) -> str:
    """The start of the names of ``target``'s temp files: ``.<name>.<host>.`` (then ``<pid>.<random>.mas-tmp``)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
    return f".{os.path.basename(target)[:120]}.{host}."


def _remove_stale_temps(folder: str, prefix: str) -> None:
    """Remove the temp files of earlier saves of the target whose process is gone (killed mid-save).

    Only this host's (the pid is checked here, and another host's save may be
    running on a shared folder) and only of dead processes (a running save in
    another process keeps its file).
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".mas-tmp")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass  # gone already, or not ours to remove


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def write(path: str | os.PathLike, parts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
          who: str = "MAS.save") -> None:
    """Write ``parts`` (``{part: {name: tensor}}``) and ``meta`` (JSON-able values) to ``path`` atomically."""
    from safetensors.torch import save_file

    path = check_path(path, who)
    target = os.path.realpath(path)  # through a symlink: the link stays and its target is replaced
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"{who}: the folder {folder!r} does not exist; create it first", path)
    existing = _check_regular(path, target, who, "writes")
    tensors = {}
    for part, named in parts.items():
        for name, t in named.items():
            tensors[f"{part}/{name}"] = t.detach().contiguous().cpu()
    header = {k: json.dumps(v) for k, v in {"format": FORMAT, **meta}.items()}
    sums = {part: checksum(named) for part, named in parts.items()}
    sums["meta"] = {k: _crc(v) for k, v in header.items()}
    header["checksums"] = json.dumps(sums)
    mode = 0o666 & ~_umask() if existing is None else stat.S_IMODE(existing.st_mode)
    prefix = _temp_prefix(target)
    _remove_stale_temps(folder, prefix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".mas-tmp", dir=folder)
    except OSError as exc:
        raise _named_error(exc, who, f"cannot create a file in the folder {folder!r}", path) from exc
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=header)  # streams into the one temp file (no copy in memory)
        except Exception as exc:  # noqa: BLE001 - safetensors reports I/O errors (a full disk) as its own type
            io = _io_error(exc)
            if io is None:
                raise
            raise io from exc  # named below
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, target)
        tmp = None
        _fsync_folder(folder)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError):
            raise _named_error(exc, who, f"writing {path!r} failed", path) from exc
        raise


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


class StreamWriter:
    """The same file as :func:`write`, written one tensor at a time (for sharded states: a rank holds one
    gathered parameter at a time, never the whole state), with the same guarantees: a temp file in the
    target's folder, fsynced and renamed into place (the mode kept, a symlink written through); nothing
    at ``path`` changes unless :meth:`commit` succeeds.

    Args:
        path: the target.
        entries: ``(part, name, dtype, shape)`` of every tensor, in the order :meth:`write` gets them:
            parts in :data:`PARTS` order, names sorted within a part (the checksums' order).
        meta: JSON-able metadata, as for :func:`write`.
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, torch.dtype, tuple]],
                 meta: dict[str, Any], who: str = "MAS.save"):
        self.path = check_path(path, who)
        self.who = who
        self.target = os.path.realpath(self.path)
        self.folder = os.path.dirname(self.target)
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(errno.ENOENT, f"{who}: the folder {self.folder!r} does not exist; create it "
                                    "first", self.path)
        order = sorted(range(len(entries)), key=lambda i: (PARTS.index(entries[i][0]), entries[i][1]))
        if order != list(range(len(entries))):
            raise ValueError(f"{who}: StreamWriter entries must come by part, then by sorted name")
        self.entries = list(entries)
        parts = list(dict.fromkeys(part for part, *_ in entries))
        # Fixed-width placeholders, patched with the CRC32s once every tensor is written.
        self.marks = {part: f"@@@@@@@{i}" for i, part in enumerate(parts)}
        base = {k: json.dumps(v) for k, v in {"format": FORMAT, **meta}.items()}
        sums: dict[str, Any] = dict(self.marks)
        sums["meta"] = {k: _crc(v) for k, v in base.items()}
        header_meta = {**base, "checksums": json.dumps(sums)}
        header: dict[str, Any] = {"__metadata__": header_meta}
        offset = 0
        for part, name, dtype, shape in entries:
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{who}: {part}[{name!r}] has dtype {dtype}, which the file format does not hold")
            size = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                size *= int(d)
            header[f"{part}/{name}"] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [int(d) for d in shape],
                                       "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = bytearray(len(raw).to_bytes(8, "little") + raw)
        self.crcs = {part: 0 for part in parts}
        self.next = 0
        existing = _check_regular(self.path, self.target, who, "writes")
        self.mode = 0o666 & ~_umask() if existing is None else stat.S_IMODE(existing.st_mode)
        prefix = _temp_prefix(self.target)
        _remove_stale_temps(self.folder, prefix)
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".mas-tmp", dir=self.folder)
        except OSError as exc:
            raise _named_error(exc, who, f"cannot create a file in the folder {self.folder!r}", self.path) from exc
        self.file = os.fdopen(fd, "wb")
        self._guard(lambda: self.file.write(self.header))

    def _guard(self, fn):
        try:
            return fn()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise _named_error(exc, self.who, f"writing {self.path!r} failed", self.path) from exc
            raise

    def write(self, t: torch.Tensor) -> None:
        """The next entry's tensor (its dtype and shape as declared)."""
        part, name, dtype, shape = self.entries[self.next]
        t = t.detach().contiguous().cpu()
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            self.abort()
            raise ValueError(f"{self.who}: {part}[{name!r}] is {t.dtype} {tuple(t.shape)}, declared {dtype} "
                             f"{tuple(shape)}")
        crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), self.crcs[part])
        data = _bytes(t)
        self.crcs[part] = zlib.crc32(data, crc)
        self._guard(lambda: self.file.write(data))
        self.next += 1

    def commit(self) -> None:
        """Write the checksums, fsync, and rename the file into place."""
        if self.next != len(self.entries):
            self.abort()
            raise ValueError(f"{self.who}: {len(self.entries) - self.next} tensor(s) were not written")

        def finish():
            for part, mark in self.marks.items():
                at = self.header.find(mark.encode())
                self.header[at:at + 8] = f"{self.crcs[part]:08x}".encode()
            self.file.seek(0)
            self.file.write(self.header)
            self.file.flush()
            os.fchmod(self.file.fileno(), self.mode)
            os.fsync(self.file.fileno())  # the data is on disk before the name points at it
            self.file.close()
            os.replace(self.tmp, self.target)
            self.tmp = None
            _fsync_folder(self.folder)

        self._guard(finish)

    def abort(self) -> None:
        """Remove the temp file (the target is untouched)."""
        try:
            self.file.close()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def read(path: str | os.PathLike, who: str = "MAS.load",
         parts: tuple[str, ...] = PARTS) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``({part: {name: tensor}}, metadata)`` from a file :func:`write` wrote; ``ValueError`` otherwise.

    ``parts``: which parts to read (others in the file are skipped unread).
    The checksum of each part read is verified when the file has one.
    """
    from safetensors import safe_open

    path = check_path(path, who)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"{who}: no such file", path)
    _check_regular(path, os.path.realpath(path), who, "reads")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            if raw.get("format") != json.dumps(FORMAT):
                raise ValueError(f"{who}: {path} was not written by mas_kernels.MAS.save "
                                 f"(format {raw.get('format')})")
            out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in parts}
            for key in f.keys():
                part, _, name = key.partition("/")
                if part not in PARTS or not name:
                    raise ValueError(f"{who}: {path} has an unexpected entry {key!r}")
                if part in out:
                    out[part][name] = f.get_tensor(key)
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types on bad headers / sizes, and I/O
        io = _io_error(exc)
        if io is not None:
            raise _named_error(io, who, f"reading {path!r} failed", path) from exc
        raise ValueError(f"{who}: {path} is not a readable safetensors file ({exc})") from exc
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{who}: {path} has corrupt metadata ({exc})") from exc
    sums = meta.get("checksums")
    if sums is not None:
        if not isinstance(sums, dict):
            raise ValueError(f"{who}: {path} has corrupt metadata (checksums={sums!r})")
        _check_meta_sums(raw, sums.get("meta"), who, path)
        for part, named in out.items():
            if part in sums and sums[part] != checksum(named):
                raise ValueError(f"{who}: {path} is corrupt: the checksum of its {part} tensors does not match "
                                 "the one written with them (the file changed after it was saved)")
    return out, meta


def _check_meta_sums(raw: dict[str, str], sums, who: str, path: str) -> None:
    """Each metadata field as written has the CRC32 stored for it (files written before these sums
    existed have none, and load)."""
    if sums is None:
        return
    if not isinstance(sums, dict):
        raise ValueError(f"{who}: {path} has corrupt metadata (checksums of the metadata: {sums!r})")
    for key in sorted(set(raw) - {"checksums"} | set(sums)):
        if key not in raw:
            raise ValueError(f"{who}: {path} is corrupt: its metadata field {key!r} is missing")
        if key not in sums:
            raise ValueError(f"{who}: {path} is corrupt: its metadata field {key!r} is not one it was written with")
        if sums[key] != _crc(raw[key]):
            raise ValueError(f"{who}: {path} is corrupt: its metadata field {key!r} (= {raw[key]}) does not match "
                             "the checksum written with it (the file changed after it was saved)")


def validate(state, specs: list, parts: tuple, counts: tuple, optional: dict, who: str,
             dtypes: dict[str, dict[str, torch.dtype]] | None = None) -> None:
    """Raise ``ValueError`` naming the entry at fault unless ``state`` (a ``MAS.state_dict()``, or a file's
    parts and metadata) fits the parameters ``specs`` (``(name, shape)``) exactly.

    Every field is checked: the three parts are dicts with a tensor per
    parameter name (no other names) of the parameter's shape, a float
    dtype and real data (not ``meta``); Omega, theta* and the accumulator
    are finite, Omega and the accumulator >= 0 (a negated or NaN Omega
    would turn the penalty into a reward for drift), and within the range of
    the dtype they load into (``dtypes[part][name]``: a float64 value beyond
    float32's would load as inf); the counts are integers >= 0.
    """
    if not isinstance(state, dict):
        raise ValueError(f"{who}: expected a dict from MAS.state_dict(), got {type(state).__name__}")
    for key in parts + counts:
        if key not in state and key not in optional:
            raise ValueError(f"{who}: missing entry {key!r}")
    for key in counts:
        value = state.get(key, optional.get(key))
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{who}: {key}={value!r} must be an integer >= 0")
    names = {name for name, _ in specs}
    for part in parts:
        given = state[part]
        if not isinstance(given, dict):
            raise ValueError(f"{who}: {part} must be a dict of tensors by parameter name, "
                             f"got {type(given).__name__}")
        for name, shape in specs:
            if name not in given:
                raise ValueError(f"{who}: {part} has no entry for parameter {name!r}")
            target = None if dtypes is None else dtypes.get(part, {}).get(name)
            check_tensor(who, part, name, given[name], tuple(shape), target)
        for name in given:
            if name not in names:
                raise ValueError(f"{who}: {part} has parameter {name!r}, which the model lacks")


def check_tensor(who: str, part: str, name: str, t, shape: tuple, target: torch.dtype | None = None) -> None:
    """One part's tensor for one parameter: a float tensor of its shape with real, finite data (>= 0 but for theta*),
    finite in ``target``, the dtype it will be stored in, when given."""
    where = f"{part}[{name!r}]"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{who}: {where} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{who}: {where} has shape {tuple(t.shape)}, the model's parameter has {shape}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{who}: {where} has dtype {t.dtype}, expected a float dtype")
    if t.device.type == "meta":
        raise ValueError(f"{who}: {where} is a meta tensor (no data)")
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{who}: {where} has non-finite values")
    if part != "anchors" and t.numel() and bool((t < 0).any()):
        raise ValueError(f"{who}: {where} has negative values (min {float(t.min()):.3g}); importance is >= 0, "
                         "and a negative one would turn the penalty into a reward for drift")
    if (target is not None and t.numel() and target.is_floating_point
            and torch.finfo(target).max < torch.finfo(t.dtype).max and not bool(torch.isfinite(t.to(target)).all())):
        raise ValueError(f"{who}: {where} has values beyond the range of {target}, the dtype it loads into (largest "
                         f"magnitude {float(t.abs().max()):.4g}, {target}'s largest finite value "
                         f"{torch.finfo(target).max:.4g}), which would load as inf; nothing was loaded")
