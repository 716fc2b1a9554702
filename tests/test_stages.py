import dataclasses
import re

import pytest
import timm
import torch
import torchvision

from finetune import train
from finetune.config.catalog import FAMILY_NAMES, STAGES
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import ModelConfig
from finetune.errors import ModelError
from finetune.inference.checkpoint import load_checkpoint
from finetune.models.build import build_model
from finetune.models.families import families, family_for, family_of, make_registry, timm_classifier
from finetune.models.stages import FreezePlan, apply_freeze, last_block, set_train_mode

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


def _meta_bundle(name, **model):
    with torch.device("meta"):  # structure only: no memory, no arithmetic
        return build_model(ModelConfig(name=name, pretrained=False, **model), num_classes=7, load_pretrained=False)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("resnet18", "resnet"),
        ("resnetv2_50x1_bit", "resnetv2"),
        ("tv:resnet18", "tv_resnet"),
        ("convnext_atto", "convnext"),
        ("convnextv2_atto", "convnext"),
        ("efficientnet_b0", "efficientnet"),
        ("tf_efficientnetv2_b0", "efficientnet"),
        ("mobilenetv3_small_100", "mobilenetv3"),
        ("mobilenetv4_conv_small", "mobilenetv3"),
        ("regnety_002", "regnet"),
        ("regnetx_002", "regnet"),
        ("deit_tiny_patch16_224", "vit"),
        ("vit_small_patch14_dinov2", "vit"),  # an encoder timm makes without a classifier, with register-free prefix
    ],
)
def test_each_family_puts_every_tensor_in_exactly_one_stage(name, family):
    bundle = _meta_bundle(name)
    assert bundle.stages.family.name == family_of(name).name == family_for(bundle.model).name == family
    patterns = bundle.stages.family.patterns(bundle.model, bundle.classifier)
    tensors = [n for n, _ in bundle.model.named_parameters()] + [n for n, _ in bundle.model.named_buffers()]
    assert sorted(bundle.stages.of_tensor) == sorted(tensors)
    for tensor in tensors:
        assert [s for s in STAGES if re.match(patterns[s], tensor)] == [bundle.stages.of_tensor[tensor]], tensor
    assert set(bundle.stages.of_tensor.values()) == set(STAGES)
    head = bundle.model.get_submodule(bundle.classifier)
    assert getattr(head, "out_features", getattr(head, "out_channels", None)) == 7


def test_timm_stage_names_come_from_timms_own_grouping():
    deep_stem = _meta_bundle("resnet50d")  # conv1 is a Sequential of three convs
    assert [n for n, _ in deep_stem.stages.modules["stem"]] == ["conv1", "bn1", "act1", "maxpool"]
    v2 = _meta_bundle("resnetv2_50")  # timm groups the final pre-activation norm with the last block
    assert [[n for n, _ in v2.stages.modules[s]] for s in STAGES] == [
        ["stem"],
        ["stages.0"],
        ["stages.1"],
        ["stages.2"],
        ["stages.3", "norm"],
        ["head.fc"],
    ]


@pytest.mark.parametrize(
    ("name", "layer4", "layer1"),
    [
        ("resnet18", "layer4.1", "layer1.1"),
        ("resnetv2_18", "stages.3.blocks.1", "stages.0.blocks.1"),
        ("tv:resnet18", "layer4.1", "layer1.1"),
        ("convnext_atto", "stages.3.blocks.1", "stages.0.blocks.1"),
        ("efficientnet_b0", "blocks.6.0", "blocks.1.1"),  # not conv_head/bn2; layer1 folds blocks.0 and blocks.1
        ("mobilenetv3_small_100", "blocks.5.0", "blocks.0.0"),
        ("regnety_002", "s4.b7", "s1.b1"),
        ("deit_tiny_patch16_224", "blocks.11.norm1", "blocks.2.norm1"),  # a token mixer's input norm
    ],
)
def test_gradcam_target_is_the_family_s_last_block_of_a_stage(name, layer4, layer1):
    bundle = _meta_bundle(name)
    assert last_block(bundle.stages) is bundle.model.get_submodule(layer4)
    assert last_block(bundle.stages, "layer1") is bundle.model.get_submodule(layer1)


def test_another_timm_family_is_one_entry():
    """ConvNeXt's stages derive from timm's grouping as ResNetV2's do; only its head stage also holds head.norm."""
    with torch.device("meta"):
        model = timm.create_model("convnext_atto", num_classes=7)
    convnext = families()["convnext"]
    patterns = convnext.patterns(model, timm_classifier(model))
    for tensor, _ in model.named_parameters():
        assert sum(bool(re.match(p, tensor)) for p in patterns.values()) == 1, tensor
    assert re.match(patterns["head"], "head.norm.weight") and re.match(patterns["layer4"], "stages.3.blocks.1.mlp.fc1.weight")
    assert dataclasses.replace(convnext, name="copy").patterns(model, "head.fc") == patterns  # the entry is all it takes


def test_family_registry_refuses_duplicates_and_matches_the_catalog():
    resnet = families()["resnet"]
    with pytest.raises(ModelError, match=r"backbone family 'resnet' is registered twice"):
        make_registry([resnet, resnet])
    with pytest.raises(ModelError, match=r"backbone families 'resnet' and 'copy' both claim timm module 'resnet'"):
        make_registry([resnet, dataclasses.replace(resnet, name="copy")])
    assert list(families()) == list(FAMILY_NAMES)


def test_a_model_of_no_family_is_one_clear_line():
    known = (
        r"finetune knows: resnet \(timm resnet\); resnetv2 \(timm resnetv2\); tv_resnet \(tv:resnet\*, tv:wide_resnet\*, "
        r"tv:resnext\*\); convnext \(timm convnext\); efficientnet \(timm efficientnet\); mobilenetv3 \(timm mobilenetv3\); "
        r"regnet \(timm regnet\); vit \(timm vision_transformer, timm deit, not \*distilled\*\)$"
    )
    with pytest.raises(ModelError, match=rf"^model 'densenet121' belongs to no backbone family; {known}"):
        family_of("densenet121")
    with pytest.raises(ModelError, match=rf"^model 'deit_tiny_distilled_patch16_224' belongs to no backbone family; {known}"):
        family_of("deit_tiny_distilled_patch16_224")
    with pytest.raises(
        ModelError, match=rf"^model class torch\.nn\.modules\.linear\.Linear belongs to no backbone family; {known}"
    ):
        family_for(torch.nn.Linear(2, 2))


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


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("resnet18", "batchnorm"),
        ("resnetv2_50x1_bit", "groupnorm"),  # BiT: GroupNorm + weight standardisation, in a BatchNorm family
        ("efficientnet_b0_gn", "groupnorm"),
        ("convnext_atto", "layernorm"),
        ("deit_tiny_patch16_224", "layernorm"),
        ("mobilenetv4_hybrid_medium", "batchnorm"),  # attention blocks among BatchNorm ones: the statistics matter
    ],
)
def test_the_model_s_own_layers_name_its_normalisation(name, kind):
    from finetune.models.families import policy_note

    stages = _meta_bundle(name).stages
    assert stages.normalisation == kind
    frozen, train = policy_note(kind, "frozen"), policy_note(kind, "train")
    if kind == "batchnorm":
        assert (frozen, train) == ("BatchNorm statistics of frozen stages fixed", "BatchNorm statistics of frozen stages update")
    else:
        assert train == frozen + ": norm: train changes nothing"
