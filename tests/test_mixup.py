"""Mixup / CutMix: timm's Mixup with the recipe's smoothing; soft targets; refused where no images are seen."""

import pytest
import torch
from timm.data.mixup import mixup_target

from finetune.config.loading import recipe_from_dict
from finetune.config.schema import LossConfig, MixupConfig
from finetune.errors import RecipeError
from finetune.training.loss import build_criterion
from finetune.training.mixup import Mixer, soft_target_criterion

from conftest import tiny_recipe


@pytest.mark.parametrize("cfg", [MixupConfig(), MixupConfig(cutmix_alpha=0.0), MixupConfig(mixup_alpha=0.0)])
def test_mixed_targets_are_distributions_with_the_smoothing(cfg):
    torch.manual_seed(0)
    mixer = Mixer(cfg, label_smoothing=0.1, num_classes=4)
    images, targets = torch.rand(7, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    mixed, soft = mixer(images, targets)
    assert mixed.shape == (6, 3, 16, 16) and soft.shape == (6, 4)  # an odd batch leaves its last image out
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(6))
    assert soft.min() >= 0.1 / 4 - 1e-6  # every class keeps at least its smoothing share
    pair = soft[0] + soft[5]  # timm mixes image i with image n-1-i, with the same weight
    assert pair[0] > 0 and pair[2] > 0  # labels of images 0 and 5 (classes 0 and 2) are both in the mix


def test_soft_target_loss_equals_the_recipe_loss_on_unmixed_labels():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    weights = [1.0, 2.0, 0.5]
    soft = mixup_target(labels, 3, lam=1.0, smoothing=0.0)
    hard = build_criterion(LossConfig(), weights)(logits, labels)
    # torch averages probability targets over images, class-index targets over their weights: compare unweighted
    torch.testing.assert_close(soft_target_criterion(None)(logits, soft), build_criterion(LossConfig())(logits, labels))
    assert soft_target_criterion(weights)(logits, soft) * 5 == pytest.approx(float(hard) * sum(weights[i] for i in labels))


def test_mixup_is_refused_in_phases_that_train_on_cached_features():
    phases = [{"epochs": 2, "lr": 0.01, "trainable": ["head"]}, {"epochs": 3, "lr": 0.001}]
    cached = tiny_recipe(train={"phases": phases, "mixup": {}}, transforms={"train": "none"})
    with pytest.raises(
        RecipeError, match=r"train.mixup mixes images, but phase 1 \(epochs 1-2\) trains on cached outputs of its frozen stages"
    ):
        recipe_from_dict(cached)
    later = tiny_recipe(train={"phases": phases[::-1], "mixup": {}}, transforms={"train": "none"})
    with pytest.raises(RecipeError, match=r"phase 2 \(epochs 4-5\).*or train.mixup.off_epoch: 3 to stop mixing before it"):
        recipe_from_dict(later)
    # the same phases are fine when mixing stops before the cached phase, or the phase trains on images
    recipe_from_dict(tiny_recipe(train={"phases": phases[::-1], "mixup": {"off_epoch": 3}}, transforms={"train": "none"}))
    recipe_from_dict(tiny_recipe(train={"phases": phases, "mixup": {}, "feature_cache": "off"}, transforms={"train": "none"}))
    suffix = {"epochs": 2, "lr": 0.01, "trainable": ["layer4", "head"], "bn": "frozen"}  # the frozen-prefix cache
    with pytest.raises(RecipeError, match=r"phase 1 \(epochs 1-2\) trains on cached outputs of its frozen stages"):
        recipe_from_dict(tiny_recipe(train={"phases": [suffix], "mixup": {}, "cache_views": 2}))


@pytest.mark.parametrize(
    ("mixup", "message"),
    [
        ({"mixup_alpha": 0, "cutmix_alpha": 0}, "mixup_alpha and cutmix_alpha are both 0"),
        ({"prob": 0}, "train.mixup.prob: Input should be greater than 0"),
        ({"alpha": 1}, r"train.mixup.alpha: unknown key \(did you mean 'mixup_alpha'"),
    ],
)
def test_bad_mixup_settings(mixup, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(tiny_recipe(train={"mixup": mixup}))


def test_mixup_needs_pairs():
    with pytest.raises(RecipeError, match="train.mixup mixes pairs of images of a batch; set data.batch_size to 2 or more"):
        recipe_from_dict(tiny_recipe(train={"mixup": {}}, data={"batch_size": 1}))
