"""`finetune export --format hub`: timm loads the folder and agrees with finetune on every test image, the model card
parses with huggingface_hub and holds no local path, refusals say why, and --push talks to the Hub as it should
(a fake HfApi here; a closed port for the offline failure)."""

import json
import re
import socket
import time
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import timm.data
import torch
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image
from typer.testing import CliRunner

from finetune import export, predict, train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import ModelConfig
from finetune.data.decode import load_image
from finetune.data.transforms import ImageConfig
from finetune.deploy import hub_format, hub_push
from finetune.errors import HubError, ModelError, RunDirError, UsageError
from finetune.files import read_text_table
from finetune.inference.checkpoint import CheckpointRecord, TrainedModel, load_trained
from finetune.inference.task import SingleLabel
from finetune.models.build import build_model
from finetune.reporting import model_card
from finetune.run_dir import RunDir

from conftest import make_folder, tiny_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny tv: ResNet-18 run with a test split: the torchvision name must become timm's."""
    data = make_folder(tmp_path_factory.mktemp("hub") / "data", per_class=8)
    recipe = recipe_from_dict(tiny_recipe(data={"test_fraction": 0.25}, model={"name": "tv:resnet18"}))
    return train(recipe=recipe, data=data, out=tmp_path_factory.mktemp("hub-run") / "run", progress=False).run_dir


@pytest.fixture(scope="module")
def hub(run, tmp_path_factory):
    return export(run=run, formats="hub", out=tmp_path_factory.mktemp("hub-out") / "ants-model", progress=False)


def _test_paths(run: Path) -> list[str]:
    splits = read_text_table(run / "splits.csv")
    return list(splits.loc[splits["split"] == "test", "path"])


def test_timm_loads_the_folder_and_its_own_transform_gives_finetunes_labels(run, hub):
    model = timm.create_model(f"local-dir:{hub.folder}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    paths = _test_paths(run)
    batch = torch.stack([transform(Image.fromarray(load_image(p))) for p in paths])
    config = json.loads((hub.folder / "config.json").read_text())
    with torch.inference_mode():
        probs = (model(batch) / config["finetune"]["temperature"]).softmax(-1).numpy()
    labels = model.pretrained_cfg["label_names"]
    reference = predict(run=run, inputs=paths, progress=False)
    assert len(paths) == 6 and [labels[i] for i in probs.argmax(1)] == list(reference["predicted_label"])
    assert np.allclose(probs.max(1), reference["confidence"], atol=1e-3)


def test_config_json_is_timms_with_the_runs_image_contract(run, hub):
    config = json.loads((hub.folder / "config.json").read_text())
    loaded = load_trained(run)
    cfg = config["pretrained_cfg"]
    assert config["architecture"] == "resnet18" and config["num_classes"] == 3 and config["label_names"] == ["cat", "dog", "eel"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == list(loaded.image.mean) and cfg["std"] == list(loaded.image.std)
    assert cfg["crop_pct"] == loaded.image.crop_pct and cfg["interpolation"] == loaded.image.interpolation
    assert not {"tag", "license", "hf_hub_id", "origin_url"} & set(cfg)  # the source weights' provenance is not ours
    assert {p.name for p in hub.folder.iterdir()} == {
        "model.safetensors",
        "config.json",
        "model.onnx",
        "parity.json",
        "README.md",
        "export_manifest.json",
    }
    parity = json.loads((hub.folder / "parity.json").read_text())
    assert parity["timm"]["top1_agreement"] == 1.0 and parity["timm"]["max_abs_prob_diff"] <= 1e-4
    assert parity["onnx"]["top1_agreement"] == 1.0 and parity["timm_transform"]["images"] == 6


def test_huggingface_hub_parses_the_card_and_its_model_index(run, hub):
    card = ModelCard.load(hub.folder / "README.md")
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert card.data.license == "other" and "resnet18" in card.data.tags
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    name, results = model_index_to_eval_results(metadata_load(hub.folder / "README.md")["model-index"])
    assert name == "ants-model" and results[0].task_type == "image-classification" and results[0].dataset_split == "test"
    accuracy = next(r for r in results if r.metric_type == "accuracy")
    low, high = metrics["ci95"]["accuracy"]
    assert accuracy.metric_value == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert accuracy.metric_args == {"ci95_low": pytest.approx(low, abs=1e-4), "ci95_high": pytest.approx(high, abs=1e-4)}
    assert {r.metric_type for r in results} == {"accuracy", "balanced_accuracy", "f1"}
    body = card.text
    for words in ("## Data", "## Recipe", "## Calibration and the reject threshold", "## Limitations", "| cat |"):
        assert words in body
    assert "Trained from random features" in body and 'timm.create_model("hf-hub:USER/ants-model"' in body
    assert "onnxruntime" in body and "finetune predict model/model.onnx" in body


def test_no_local_path_in_any_text_file_of_the_folder(run, hub):
    splits = read_text_table(run / "splits.csv")
    forbidden = [str(run), str(Path.home()), str(hub.folder), str(Path(splits["path"][0]).parent.parent)]
    for file in hub.folder.iterdir():
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # weights and the ONNX graph
        for path in forbidden:
            assert path not in text, f"{path} in {file.name}"
        assert not re.search(r"(?<![\w:/.~])(/|~/)[\w.-]+/[\w.-]+", text), file.name


def test_markdown_names_are_escaped_and_no_test_split_is_called_optimistic(run, hub):
    assert model_card.escape_markdown("a_b|c*[d](e)\n#f") == r"a\_b\|c\*\[d\]\(e\) \#f"
    loaded = load_trained(run)
    facts = model_card.gather(RunDir(run), loaded, name="x|y", license="mit", parity={}, files=[])
    facts.metrics = {**facts.metrics, "evaluated_on": {"split": "val", "selection_split": True, "tta": []}}
    facts.reject = {"threshold": 0.8123, "target_accuracy": 0.95, "coverage": 0.5, "accuracy": 0.96}
    text = model_card.card_text(facts)
    assert "below **0.8123**, chosen on the validation split for 95% accuracy (50% of its images answered)" in text
    assert "# x\\|y" in text and "there was no test split" in text.lower() and "optimistic" in text
    assert "license: mit" in text and "split: val" in text


def _trained(name: str, **model) -> TrainedModel:
    """An untrained model as a run would hold it (refusals and head conversion need no training)."""
    recipe = recipe_from_dict(tiny_recipe(model={"name": name, **model}))
    bundle = build_model(ModelConfig(name=name, **model), num_classes=3, load_pretrained=False)
    record = CheckpointRecord(
        class_names=["a", "b", "c"], task=SingleLabel(), image=ImageConfig(32, (0.5,) * 3, (0.5,) * 3), recipe=recipe
    )
    bundle.model.eval()
    return TrainedModel(bundle=bundle, record=record)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "mobilenetv3_small_050", "vit_tiny_patch16_224"])
def test_each_family_round_trips_through_the_folder_a_dropout_head_as_timms_plain_classifier(name, tmp_path):
    loaded = _trained(name, head={"dropout": 0.3})
    hub_format.write_timm_folder(loaded, tmp_path, extra={})
    reloaded = hub_format.load_timm_folder(tmp_path)
    x = torch.randn(2, 3, 64, 64)  # not the architecture's default size: a ViT keeps dynamic_img_size in config.json
    with torch.inference_mode():
        assert torch.allclose(reloaded(x), loaded.bundle.model(x), atol=1e-4)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        ({"name": "tv:resnet18", "small_input": True}, "small-input stem"),
        ({"name": "resnet18", "head": {"hidden": 8}}, "hidden layer"),
    ],
)
def test_what_timm_cannot_build_is_refused_with_the_reason(model, why):
    loaded = _trained(**model)
    with pytest.raises(ModelError, match=f"cannot write .* as a timm model for the Hub: .*{why}.*export --format onnx"):
        hub_format.timm_model(loaded)


def test_bad_options_are_refused_before_any_work(run, tmp_path):
    with pytest.raises(UsageError, match="--push uploads a Hub folder: add --format hub"):
        export(run=run, formats="onnx", push="me/x", out=tmp_path / "a", progress=False)
    with pytest.raises(UsageError, match="--push nothing-here: name the owner too, as USER/NAME"):
        export(run=run, formats="hub", push="nothing-here", out=tmp_path / "b", progress=False)
    with pytest.raises(UsageError, match="not a Hub repository id"):
        export(run=run, formats="hub", push="me/bad name!", out=tmp_path / "c", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(
        RunDirError, match=r"has no report/metrics.json and per_class.csv for the model card; write them with 'finetune eval"
    ):
        model_card.check_report(RunDir(tmp_path))


class FakeHfApi:
    calls: list = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        ignored = kwargs.get("ignore_patterns") or []
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir() if not any(fnmatch(p.name, i) for i in ignored))
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_creates_the_repo_and_uploads_the_whole_folder(run, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    out = tmp_path / "pushed"
    result = CliRunner().invoke(app, ["export", str(run), "--format", "hub", "--out", str(out), "--push", "me/ants", "-q"])
    assert result.exit_code == 0, result.output
    assert "pushed to the Hub: https://huggingface.co/me/ants/commit/abc" in result.output
    (create, created), (upload, uploaded) = FakeHfApi.calls
    assert create == "create_repo" and created == {"repo_id": "me/ants", "repo_type": "model", "private": False, "exist_ok": True}
    assert upload == "upload_folder" and uploaded["repo_id"] == "me/ants" and uploaded["repo_type"] == "model"
    assert Path(uploaded["folder_path"]) == out
    assert uploaded["files"] == ["README.md", "config.json", "model.onnx", "model.safetensors", "parity.json"]
    assert 'hf-hub:me/ants"' in (out / "README.md").read_text()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_push_without_a_reachable_hub_fails_fast_in_one_line(run, hub, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_test")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # read once, when huggingface_hub is imported
    started = time.perf_counter()
    with pytest.raises(HubError, match=r"could not push .* to the Hub repository me/ants: .*check the network") as caught:
        hub_push.push_folder(hub.folder, "me/ants")
    assert time.perf_counter() - started < 5 and "\n" not in str(caught.value)
    result = CliRunner().invoke(
        app, ["export", str(run), "--format", "hub", "--out", str(hub.folder), "--overwrite", "--push", "me/ants", "-q"]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "could not push" in lines[0] and "Traceback" not in result.output
    assert (hub.folder / "README.md").is_file()  # the folder stays complete for a later upload
