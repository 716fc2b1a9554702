"""timm's optimizers by name, and the step and plateau schedules, including their state for an exact resume."""

import pytest

from finetune.config.schema import ModelConfig, PhaseConfig, TrainConfig
from finetune.models.build import build_model
from finetune.training.optim import build_optimizer, build_scheduler, stage_lrs


@pytest.fixture(scope="module")
def bundle():
    return build_model(ModelConfig(name="resnet18"), num_classes=3)


@pytest.mark.parametrize(("name", "kind"), [("lamb", "Lamb"), ("lion", "Lion"), ("adamw", "AdamW"), ("sgd", "SGD")])
def test_timm_optimizers_by_name_keep_the_stage_groups(bundle, name, kind):
    phase = PhaseConfig(epochs=1, lr=0.01, trainable=["layer4", "head"], layer_decay=0.5)
    optimizer = build_optimizer(bundle.model, phase, TrainConfig(optimizer=name), bundle.stages)
    assert type(optimizer).__name__ == kind
    schedule = build_scheduler(optimizer, TrainConfig(scheduler="constant"), total_steps=10, steps_per_epoch=5)
    schedule.step()
    assert stage_lrs(optimizer) == pytest.approx({"layer4": 0.005, "head": 0.01})


def _optimizer(bundle, cfg):
    return build_optimizer(bundle.model, PhaseConfig(epochs=1, lr=0.1, trainable=["head"]), cfg, bundle.stages)


def test_step_schedule_decays_every_decay_epochs(bundle):
    cfg = TrainConfig(scheduler="step", decay_epochs=2, decay_rate=0.5)
    optimizer = _optimizer(bundle, cfg)
    schedule = build_scheduler(optimizer, cfg, total_steps=30, steps_per_epoch=5)
    rates = []
    for _ in range(30):
        rates.append(stage_lrs(optimizer)["head"])
        schedule.step()
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(0.1)
    assert rates[10] == pytest.approx(0.05) and rates[20] == pytest.approx(0.025)


def test_plateau_decays_after_patience_and_resumes_exactly(bundle):
    cfg = TrainConfig(scheduler="plateau", patience_epochs=1, decay_rate=0.5, warmup_epochs=1)
    optimizer = _optimizer(bundle, cfg)
    schedule = build_scheduler(optimizer, cfg, total_steps=100, steps_per_epoch=4)
    accuracy = [0.5, 0.6, 0.6, 0.6, 0.6, 0.7]
    rates, saved = [], None
    for epoch, value in enumerate(accuracy):
        for _ in range(4):
            schedule.step()
        schedule.end_epoch({"val_accuracy": value})
        rates.append(stage_lrs(optimizer)["head"])
        if epoch == 2:
            saved = (optimizer.state_dict(), schedule.state_dict())
    # 0.6 twice without improving (patience 1): halved after epoch 4; the counters restart from there
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
    fresh_optimizer = _optimizer(bundle, cfg)
    fresh = build_scheduler(fresh_optimizer, cfg, total_steps=100, steps_per_epoch=4)
    fresh_optimizer.load_state_dict(saved[0])
    fresh.load_state_dict(saved[1])
    again = []
    for value in accuracy[3:]:
        for _ in range(4):
            fresh.step()
        fresh.end_epoch({"val_accuracy": value})
        again.append(stage_lrs(fresh_optimizer)["head"])
    assert again == pytest.approx(rates[3:])


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"decay_epochs": 3}, "decay_epochs is used by scheduler step, not 'cosine'; remove it"),
        ({"scheduler": "step", "patience_epochs": 3}, "patience_epochs is used by scheduler plateau, not 'step'"),
        ({"optimizer": "lamp"}, r"Input should be 'adamw', 'sgd', 'lamb' or 'lion'"),
    ],
)
def test_scheduler_settings_belong_to_their_scheduler(train, message):
    from finetune.config.loading import recipe_from_dict
    from finetune.errors import RecipeError

    from conftest import tiny_recipe

    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(tiny_recipe(train=train))
