import pytest
import timm
import torch
import torchvision

from finetune import train
from finetune.config.catalog import STAGES
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import ModelConfig
from finetune.models.build import build_model
from finetune.models.stages import FreezePlan, apply_freeze, set_train_mode
from finetune.training.checkpoint import load_checkpoint

from conftest import tiny_recipe

FROZEN = ["stem", "layer1", "layer2", "layer3"]


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50d", "resnext50_32x4d", "wide_resnet50_2", "resnetv2_50", "tv:resnet18", "tv:resnext50_32x4d"]
)
def test_every_tensor_belongs_to_exactly_one_named_stage(name):
    bundle = build_model(ModelConfig(name=name), num_classes=5)
    mapping = bundle.stages.of_tensor
    assert set(mapping.values()) == set(STAGES)
    assert all(mapping[k] == "head" for k in mapping if k.startswith(bundle.classifier + "."))


def test_stages_mean_the_same_for_timm_and_torchvision():
    counts = {}
    for name in ("resnet50", "tv:resnet50"):
        bundle = build_model(ModelConfig(name=name), num_classes=5)
        mapping = bundle.stages.of_tensor
        counts[name] = {s: sum(p.numel() for n, p in bundle.model.named_parameters() if mapping[n] == s) for s in STAGES}
    assert counts["resnet50"] == counts["tv:resnet50"]


def test_frozen_bn_stays_in_eval_mode_after_train():
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=3)
    plan = FreezePlan(trainable=("layer4", "head"), bn="frozen")
    trainable = apply_freeze(bundle.model, plan, bundle.stages)
    set_train_mode(bundle.model, plan, bundle.stages)
    assert trainable == sum(p.numel() for n, p in bundle.model.named_parameters() if n.startswith(("layer4", "fc")))
    assert not bundle.model.bn1.training and not bundle.model.layer3[0].bn1.training
    assert bundle.model.layer4[0].bn1.training and bundle.model.training


def _weights_file(tmp_path, name):
    """Random weights with distinctive BN statistics, as a user's downloaded file would have."""
    model = torchvision.models.resnet18(weights=None) if name.startswith("tv:") else timm.create_model(name)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    return tmp_path / "weights.pth", model.state_dict()


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_frozen_stages_are_bit_identical_after_training(tmp_path, image_folder, name):
    path, loaded = _weights_file(tmp_path, name)
    recipe = recipe_from_dict(
        tiny_recipe(
            model={"name": name, "pretrained": str(path)}, train={"freeze": FROZEN, "bn": "frozen", "epochs": 2, "lr": 0.01}
        )
    )
    result = train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    trained = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["state_dict"]
    mapping = build_model(recipe.model, num_classes=3, load_pretrained=False).stages.of_tensor
    frozen_keys = [k for k in loaded if mapping.get(k) in FROZEN]
    assert any("running_mean" in k for k in frozen_keys) and any("num_batches_tracked" in k for k in frozen_keys)
    for key in frozen_keys:
        assert torch.equal(trained[key], loaded[key]), key
    assert not torch.equal(trained["layer4.0.conv1.weight"], loaded["layer4.0.conv1.weight"])
    assert not torch.equal(trained["layer4.0.bn1.running_mean"], loaded["layer4.0.bn1.running_mean"])


def test_bn_train_policy_updates_statistics_but_not_weights(tmp_path, image_folder):
    path, loaded = _weights_file(tmp_path, "resnet18")
    recipe = recipe_from_dict(tiny_recipe(model={"pretrained": str(path)}, train={"freeze": FROZEN, "bn": "train"}))
    result = train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    trained = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["state_dict"]
    assert torch.equal(trained["layer1.0.bn1.weight"], loaded["layer1.0.bn1.weight"])
    assert torch.equal(trained["layer1.0.conv1.weight"], loaded["layer1.0.conv1.weight"])
    assert not torch.equal(trained["layer1.0.bn1.running_mean"], loaded["layer1.0.bn1.running_mean"])
