"""Training add-ons that carry state across a resume, behind one protocol (Lightning's `Callback.state_dict` /
`load_state_dict`), and the named registry that `last.pt`'s training state is built from.

An add-on is registered once, by name, for the whole run (early stopping, the weight average, the fp16 gradient
scaler) or for one phase (the optimizer and its schedule, rebuilt when a phase starts). Saving iterates the
registry and restoring iterates the same registry, so a new stateful add-on is its class plus one
`register(...)` line: `FitState`, the checkpoint writer and the resume code stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

PROGRESS_FIELDS = ("epoch", "phase", "phase_epoch", "finished")  # FitState's own entries in last.pt: no add-on may take them


@runtime_checkable
class Stateful(Protocol):
    """What an add-on keeps for an exact resume: plain types and tensors, so `torch.load(weights_only=True)` reads it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AddOns:
    """The run's stateful add-ons by name, each living for the whole run or for one phase.

    States are saved and restored in registration order (the optimizer before the schedule that sets its rates).
    """

    def __init__(self) -> None:
        self._run: dict[str, Stateful] = {}
        self._phase: dict[str, Stateful] = {}

    @property
    def names(self) -> list[str]:
        return [*self._run, *self._phase]

    def register(self, name: str, addon: Stateful | None, *, per_phase: bool = False) -> None:
        """Add `addon` under `name` (None: the recipe does not use it). `per_phase` ones are dropped by `start_phase`."""
        if addon is None:
            return
        if name in PROGRESS_FIELDS or name in self.names:
            taken = [*PROGRESS_FIELDS, *self.names]
            raise ValueError(f"training add-on name {name!r} is already taken; taken names: {', '.join(taken)}")
        if not isinstance(addon, Stateful):
            raise TypeError(f"training add-on {name!r} ({type(addon).__name__}) needs state_dict() and load_state_dict()")
        (self._phase if per_phase else self._run)[name] = addon

    def start_phase(self) -> None:
        """Forget the previous phase's add-ons; the new phase registers its own."""
        self._phase = {}

    def state_dict(self, *, with_phase: bool = True) -> dict[str, dict[str, Any]]:
        """Every add-on's state by name; without the phase's ones when the next resume starts a new phase."""
        members = {**self._run, **self._phase} if with_phase else self._run
        return {name: addon.state_dict() for name, addon in members.items()}

    def load_run_state(self, stored: Mapping[str, Any]) -> None:
        """Restore the whole-run add-ons from a resumed run's states."""
        _load(self._run, stored)

    def load_phase_state(self, stored: Mapping[str, Any]) -> None:
        """Restore this phase's add-ons, when a run resumes inside the phase."""
        _load(self._phase, stored)


def _load(members: Mapping[str, Stateful], stored: Mapping[str, Any]) -> None:
    for name, addon in members.items():
        if name in stored:
            addon.load_state_dict(stored[name])
        else:  # an add-on newer than the checkpoint, or one the checkpoint's device did not use
            log.warning(
                "last.pt holds no state for %s; it starts afresh, so this resume may differ from an uninterrupted run", name
            )
