"""Training add-ons: one state_dict protocol, a named registry, and a resume state that covers every registered add-on."""

import logging
from typing import Any

import pytest
import torch

from finetune import train
from finetune.training import loop as loop_module
from finetune.training import precision as precision_module
from finetune.training.addons import PROGRESS_FIELDS, AddOns
from finetune.training.loop import FitState

from conftest import tiny_recipe

TWO_PHASES = {
    "phases": [{"epochs": 1, "train": ["head"], "lr": 0.01}, {"epochs": 2, "train": ["layer4", "head"], "lr": 0.003}],
    "warmup_epochs": 0.5,
}


class Counter:
    """A made-up add-on: counts how often its state was taken (once per epoch, for last.pt)."""

    def __init__(self) -> None:
        self.count = 0
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        self.count += 1
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)
        self.count = state["count"]


def test_registry_saves_and_restores_by_name_and_refuses_taken_names():
    addons = AddOns()
    run, phase = Counter(), Counter()
    addons.register("run_counter", run)
    addons.register("off", None)  # not in this recipe: not registered
    addons.register("phase_counter", phase, per_phase=True)
    assert addons.names == ["run_counter", "phase_counter"]
    assert addons.state_dict() == {"run_counter": {"count": 1}, "phase_counter": {"count": 1}}
    assert addons.state_dict(with_phase=False) == {"run_counter": {"count": 2}}
    with pytest.raises(ValueError, match=r"training add-on name 'run_counter' is already taken; taken names: epoch, .*"):
        addons.register("run_counter", Counter(), per_phase=True)
    with pytest.raises(ValueError, match=r"training add-on name 'epoch' is already taken"):
        addons.register("epoch", Counter())
    with pytest.raises(TypeError, match=r"training add-on 'plain' \(object\) needs state_dict\(\) and load_state_dict\(\)"):
        addons.register("plain", object())  # type: ignore[arg-type]

    fresh = AddOns()
    restored_run, restored_phase = Counter(), Counter()
    fresh.register("run_counter", restored_run)
    fresh.register("phase_counter", restored_phase, per_phase=True)
    fresh.load_run_state({"run_counter": {"count": 7}, "phase_counter": {"count": 3}})
    assert restored_run.loaded == {"count": 7} and restored_phase.loaded is None  # the phase's wait for their phase
    fresh.load_phase_state({"run_counter": {"count": 7}, "phase_counter": {"count": 3}})
    assert restored_phase.loaded == {"count": 3}
    fresh.start_phase()
    assert fresh.names == ["run_counter"]


def test_an_add_on_missing_from_the_checkpoint_starts_afresh_with_a_warning(caplog):
    addons = AddOns()
    counter = Counter()
    addons.register("newer", counter)
    with caplog.at_level(logging.WARNING, logger="finetune.training.addons"):
        addons.load_run_state({"stopping": {}})
    assert counter.loaded is None
    assert "last.pt holds no state for newer; it starts afresh" in caplog.text


def test_fit_state_keeps_any_add_on_beside_the_progress_fields():
    state = FitState(epoch=2, phase=1, phase_epoch=1, addons={"anything": {"x": torch.ones(2)}, "stopping": {"best": 0.5}})
    stored = state.to_dict()
    assert set(stored) == {*PROGRESS_FIELDS, "anything", "stopping"}  # the layout last.pt has always had
    again = FitState.from_payload({"training_state": stored})
    assert (again.epoch, again.phase, again.phase_epoch, again.finished) == (2, 1, 1, False)
    assert set(again.addons) == {"anything", "stopping"} and torch.equal(again.addons["anything"]["x"], torch.ones(2))


def _last(run) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


class _Crash(Exception):
    pass


def test_a_registered_add_on_is_saved_and_restored_without_touching_the_loop(tmp_path, image_folder, monkeypatch):
    """A new add-on is one registration: last.pt holds it (and nothing is left out), and a resume hands it back."""
    registries: list[AddOns] = []
    counters: list[Counter] = []

    class WithCounters(AddOns):  # the loop's own registry, plus one add-on per lifetime
        def __init__(self) -> None:
            super().__init__()
            counters.append(Counter())
            self.register("counter", counters[-1])
            registries.append(self)

        def start_phase(self) -> None:
            super().start_phase()
            self.register("phase_counter", Counter(), per_phase=True)

    monkeypatch.setattr(loop_module, "AddOns", WithCounters)
    recipe = tiny_recipe(train=TWO_PHASES)
    seen: dict[int, set[str]] = {}

    def crash_after_epoch_2(state: FitState) -> None:
        seen[state.epoch] = set(state.addons)
        if state.epoch == 2:
            raise _Crash()

    full = train(recipe=recipe, data=image_folder, out=tmp_path / "full", progress=False)
    with pytest.raises(_Crash):
        train(recipe=recipe, data=image_folder, out=tmp_path / "cut", progress=False, on_epoch_end=crash_after_epoch_2)
    cut = registries[-1]
    assert seen[1] == {"counter", "stopping", "precision"}  # the end of phase 1: the next phase builds its own optimizer
    assert seen[2] == set(cut.names) == {"counter", "stopping", "precision", "phase_counter", "optimizer", "scheduler"}
    stored = _last(tmp_path / "cut")["training_state"]
    assert set(stored) == {*PROGRESS_FIELDS, *cut.names}  # every registered add-on, and nothing else
    assert stored["counter"] == {"count": 2} and stored["phase_counter"] == {"count": 1}

    resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    assert counters[-1].loaded == {"count": 2}
    a, b = _last(full.run_dir), _last(resumed.run_dir)
    assert a["training_state"]["counter"] == b["training_state"]["counter"] == {"count": 3}
    assert a["training_state"]["phase_counter"] == b["training_state"]["phase_counter"] == {"count": 2}
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_fp16_resume_continues_the_loss_scale(tmp_path, image_folder, monkeypatch):
    """fp16's gradient scaler is an add-on: a resumed run skips (and scales) the same steps as an uninterrupted one.

    CPU autocast stands in for CUDA's fp16 here; the scaler backs off in the first steps, so a fresh one would not.
    """
    monkeypatch.setattr(precision_module.devices, "autocast_dtype", lambda amp, device: torch.float16)
    recipe = tiny_recipe(train={"epochs": 2, "lr": 0.01})

    def crash_after_epoch_1(state: FitState) -> None:
        if state.epoch == 1:
            raise _Crash()

    full = train(recipe=recipe, data=image_folder, out=tmp_path / "full", progress=False)
    with pytest.raises(_Crash):
        train(recipe=recipe, data=image_folder, out=tmp_path / "cut", progress=False, on_epoch_end=crash_after_epoch_1)
    assert _last(tmp_path / "cut")["training_state"]["scaler"]["scale"] < 65536.0  # it backed off from its start
    resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    a, b = _last(full.run_dir), _last(resumed.run_dir)
    assert a["training_state"]["scaler"] == b["training_state"]["scaler"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
