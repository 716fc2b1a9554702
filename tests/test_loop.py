import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from finetune import train
from finetune.api import predict
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import ModelConfig, PhaseConfig, TrainConfig
from finetune.errors import CheckpointError, FinetuneError, RunDirError, TrainingError
from finetune.inference.checkpoint import load_checkpoint
from finetune.models.build import build_model
from finetune.models.stages import FreezePlan, apply_freeze
from finetune.training import epoch_end as epoch_end_module
from finetune.training import loop as loop_module
from finetune.training.loop import FitState
from finetune.training.optim import build_optimizer, build_scheduler, stage_lr_multipliers

from conftest import tiny_recipe

TWO_PHASES = {
    "phases": [{"epochs": 1, "train": ["head"], "lr": 0.01}, {"epochs": 2, "train": ["layer4", "head"], "lr": 0.003}],
    "warmup_epochs": 0.5,
}


def test_layer_decay_gives_expected_stage_lrs():
    phase = PhaseConfig(epochs=1, lr=1.0, layer_decay=0.5, lr_mult={"layer1": 10.0})
    assert stage_lr_multipliers(phase) == {
        "head": 1.0,
        "layer4": 0.5,
        "layer3": 0.25,
        "layer2": 0.125,
        "layer1": 0.0625 * 10,
        "stem": 0.03125,
    }


def test_phase_changes_exactly_the_requires_grad_set_and_param_groups():
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=3)
    for phase in (
        PhaseConfig(epochs=1, train=["head"], lr=0.1),
        PhaseConfig(epochs=1, train=["layer4", "head"], lr=0.1, layer_decay=0.5),
    ):
        apply_freeze(bundle.model, FreezePlan(trainable=phase.trainable_stages()), bundle.stages)
        grads = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
        prefixes = tuple("fc" if s == "head" else s for s in phase.trainable_stages())
        assert grads == {n for n, _ in bundle.model.named_parameters() if n.startswith(prefixes)}
        optimizer = build_optimizer(bundle.model, phase, TrainConfig(), bundle.stages)
        in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert in_groups == {id(p) for n, p in bundle.model.named_parameters() if n in grads}
        build_scheduler(optimizer, TrainConfig(), total_steps=10, steps_per_epoch=10)  # sets each group's rate (lr x lr_scale)
        lrs = {g["stage"]: g["lr"] for g in optimizer.param_groups}
        assert lrs == ({"head": 0.1} if len(lrs) == 1 else {"head": 0.1, "layer4": 0.05})
        assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if all(p.ndim == 1 for p in g["params"]))


def test_warmup_then_cosine_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_epochs=1), total_steps=20, steps_per_epoch=4)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.02


def test_run_folder_contents_and_checkpoint_is_plain_torch(tmp_path, image_folder):
    result = train(
        recipe=recipe_from_dict(tiny_recipe(train={"epochs": 2})), data=image_folder, out=tmp_path / "run", progress=False
    )
    run = result.run_dir
    for name in (
        "recipe.yaml",
        "splits.csv",
        "classes.json",
        "metrics.csv",
        "train_transforms.yaml",
        "eval_transforms.yaml",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ):
        assert (run / name).exists(), name
    history = pd.read_csv(run / "metrics.csv")
    assert list(history["epoch"]) == [1, 2] and history["val_accuracy"].between(0, 1).all()
    payload = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert payload["class_names"] == ["cat", "dog", "eel"] and payload["model_name"] == "resnet18"
    assert payload["image"]["input_size"] == 32 and len(payload["image"]["mean"]) == 3
    assert payload["versions"]["torch"] == torch.__version__.split("+")[0] or payload["versions"]["torch"].startswith(
        torch.__version__[:4]
    )
    assert payload["recipe"]["model"]["name"] == "resnet18"
    import timm

    plain = timm.create_model("resnet18", num_classes=3)
    plain.load_state_dict(payload["state_dict"])  # README's promise: plain timm/torch can load it
    splits = pd.read_csv(run / "splits.csv")
    assert set(splits["split"]) == {"train", "val"}


def test_checkpoint_round_trip_gives_same_predictions(tmp_path, image_folder):
    result = train(recipe=recipe_from_dict(tiny_recipe()), data=image_folder, out=tmp_path / "run", progress=False)
    report_preds = pd.read_csv(result.report.folder / "predictions.csv")
    again = predict(run=result.run_dir, inputs=list(report_preds["path"]), progress=False)
    assert list(again["predicted_label"]) == list(report_preds["predicted_label"])
    assert again["confidence"].to_numpy() == pytest.approx(report_preds["confidence"].to_numpy(), abs=1e-5)


class _Crash(Exception):
    pass


def test_resume_mid_phase_two_matches_uninterrupted_run(tmp_path, image_folder):
    recipe = recipe_from_dict(tiny_recipe(train=TWO_PHASES))
    full = train(recipe=recipe, data=image_folder, out=tmp_path / "full", progress=False)

    def crash_after_epoch_2(state: FitState) -> None:
        if state.epoch == 2:
            raise _Crash()

    with pytest.raises(_Crash):
        train(recipe=recipe, data=image_folder, out=tmp_path / "cut", progress=False, on_epoch_end=crash_after_epoch_2)
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["training_state"]
    assert (state["epoch"], state["phase"], state["phase_epoch"]) == (2, 1, 1)  # stopped inside phase 2
    resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(full.history.drop(columns="seconds"), resumed.history.drop(columns="seconds"))
    assert full.report.metrics == resumed.report.metrics


def test_early_stopping_stops_and_keeps_best(tmp_path, image_folder):
    recipe = recipe_from_dict(
        tiny_recipe(train={"epochs": 6, "lr": 1e-9, "early_stopping": {"metric": "val_loss", "patience": 1, "min_delta": 10.0}})
    )
    result = train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    assert len(result.history) == 2  # epoch 1 sets the best, epoch 2 fails to improve by 10
    assert load_checkpoint(result.best_checkpoint)["epoch"] == 1


def test_non_finite_loss_stops_with_a_hint(tmp_path, image_folder, monkeypatch):
    class NanLoss(torch.nn.Module):
        def forward(self, logits, targets):
            return logits.sum() * math.nan

    monkeypatch.setattr(loop_module, "build_criterion", lambda cfg, weights=None, task=None: NanLoss())
    with pytest.raises(
        TrainingError, match=r"loss became nan at epoch 1, step 1 \(lr .*\); HINT: lower train.lr or set train.grad_clip"
    ):
        train(recipe=recipe_from_dict(tiny_recipe()), data=image_folder, out=tmp_path / "run", progress=False)


def test_run_folder_mistakes(tmp_path, image_folder):
    recipe = recipe_from_dict(tiny_recipe())
    train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match=r"already holds a run; continue it with --resume"):
        train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match=r"cannot resume .*nothing: recipe.yaml is missing, so it is no finetune run folder"):
        train(out=tmp_path / "nothing", resume=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"output folder .*other is not empty; choose a new --out"):
        train(recipe=recipe, data=image_folder, out=tmp_path / "other", progress=False)
    with pytest.raises(FinetuneError, match=r"no validation images"):
        train(
            recipe=recipe_from_dict(tiny_recipe(data={"val_fraction": 0.0})),
            data=image_folder,
            out=tmp_path / "r2",
            progress=False,
        )


def test_class_weights():
    from finetune.config.schema import LossConfig
    from finetune.training.loss import class_weights

    names, targets = ["a", "b", "c"], [0] * 8 + [1] * 2 + [2] * 2
    assert class_weights(LossConfig(), class_names=names, targets=targets) is None
    balanced = class_weights(LossConfig(class_weights="balanced"), class_names=names, targets=targets)
    assert balanced == pytest.approx([12 / (3 * 8), 12 / (3 * 2), 12 / (3 * 2)])
    effective = class_weights(LossConfig(class_weights="effective_number", beta=0.9), class_names=names, targets=targets)
    raw = [(1 - 0.9) / (1 - 0.9**n) for n in (8, 2, 2)]
    assert effective == pytest.approx([w * 3 / sum(raw) for w in raw])
    assert class_weights(LossConfig(class_weights={"b": 3.0}), class_names=names, targets=targets) == [1.0, 3.0, 1.0]
    with pytest.raises(FinetuneError, match=r"names unknown class\(es\) \['bb'\] \(did you mean 'b'\?\)"):
        class_weights(LossConfig(class_weights={"bb": 3.0}), class_names=names, targets=targets)


def test_imbalanced_training_writes_weights_and_uses_weighted_sampler(tmp_path, image_folder):
    import json

    recipe = recipe_from_dict(tiny_recipe(loss={"class_weights": "balanced"}, data={"sampler": "weighted"}))
    result = train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    weights = json.loads((result.run_dir / "class_weights.json").read_text())
    assert set(weights) == {"cat", "dog", "eel"} and all(w > 0 for w in weights.values())
    assert "loss class weights: cat:" in (result.report.folder / "summary.md").read_text()


def test_small_input_stem_keeps_resolution():
    bundle = build_model(ModelConfig(name="resnet18", small_input=True), num_classes=10)
    assert bundle.model.conv1.kernel_size == (3, 3) and bundle.model.conv1.stride == (1, 1)
    features = bundle.model.forward_features(torch.randn(1, 3, 32, 32))
    assert features.shape[-1] == 4  # 32 / 8: three stride-2 stages, no stem downsampling
    with pytest.raises(FinetuneError, match=r"small_input needs a single-conv stem"):
        build_model(ModelConfig(name="resnet50d", small_input=True), num_classes=10)


def test_failed_start_leaves_no_run_folder_and_can_be_retried(tmp_path, image_folder):
    bad = recipe_from_dict(tiny_recipe(model={"pretrained": str(tmp_path / "missing.pth")}))
    with pytest.raises(FinetuneError, match=r"weights file .*missing.pth does not exist"):
        train(recipe=bad, data=image_folder, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    result = train(recipe=recipe_from_dict(tiny_recipe()), data=image_folder, out=tmp_path / "run", progress=False)
    assert result.best_checkpoint.exists()


def test_resume_refuses_a_changed_recipe_and_bad_checkpoints(tmp_path, image_folder):
    recipe = recipe_from_dict(tiny_recipe(train={"epochs": 2}))
    train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match=r"--resume .*run: the recipe differs from the run's \(train.lr: 0.001 -> 0.1\)"):
        train(out=tmp_path / "run", resume=True, overrides=["train.lr=0.1"], progress=False)
    # the same recipe (and a harmless change) is accepted: the run is already finished, nothing more trains
    done = train(recipe=recipe, out=tmp_path / "run", resume=True, overrides=["data.num_workers=1"], progress=False)
    assert len(done.history) == 2

    payload = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    payload["class_names"] = ["cat", "dog", "eel", "fox"]  # a checkpoint for another class count
    torch.save(payload, tmp_path / "other_classes.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint weights do not fit resnet18 with 4 classes: .*size mismatch"):
        predict(run=tmp_path / "other_classes.pt", inputs=[image_folder / "cat"], progress=False)
    payload["recipe"]["model"]["name"] = "resnet34"  # ... and for another architecture
    torch.save(payload, tmp_path / "other_arch.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint weights do not fit resnet34 with 4 classes: .*Missing key"):
        predict(run=tmp_path / "other_arch.pt", inputs=[image_folder / "cat"], progress=False)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "plain.pt")
    with pytest.raises(
        CheckpointError, match=r"plain.pt is not a finetune checkpoint; to start from plain weights use model.pretrained"
    ):
        predict(run=tmp_path / "plain.pt", inputs=[image_folder / "cat"], progress=False)


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from finetune.inference import checkpoint as checkpoint_module

    checkpoint_module.save_checkpoint({"format": "finetune-checkpoint", "format_version": 1, "epoch": 1}, tmp_path / "last.pt")

    def dying_save(obj, handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.save_checkpoint(
            {"format": "finetune-checkpoint", "format_version": 1, "epoch": 2}, tmp_path / "last.pt"
        )
    monkeypatch.undo()
    assert checkpoint_module.load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_restore_best_goes_back_to_the_phase_best_weights(tmp_path, image_folder, monkeypatch):
    """A phase whose last epoch is worse than its best ends on the best weights; resume agrees."""
    phases = {
        "phases": [{"epochs": 3, "train": ["head"], "lr": 0.05}, {"epochs": 1, "train": ["head"], "lr": 1e-9}],
        "early_stopping": {"metric": "val_loss", "restore_best": True},
    }
    scores = iter([0.5, 0.1, 0.9, 0.2])  # epoch 2 is phase 1's best; epoch 3 is worse

    real = epoch_end_module.validate

    def fake_validate(*args, **kwargs):
        val = real(*args, **kwargs)
        return replace(val, metrics={**val.metrics, "val_loss": next(scores)})

    monkeypatch.setattr(epoch_end_module, "validate", fake_validate)
    seen = {}

    def remember(state):
        seen[state.epoch] = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state_dict"]["fc.weight"].clone()

    train(
        recipe=recipe_from_dict(tiny_recipe(train=phases)),
        data=image_folder,
        out=tmp_path / "run",
        progress=False,
        on_epoch_end=remember,
    )
    assert not torch.equal(seen[2], seen[1])  # the head does train in phase 1
    assert torch.equal(seen[3], seen[2])  # last.pt after phase 1 holds epoch 2's weights, not epoch 3's


def test_a_last_batch_of_one_image_is_left_out_when_batchnorm_trains(tmp_path, image_folder):
    # 3 classes x 8 images, val 6: 18 training images in batches of 17 leave one image alone in the last batch
    recipe = recipe_from_dict(tiny_recipe(data={"batch_size": 17}, train={"epochs": 1}))
    result = train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    assert len(result.history) == 1 and result.history["train_loss"].notna().all()
    probe = recipe_from_dict(tiny_recipe(data={"batch_size": 17}, transforms={"train": "none"}, train={"trainable": ["head"]}))
    assert train(recipe=probe, data=image_folder, out=tmp_path / "probe", progress=False).best_checkpoint.exists()  # no BN: kept


def test_impossible_settings_fail_before_the_run_folder_is_written(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FinetuneError, match=r"train.device is cuda but no GPU is visible; use train.device: auto"):
        train(
            recipe=recipe_from_dict(tiny_recipe(train={"device": "cuda"})),
            data=image_folder,
            out=tmp_path / "gpu",
            progress=False,
        )
    assert not (tmp_path / "gpu").exists()
    crop = tiny_recipe(transforms={"train": [{"RandomCrop": {"height": 500, "width": 500}}]})  # validates; cannot run on 32 px
    with pytest.raises(FinetuneError, match=r"transforms.train: RandomCrop fails on training image .*: .*; change its arguments"):
        train(recipe=recipe_from_dict(crop), data=image_folder, out=tmp_path / "crop", progress=False)
    assert not (tmp_path / "crop").exists()


def test_channels_last_trains_like_the_default_layout(tmp_path, image_folder):
    base = {"feature_cache": "off", "epochs": 2}
    plain = train(recipe=tiny_recipe(train=base), data=image_folder, out=tmp_path / "plain", progress=False)
    nhwc = train(
        recipe=tiny_recipe(train={**base, "channels_last": True}), data=image_folder, out=tmp_path / "nhwc", progress=False
    )
    np.testing.assert_allclose(nhwc.history["train_loss"], plain.history["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(nhwc.history["val_loss"], plain.history["val_loss"], rtol=1e-4)


def test_the_run_ends_with_an_epoch_table(tmp_path, image_folder, caplog):
    caplog.set_level("INFO")
    train(recipe=tiny_recipe(train={"epochs": 2}), data=image_folder, out=tmp_path / "run", progress=False)
    table = next(r.getMessage() for r in caplog.records if "train_loss" in r.getMessage() and "time" in r.getMessage())
    lines = table.strip().splitlines()
    assert lines[0].split()[:3] == ["epoch", "phase", "train_loss"] and lines[0].split()[-1] == "time"
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"] and lines[2].split()[-1].count(":") == 1
