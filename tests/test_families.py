"""Backbone families beyond ResNet, end to end (issue 21, "Done means"): for each family's smallest model, with a
local seeded weights file, recipes/last_stage.yaml at 64 px trains; stem..layer3 are bit-identical afterwards while
layer4 and the head moved; Grad-CAM explains it; the ONNX export passes its parity gate. Then what else each family
must answer: head options, small input, the hub's file name, a ViT at any input size, the head stage's cache."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune import export, train
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import ModelConfig, PhaseConfig, TrainConfig
from finetune.errors import ModelError, WeightsError
from finetune.evaluation.explain import Explainer
from finetune.inference.checkpoint import load_checkpoint, load_trained
from finetune.models import weights as weights_module
from finetune.models.build import ModelBundle, build_model
from finetune.models.stages import StageMap
from finetune.training.feature_cache import _prefix_blocker, cache_reader, cached_modules, entry_module
from finetune.training.feature_store import Tap
from finetune.training.optim import stage_param_groups

from conftest import REPO, make_folder, tiny_recipe

N = 7  # never the default 1000
FROZEN = ("stem", "layer1", "layer2", "layer3")
MODELS = {  # the smallest of each family, its family, and a layer4 tensor that must move
    "convnext_atto": ("convnext", "stages.3.blocks.1.mlp.fc2.weight"),
    "efficientnet_b0": ("efficientnet", "blocks.6.0.conv_pwl.weight"),
    "mobilenetv3_small_100": ("mobilenetv3", "blocks.5.0.conv.weight"),
    "regnety_002": ("regnet", "s4.b7.conv3.conv.weight"),
    "deit_tiny_patch16_224": ("vit", "blocks.11.mlp.fc2.weight"),
}


def seeded_weights(path, name):
    """A timm-layout weights file as a user would download it: seeded weights, and BatchNorm statistics that are
    not the defaults (so a frozen stage whose statistics moved would show)."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("families") / "data", per_class=6)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, data, tmp_path_factory):
    """(name, run folder, the weights file's tensors, the log lines) of last_stage.yaml trained one epoch at 64 px."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    path = folder / ("weights.safetensors" if MODELS[name][0] in ("convnext", "vit") else "weights.pth")
    loaded = seeded_weights(path, name)
    overrides = [f"model.name={name}", f"model.pretrained={path}", "transforms.input_size=64"]
    # tiny data: one epoch, no worker processes; the report's Grad-CAM gallery is test_grad_cam_explains_each_family's
    overrides += ["train.epochs=1", "data.num_workers=0", "eval.gradcam=false"]
    lines, logger = _Lines(), logging.getLogger("finetune")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        result = train(
            recipe=REPO / "recipes" / "last_stage.yaml", data=data, out=folder / "run", overrides=overrides, progress=False
        )
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return name, result.run_dir, loaded, lines.lines


def test_last_stage_trains_and_the_frozen_stages_stay_bit_identical(trained):
    name, run, loaded, lines = trained
    family, moving = MODELS[name]
    trained_state = load_checkpoint(run / "checkpoints" / "last.pt")["state_dict"]
    stages = load_trained(run).bundle.stages
    assert stages.family.name == family
    frozen = [k for k in loaded if stages.of_tensor.get(k) in FROZEN]
    assert {stages.of_tensor[k] for k in frozen} == set(FROZEN)
    for key in frozen:
        assert torch.equal(trained_state[key], loaded[key]), key
    bn_stats = [k for k in frozen if k.endswith("running_mean")]
    assert bool(bn_stats) == (stages.family.normalisation == "batchnorm")  # BatchNorm statistics, fixed, where there are any
    assert stages.of_tensor[moving] == "layer4" and not torch.equal(trained_state[moving], loaded[moving])
    layer4_norms = [k for k in loaded if stages.of_tensor.get(k) == "layer4" and re.search(r"(norm|bn)\w*\.weight$", k)]
    assert any(not torch.equal(trained_state[k], loaded[k]) for k in layer4_norms)  # a trained stage's norms train
    kind = "BatchNorm statistics of frozen stages fixed" if bn_stats else "LayerNorm, no statistics"
    assert any(line.startswith("phase 1/1: training layer4, head") and line.endswith(f"norm frozen ({kind})") for line in lines)
    assert any(re.match(r"feature cache \S+-k4-fp16: 44 view\(s\)", line) for line in lines)  # the prefix is cached
    assert not any(line.startswith("feature cache not used") for line in lines)


def test_grad_cam_explains_each_family(trained):
    """A CNN's layer4 map is 2 x 2 at 64 px, so the heatmap comes from layer3's 4 x 4; a ViT's tokens are a 4 x 4
    patch grid at every stage, laid out as a map from layer4's last block."""
    name, run, _, _ = trained
    model = load_trained(run)
    explainer = Explainer(model.bundle, model.image)
    stage = "layer4" if MODELS[name][0] == "vit" else "layer3"
    assert explainer.where == f"the last block of {stage} (4 x 4 map at 64 px)"
    paths = pd.read_csv(run / "splits.csv")["path"].tolist()[:4]
    found = explainer.explain(paths * 3, [c for c in range(3) for _ in paths])  # every class on four images
    assert [e.heat.shape for e in found] == [(64, 64)] * 12
    # heat somewhere: a class whose evidence is all negative has none (Grad-CAM keeps the positive part)
    assert any(e.heat.max() > 0.99 and e.heat.min() == 0.0 for e in found)


def test_onnx_export_passes_its_parity_gate(trained):
    _, run, _, _ = trained
    result = export(run=run, formats="onnx", progress=False)
    parity = json.loads((result.folder / "parity.json").read_text())["onnx"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4 and parity["accuracy_delta"] == 0.0


@pytest.mark.parametrize("name", MODELS)
def test_head_options_fit_each_family(name):
    """The classifier the family names is replaced (dropout, hidden layer, a non-default class count) and is the
    head stage's last module, after what the family runs on the pooled features."""
    bundle = build_model(ModelConfig(name=name, head={"dropout": 0.3, "hidden": 16}), num_classes=N)
    head = bundle.model.get_submodule(bundle.classifier)
    assert [type(m).__name__ for m in head] == ["Flatten", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [n for n, _ in bundle.stages.modules["head"]][-1] == bundle.classifier
    assert bundle.model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, N)


@pytest.mark.parametrize(
    ("name", "conv"), [("efficientnet_b0", "conv_stem"), ("mobilenetv3_small_100", "conv_stem"), ("regnety_002", "stem.conv")]
)
def test_small_input_keeps_the_pretrained_stem_at_stride_one(tmp_path, name, conv):
    state = seeded_weights(tmp_path / "w.pth", name)
    plain = build_model(ModelConfig(name=name, pretrained=tmp_path / "w.pth"), num_classes=N)
    small = build_model(ModelConfig(name=name, pretrained=tmp_path / "w.pth", small_input=True), num_classes=N)
    assert small.model.get_submodule(conv).stride == (1, 1) and torch.equal(
        small.model.state_dict()[f"{conv}.weight"], state[f"{conv}.weight"]
    )
    sizes = [b.model.eval().forward_features(torch.randn(1, 3, 32, 32)).shape[-1] for b in (plain, small)]
    assert sizes == [1, 2]  # a 32 px image keeps a 2 x 2 map at layer4 instead of 1 x 1
    assert small.stages.of_tensor[f"{conv}.weight"] == "stem"


@pytest.mark.parametrize(
    ("name", "why"),
    [("convnext_atto", r"4 x 4 stride-4 patchify conv"), ("deit_tiny_patch16_224", r"takes transforms\.input_size as it is")],
)
def test_small_input_is_refused_with_the_reason(name, why):
    with pytest.raises(
        ModelError, match=rf"^model\.small_input is not offered for {name}: .*{why}.*; set model\.small_input: false$"
    ):
        build_model(ModelConfig(name=name, small_input=True), num_classes=N)


@pytest.mark.parametrize("name", MODELS)
def test_unreachable_hub_names_each_family_s_file(monkeypatch, name):
    monkeypatch.setattr(weights_module, "_cached_hub_file", lambda name: None)
    monkeypatch.setattr(weights_module, "_host_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(
        WeightsError, match=r"cannot reach huggingface\.co .* download https://huggingface\.co/timm/\S+/model\.safetensors "
    ):
        build_model(ModelConfig(name=name, pretrained=True), num_classes=N)


def test_cached_hub_file_loads_for_another_family(monkeypatch, tmp_path):
    state = seeded_weights(tmp_path / "model.safetensors", "convnext_atto")
    monkeypatch.setattr(weights_module, "_cached_hub_file", lambda name: tmp_path / "model.safetensors")
    monkeypatch.setattr(weights_module, "_host_reachable", lambda url, timeout=3.0: pytest.fail("no network call when cached"))
    model = build_model(ModelConfig(name="convnext_atto", pretrained=True), num_classes=N).model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if not k.startswith("head.fc."))


@pytest.mark.parametrize("size", [32, 48, 64, 96, 224])
def test_a_vit_runs_at_the_recipe_s_input_size_with_224_px_weights(tmp_path, size):
    """timm's dynamic_img_size: the position embeddings of the 14 x 14 grid the weights were trained on are resized
    to the input's grid on every forward, so a 224 px weights file loads and any multiple of 16 runs."""
    seeded_weights(tmp_path / "w.safetensors", "deit_tiny_patch16_224")
    bundle = build_model(ModelConfig(name="deit_tiny_patch16_224", pretrained=tmp_path / "w.safetensors"), num_classes=N)
    model: Any = bundle.model.eval()
    assert tuple(model.pos_embed.shape) == (1, 197, 192)
    assert model(torch.randn(2, 3, size, size)).shape == (2, N)
    assert model.forward_features(torch.randn(1, 3, size, size)).shape == (1, 1 + (size // 16) ** 2, 192)


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("convnext_atto", "head.norm"),
        ("mobilenetv3_small_100", "conv_head"),
        ("deit_tiny_patch16_224", "fc_norm"),
        ("efficientnet_b0", "classifier"),
    ],
)
def test_a_head_only_phase_caches_the_head_stage_s_input(name, entry):
    """The head stage holds what the family runs on the pooled features (ConvNeXt's head.norm, MobileNetV3's 1x1
    conv_head): a head-only phase caches the first one's input, and the head stage's modules on it give the logits."""
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name=name), num_classes=N)
    model = bundle.model.eval()
    assert entry_module(bundle, "head") == entry and cached_modules(bundle, "head")[-1] == bundle.classifier
    images = torch.randn(3, 3, 64, 64)
    pooled = Tap(model, entry)(images)
    assert pooled.shape[1:] in ((model.num_features, 1, 1), (model.num_features,), (model.head_hidden_size, 1, 1))
    reader = cache_reader(model, cached_modules(bundle, "head"), "head", tuple(pooled.shape[1:]))
    assert torch.allclose(reader(pooled.flatten(1)), model(images), atol=1e-5)


def test_a_convnext_linear_probe_trains_head_norm_on_cached_features(tmp_path, data, caplog):
    """recipes/linear_probe.yaml on ConvNeXt: its head stage (head.norm + head.fc) trains on cached pooled features
    (head.norm's input), layer4 and everything before it stay bit-identical."""
    loaded = seeded_weights(tmp_path / "w.safetensors", "convnext_atto")
    overrides = ["model.name=convnext_atto", f"model.pretrained={tmp_path / 'w.safetensors'}", "transforms.input_size=64"]
    overrides += ["train.epochs=1", "data.num_workers=0", "eval.gradcam=false"]
    caplog.set_level(logging.INFO, logger="finetune")
    run = train(
        recipe=REPO / "recipes" / "linear_probe.yaml", data=data, out=tmp_path / "run", overrides=overrides, progress=False
    ).run_dir
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.match(r"feature cache \S+: 11 view\(s\) computed", line) for line in lines)
    assert not any(line.startswith("feature cache not used") for line in lines)
    state = load_checkpoint(run / "checkpoints" / "last.pt")["state_dict"]
    assert state["head.fc.weight"].shape == (3, 320)  # a new classifier for the 3 classes
    moved = {k for k in loaded if not k.startswith("head.fc.") and not torch.equal(state[k], loaded[k])}
    assert moved == {"head.norm.weight", "head.norm.bias"}


@pytest.mark.parametrize("name", MODELS)
def test_layer_wise_decay_groups_cover_every_parameter_of_each_family(name):
    """layer_decay: head 1, layer4 d, layer3 d^2, ... for any family; biases, norms and what timm exempts (a ViT's
    position embedding and class token) get no weight decay."""
    bundle = build_model(ModelConfig(name=name), num_classes=N)
    phase = PhaseConfig(epochs=1, lr=0.1, trainable="all", layer_decay=0.5)
    groups = stage_param_groups(bundle.model, phase, TrainConfig(weight_decay=0.05), bundle.stages)
    params = {id(p): n for n, p in bundle.model.named_parameters()}
    grouped = [params[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(params.values())  # each parameter in exactly one group
    assert {g["stage"]: g["lr_scale"] for g in groups} == {
        "stem": 0.5**5,
        "layer1": 0.5**4,
        "layer2": 0.5**3,
        "layer3": 0.5**2,
        "layer4": 0.5,
        "head": 1.0,
    }
    undecayed = {params[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert ({"pos_embed", "cls_token"} <= undecayed) == (name == "deit_tiny_patch16_224")


def test_the_chain_check_accepts_a_vit_that_pools_with_attention():
    """A `global_pool='map'` ViT pools layer4's tokens with attention inside forward_head: its tensors train with
    layer4, no stage runs it, so the frozen prefix's cache (and the head's) reproduce the model's logits."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", global_pool="map", num_classes=N, dynamic_img_size=True).eval()
    stages = StageMap.of(model, "head")
    assert stages.of_tensor["attn_pool.latent"] == "layer4" and [n for n, _ in stages.modules["layer4"]][-1] == "norm"
    bundle = ModelBundle(model=model, name="deit_tiny_map", classifier="head", data_config={}, stages=stages)
    recipe = recipe_from_dict(tiny_recipe(train={"freeze": list(FROZEN)}))
    image = torch.rand(1, 3, 64, 64)
    for first in ("layer4", "head"):
        assert _prefix_blocker(bundle, Tap(model, entry_module(bundle, first)), recipe, first, image, rows=10) is None
