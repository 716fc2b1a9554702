"""Weight EMA: timm's ModelEmaV3 over the tensors that move, frozen stages untouched, exact resume, best.pt's choice."""

import numpy as np
import pandas as pd
import pytest
import torch

from finetune import train
from finetune.config.schema import EmaConfig, ModelConfig
from finetune.models.build import build_model
from finetune.models.stages import FreezePlan, apply_freeze, set_train_mode
from finetune.training.ema import StageEma, moving_tensors
from finetune.training.scoring import select
from finetune.training.validation import Validation

from conftest import tiny_recipe


def _timm_decay(step: int, cap: float) -> float:
    """timm's warmup decay, written out: 0 at the first update, then 1 - (1 + t)^(-2/3) capped."""
    t = step - 1
    return 0.0 if t <= 0 else min(cap, 1 - (1 + t) ** (-2 / 3))


def test_ema_matches_a_direct_computation_over_three_steps_and_leaves_frozen_stages_alone():
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=3)
    model = bundle.model
    plan = FreezePlan(trainable=("layer4", "head"))
    apply_freeze(model, plan, bundle.stages)
    ema = StageEma(model, EmaConfig(decay=0.9, warmup=True))
    moving = moving_tensors(model, plan, bundle.stages)
    assert "layer4.0.bn1.running_mean" in moving and "layer3.0.bn1.running_mean" not in moving
    assert "layer3.0.conv1.weight" not in moving and "fc.weight" in moving
    ema.start_phase(model, moving)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k not in moving}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in (1, 2, 3):
        set_train_mode(model, plan, bundle.stages)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step()
        decay = _timm_decay(step, 0.9)
        for name, value in model.state_dict().items():
            if name in moving and value.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * value
    averaged = ema.module.state_dict()
    for name in moving:
        if averaged[name].is_floating_point():
            torch.testing.assert_close(averaged[name], expected[name], rtol=1e-5, atol=1e-6)
    assert _timm_decay(3, 0.9) == pytest.approx(1 - 3 ** (-2 / 3)) and ema.get_decay(3) == _timm_decay(3, 0.9)
    assert not torch.equal(averaged["fc.weight"], model.state_dict()["fc.weight"])
    for name, value in frozen_before.items():  # frozen stages: the same tensors in the model and in the average
        assert torch.equal(averaged[name], value) and torch.equal(model.state_dict()[name], value), name
    assert ema.updates == 3


def _validation(accuracy: float, loss: float) -> Validation:
    return Validation(
        metrics={"val_accuracy": accuracy, "val_loss": loss, "val_macro_f1": accuracy},
        logits=np.zeros((1, 2)),
        targets=np.zeros(1),
    )


@pytest.mark.parametrize(
    ("evaluate", "metric", "selected"),
    [
        ("ema", "val_accuracy", "ema"),
        ("raw", "val_accuracy", "raw"),
        ("both", "val_accuracy", "raw"),
        ("both", "val_loss", "ema"),
    ],
)
def test_which_weights_an_epoch_stands_for(evaluate, metric, selected):
    raw, ema = _validation(0.8, 0.9), _validation(0.7, 0.5)  # raw is more accurate, the average has the lower loss
    scores = select(raw, ema, EmaConfig(evaluate=evaluate), metric=metric)
    assert scores.selected == selected
    assert scores.columns()["ema_val_accuracy"] == 0.7 and scores.columns()["val_accuracy"] == 0.8


class _Stop(Exception):
    pass


def _stop(state):
    if state.epoch == 1:
        raise _Stop


LEVERS = {
    "epochs": 3,
    "lr": 0.003,
    "trainable": ["layer3", "layer4", "head"],
    "ema": {"decay": 0.95},
    "mixup": {"off_epoch": 2},
    "scheduler": "plateau",
    "patience_epochs": 0,
}


def test_resume_with_ema_mixup_and_plateau_is_bit_exact(tmp_path, image_folder):
    recipe = tiny_recipe(train=LEVERS, model={"head": {"dropout": 0.2}})
    full = train(recipe=recipe, data=image_folder, out=tmp_path / "full", progress=False)
    with pytest.raises(_Stop):
        train(recipe=recipe, data=image_folder, out=tmp_path / "cut", progress=False, on_epoch_end=_stop)
    resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "full" / "checkpoints" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / "checkpoints" / name, weights_only=True)
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name
    ema_a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["training_state"]["ema"]
    ema_b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["training_state"]["ema"]
    assert ema_a["updates"] == ema_b["updates"] > 0
    assert all(torch.equal(ema_a["state_dict"][k], ema_b["state_dict"][k]) for k in ema_a["state_dict"])
    pd.testing.assert_frame_equal(full.history.drop(columns="seconds"), resumed.history.drop(columns="seconds"))
    history = full.history
    assert {"ema_val_loss", "ema_val_accuracy", "ema_val_macro_f1", "selected"} <= set(history.columns)
    assert set(history["selected"]) == {"ema"}
    # mixed epochs (1, 2) report no training accuracy; epoch 3 trains on plain images and does
    assert history["train_accuracy"].isna().tolist() == [True, True, False]
    assert history["lr"].iloc[2] < history["lr"].iloc[1]  # plateau with patience 0 decayed the rate


def test_best_checkpoint_keeps_the_weights_the_recipe_names(tmp_path, image_folder):
    for evaluate in ("ema", "raw"):
        recipe = tiny_recipe(train={"ema": {"decay": 0.9, "evaluate": evaluate}})
        run = train(recipe=recipe, data=image_folder, out=tmp_path / evaluate, progress=False).run_dir
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
        last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        kept = last["training_state"]["ema"]["state_dict"] if evaluate == "ema" else last["state_dict"]
        other = last["state_dict"] if evaluate == "ema" else last["training_state"]["ema"]["state_dict"]
        assert all(torch.equal(best[k], kept[k]) for k in best)
        assert not torch.equal(best["fc.weight"], other["fc.weight"])
