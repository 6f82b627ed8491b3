"""Copies of a MAS wrapper: ``copy.copy``, ``copy.deepcopy``, ``pickle`` and ``torch.save``.

A copy is rebuilt from the wrapper's options, its model and its state's
values (never its hooks or its flat buffers' views, which would point at the
original's storage): ``deepcopy`` wraps the deep copy of the model (the one in
``memo`` when the model is copied in the same call), ``copy`` the same model.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


class Copyable:
    """The copy protocol of ``MAS`` (it provides ``_options``, ``_setup``, ``_checked_state``, ``_build``)."""

    def _snapshot(self) -> dict[str, Any]:
        if self._handles:
            raise RuntimeError("MAS: cannot copy or pickle a wrapper while estimate()/accumulating() is open; "
                               "copy it after the block")
        state = self._checked_state()
        state.settle()
        values = state.state_dict()
        values["pending"] = state.pending
        return {"options": dataclasses.replace(self._options, lam=self._lam), "model": self.wrapper,
                "state": values, "tracked": list(self._params)}

    def _restore(self, snap: dict[str, Any], process_group) -> None:
        self._options = snap["options"]
        self._setup(snap["model"], process_group, snap.get("tracked", ()))
        values = dict(snap["state"])
        pending = values.pop("pending", None)
        dtypes = {n: t.dtype for n, t in values["anchors"].items()}
        if any(self._state_.anchors[n].dtype != d for n, d in dtypes.items() if n in self._state_.anchors):
            self._build(self._params, anchor_dtypes=dtypes)  # theta* in the dtypes the original holds
        self._state_.load_state_dict(values, "MAS (copy)")
        self._state_.pending = pending

    def __getstate__(self) -> dict[str, Any]:
        """For pickle and ``torch.save``: the settings, the model and the state's values (not the hooks)."""
        if self.process_group not in (None, False):
            raise TypeError("MAS: a wrapper with a process_group cannot be pickled (a process group belongs to "
                            "its process); pickle the model and mas.state_dict(), or use mas.save()")
        return self._snapshot()

    def __setstate__(self, snap: dict[str, Any]) -> None:
        self._restore(snap, None)

    def __deepcopy__(self, memo: dict):
        """An independent wrapper on a deep copy of the model, with a copy of the state; a process group is shared."""
        snap = self._snapshot()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new._restore(copy.deepcopy(snap, memo), self.process_group)
        return new

    def __copy__(self):
        """An independent wrapper on the same model, with a copy of the state."""
        new = type(self).__new__(type(self))
        new._restore(self._snapshot(), self.process_group)
        return new
