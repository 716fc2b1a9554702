import pickle
import re

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from finetune.config.catalog import known_model_names
from finetune.config.schema import ModelConfig, Recipe
from finetune.data.transforms import ImageConfig
from finetune.errors import ModelError, WeightsError
from finetune.inference.checkpoint import make_payload, save_checkpoint
from finetune.models import weights as weights_module
from finetune.models.build import build_model
from finetune.models.families import families, family_of

N = 7  # never the default 1000


def _backbone_equal(model, state):
    own = model.state_dict()
    keys = [k for k in own if not k.startswith("fc.")]
    return all(torch.equal(own[k], state[k]) for k in keys)


@pytest.mark.parametrize("name", ["resnet18", "resnetv2_50", "tv:resnet18", "tv:wide_resnet50_2"])
def test_build_with_class_count(name):
    bundle = build_model(ModelConfig(name=name), num_classes=N)
    out = bundle.model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, N)
    assert bundle.data_config["input_size"][-1] == 224 and len(bundle.data_config["mean"]) == 3


def test_head_options():
    bundle = build_model(ModelConfig(name="resnet18", head={"dropout": 0.3, "hidden": 32}), num_classes=N)
    head = bundle.model.get_submodule(bundle.classifier)
    assert [type(m).__name__ for m in head] == ["Flatten", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert bundle.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, N)
    v2 = build_model(ModelConfig(name="resnetv2_50", head={"hidden": 16}), num_classes=N)
    assert v2.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, N)


def test_known_names_cover_the_family():
    names = known_model_names()
    for name in [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "wide_resnet50_2",
        "resnext50_32x4d",
        "resnetv2_50",
        "tv:resnet50",
        "tv:resnext50_32x4d",
    ]:
        assert name in names


def test_known_names_are_the_families_names():
    names = known_model_names()
    for name in names:
        assert [f.name for f in families().values() if f.covers(name)] == [family_of(name).name], name
    timm_modules = [m for f in families().values() for m in f.names.timm_modules]
    left_out = {
        n for f in families().values() for n in timm.list_models(module=list(f.names.timm_modules)) if f.names.excludes(n)
    }
    assert [n for n in names if not n.startswith("tv:")] == sorted(set(timm.list_models(module=timm_modules)) - left_out)
    assert left_out and all("distilled" in n for n in left_out)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_small_input_stem_comes_from_the_family(name):
    bundle = build_model(ModelConfig(name=name, small_input=True), num_classes=N)
    assert bundle.model.conv1.kernel_size == (3, 3) and bundle.model.conv1.stride == (1, 1)
    assert isinstance(bundle.model.maxpool, torch.nn.Identity) and bundle.stages.of_tensor["conv1.weight"] == "stem"
    assert bundle.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, N)


def test_small_input_is_refused_for_a_family_without_one():
    with pytest.raises(ModelError, match=r"model\.small_input needs a single-conv stem .*; resnetv2_18 has another stem"):
        build_model(ModelConfig(name="resnetv2_18", small_input=True), num_classes=N)


@pytest.mark.parametrize("layout", ["timm_pth", "tv_pth", "module_prefix", "wrapped", "safetensors"])
def test_local_weights_in_either_layout_with_1000_class_head(tmp_path, layout):
    if layout == "tv_pth":
        state = torchvision.models.resnet18(weights=None).state_dict()
    else:
        state = timm.create_model("resnet18", num_classes=1000).state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "module_prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif layout == "wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save(state, path)
    bundle = build_model(ModelConfig(name="resnet18", pretrained=path), num_classes=N)
    assert _backbone_equal(bundle.model, state)
    assert bundle.model.fc.weight.shape == (N, 512)


def test_timm_weights_into_torchvision_model(tmp_path):
    state = timm.create_model("resnet50").state_dict()
    torch.save(state, tmp_path / "w.pth")
    bundle = build_model(ModelConfig(name="tv:resnet50", pretrained=tmp_path / "w.pth"), num_classes=N)
    assert _backbone_equal(bundle.model, state)


def test_finetune_checkpoint_as_pretrained_weights(tmp_path):
    source = build_model(ModelConfig(name="resnet18"), num_classes=3)
    payload = make_payload(
        bundle=source, class_names=["a", "b", "c"], image=ImageConfig(32, (0.5,) * 3, (0.5,) * 3), recipe=Recipe()
    )
    save_checkpoint(payload, tmp_path / "best.pt")
    bundle = build_model(ModelConfig(name="resnet18", pretrained=tmp_path / "best.pt"), num_classes=N)
    assert _backbone_equal(bundle.model, source.model.state_dict())


def test_weights_for_another_architecture_are_refused(tmp_path):
    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(WeightsError, match=r"do not fit this architecture: \d+ missing key\(s\).*another model than model.name"):
        build_model(ModelConfig(name="resnet18", pretrained=tmp_path / "r50.pth"), num_classes=N)
    torch.save(timm.create_model("resnet26").state_dict(), tmp_path / "r26.pth")
    with pytest.raises(WeightsError, match=r"do not fit this architecture"):
        build_model(ModelConfig(name="resnet50", pretrained=tmp_path / "r26.pth"), num_classes=N)


class _Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickles_that_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"fc.weight": _Evil()}, handle)
    with pytest.raises(WeightsError, match=r"cannot be loaded safely with torch.load\(weights_only=True\)"):
        build_model(ModelConfig(name="resnet18", pretrained=path), num_classes=N)


def test_missing_and_garbage_weight_files(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file .*none.pth does not exist"):
        build_model(ModelConfig(name="resnet18", pretrained=tmp_path / "none.pth"), num_classes=N)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"not a readable safetensors file"):
        build_model(ModelConfig(name="resnet18", pretrained=tmp_path / "junk.safetensors"), num_classes=N)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match=r"holds no state dict of tensors"):
        build_model(ModelConfig(name="resnet18", pretrained=tmp_path / "list.pth"), num_classes=N)


@pytest.mark.parametrize(
    ("name", "host", "filename"),
    [
        ("resnet50", "huggingface.co", "model.safetensors"),
        ("tv:resnet50", "download.pytorch.org", "resnet50-11ad3fa6.pth"),
    ],
)
def test_unreachable_hub_fails_fast_naming_the_file(monkeypatch, name, host, filename):
    monkeypatch.setattr(weights_module, "_cached_hub_file", lambda name: None)
    monkeypatch.setattr(weights_module, "_host_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(
        WeightsError, match=rf"cannot reach {host} .* download https://\S+{filename} .*model.pretrained: /path/to/{filename}"
    ):
        build_model(ModelConfig(name=name, pretrained=True), num_classes=N)


def test_cached_hub_file_is_used_offline(monkeypatch, tmp_path):
    state = timm.create_model("resnet18").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(weights_module, "_cached_hub_file", lambda name: tmp_path / "model.safetensors")
    monkeypatch.setattr(weights_module, "_host_reachable", lambda url, timeout=3.0: pytest.fail("no network call when cached"))
    bundle = build_model(ModelConfig(name="resnet18", pretrained=True), num_classes=N)
    assert _backbone_equal(bundle.model, state)


def test_a_weights_mismatch_names_only_what_is_there():
    from finetune.models.weights import load_weights

    model = timm.create_model("resnet18", num_classes=3)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4.1.")}
    with pytest.raises(WeightsError) as caught:
        load_weights(model, state, classifier="fc", source="w.pth")
    message = str(caught.value)
    assert re.search(
        r"architecture: \d+ missing key\(s\) \(e\.g\. layer4\.1\.\S+, layer4\.1\.\S+\), 0 unexpected; is the", message
    )
    assert "[]" not in message  # no empty example list
