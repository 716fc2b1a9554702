"""What `finetune export` may delete (only what its own manifest lists), how it writes (staged, locked, whole or not at
all), and how an exported file is checked before it is trusted (a sealed contract, every field's type and range, the
graph against the contract). Every refusal is one line, and leaves every file as it was."""

import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch
from typer.testing import CliRunner

from finetune import check, evaluate, explain, export, find_lr, label, predict, train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict
from finetune.deploy import export_folder, metadata, onnx_format, torchscript_format
from finetune.deploy.runtime import load_exported
from finetune.errors import CheckpointError, ModelError, RunDirError, UsageError
from finetune.reporting.diff import diff_reports
from finetune.run_dir import folder_lock

from conftest import make_folder, tiny_recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("trust") / "data", per_class=6)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    recipe = recipe_from_dict(tiny_recipe(data={"test_fraction": 0.25}))
    return train(recipe=recipe, data=data, out=tmp_path_factory.mktemp("trust-run") / "run", progress=False).run_dir


@pytest.fixture(scope="module")
def shipped(run, tmp_path_factory):
    """One export of each kind, never changed: tests tamper with copies."""
    folder = tmp_path_factory.mktemp("shipped")
    both = export(run=run, formats="both", out=folder / "both", progress=False).files
    return {**both, "pt2": export(run=run, formats="pt2", out=folder / "pt2", progress=False).files["pt2"]}


def _tree(root):
    """Every file and folder under root with its content hash: what 'nothing was touched' compares."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or path.is_dir():
            found[str(path)] = "link" if path.is_symlink() else "dir"
        else:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value) and str(exc_info.value)


# 1. An output option never deletes what it did not write.


def test_export_overwrite_refuses_every_destination_it_did_not_write(run, tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    (tmp_path / "mine" / "model.onnx").write_text("a file an export would write, but no export wrote")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "to_run").symlink_to(run, target_is_directory=True)
    (tmp_path / "to_parent").symlink_to(run.parent, target_is_directory=True)
    lying = tmp_path / "lying"
    lying.mkdir()
    (lying / "recipe.txt").write_text("keep me")
    (lying / export_folder.MANIFEST).write_text(json.dumps({"kind": export_folder.KIND, "files": ["recipe.txt"]}))
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine")
    monkeypatch.setenv("HOME", str(home))
    workdir = tmp_path / "w" / "work"
    workdir.mkdir(parents=True)
    (workdir / "draft.txt").write_text("draft")
    monkeypatch.chdir(workdir)
    spellings = {
        run: r"is the run folder",
        run / "checkpoints" / "..": r"is the run folder",
        run / "checkpoints": r"is the run folder .*/checkpoints",
        run.parent: r"holds the run",
        tmp_path / "to_run": r"is the run folder",
        tmp_path / "to_parent": r"holds the run",
        tmp_path / "mine": r"holds files no finetune export wrote \(model.onnx, notes.txt\); nothing was deleted",
        lying: r"lying/export_manifest.json is damaged or lists files no export writes; nothing was deleted",
        tmp_path / "afile": r"afile is a file, not a folder",
        home: r"is your home folder",
        home.parent: r"holds (the working folder|your home folder)",
        ".": r"--out \. is the working folder",
        "..": r"--out \.\. holds the working folder",
    }
    before = {**_tree(tmp_path), **_tree(run.parent)}
    for out, message in spellings.items():
        with pytest.raises(RunDirError, match=message) as caught:
            export(run=run, out=out, overwrite=True, progress=False)
        _one_line(caught)
    assert {**_tree(tmp_path), **_tree(run.parent)} == before
    done = CliRunner().invoke(app, ["export", str(run), "--out", str(run), "--overwrite"])
    assert done.exit_code == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.output
    assert {**_tree(tmp_path), **_tree(run.parent)} == before


def test_a_second_overwrite_replaces_only_the_previous_export(run, shipped, tmp_path):
    folder = tmp_path / "x"
    shutil.copytree(shipped["onnx"].parent, folder)  # a formats="both" export: onnx, torchscript, parity.json
    (folder / f"{export_folder.STAGING}123-dead").mkdir()  # left by a killed export
    (folder / f"{export_folder.STAGING}123-dead" / "model.onnx").write_bytes(b"half")
    with pytest.raises(RunDirError, match=r"x exists and is not empty; pass --overwrite"):
        export(run=run, out=folder, formats="pt2", progress=False)
    result = export(run=run, out=folder, formats="pt2", overwrite=True, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [export_folder.MANIFEST, "model.pt2", "parity.json"]
    assert json.loads((folder / export_folder.MANIFEST).read_text())["files"] == ["model.pt2", "parity.json"]
    assert result.files["pt2"] == folder / "model.pt2" and load_exported(result.files["pt2"]).class_names
    (folder / "notes.txt").write_text("mine")
    before = _tree(folder)
    with pytest.raises(RunDirError, match=r"holds an earlier export and files it did not write \(notes.txt\)"):
        export(run=run, out=folder, formats="pt2", overwrite=True, progress=False)
    assert _tree(folder) == before


def test_an_export_into_a_folder_another_export_is_writing_is_refused(run, tmp_path, monkeypatch):
    folder = tmp_path / "busy"
    with folder_lock(folder), pytest.raises(RunDirError, match=r"busy is being written by another finetune export"):
        export(run=run, out=folder, progress=False)
    from finetune.runs import export as export_module

    real, seen = export_module._parity, []

    def a_second_export_meanwhile(*args):
        with pytest.raises(RunDirError, match=r"being written by another finetune export") as caught:
            export(run=run, out=folder, overwrite=True, progress=False)
        seen.append(str(caught.value))
        return real(*args)

    monkeypatch.setattr(export_module, "_parity", a_second_export_meanwhile)
    assert export(run=run, out=folder, formats="pt2", progress=False).files["pt2"].is_file() and seen


def test_a_failed_export_leaves_nothing_half_written(run, shipped, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("exporter crashed\nsecond line")

    monkeypatch.setattr(torchscript_format, "export_torchscript", fails)  # after model.onnx was written and checked
    with pytest.raises(ModelError, match=r"torchscript export of resnet18 failed \(exporter crashed\); nothing was written"):
        export(run=run, out=tmp_path / "new", formats="both", progress=False)
    assert not (tmp_path / "new").exists()
    shutil.copytree(shipped["pt2"].parent, tmp_path / "old")
    before = _tree(tmp_path / "old")
    with pytest.raises(ModelError, match=r"nothing was written"):
        export(run=run, out=tmp_path / "old", formats="torchscript", overwrite=True, progress=False)
    assert _tree(tmp_path / "old") == before  # the previous export, untouched


def test_every_other_out_refuses_a_run_folder_a_parent_and_a_runs_own_files(run, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree(run.parent)
    folder_commands = {
        "eval": lambda out: evaluate(run=run, data=data, out=out, progress=False),
        "explain": lambda out: explain(run=run, inputs=[data / "cat"], out=out, progress=False),
        "label": lambda out: label(run=run, unlabeled=data / "cat", out=out, progress=False),
        "diff": lambda out: diff_reports(run_a=run, run_b=run, out=out),
        "lr-find": lambda out: find_lr(recipe=run / "recipe.yaml", data=data, out=out, progress=False),
    }
    for command in folder_commands.values():
        for out, message in [(run, "is the run folder"), (run / "checkpoints", "is the run folder"), (run.parent, "holds")]:
            with pytest.raises(RunDirError, match=message) as caught:
                command(out)
            _one_line(caught)
        with pytest.raises(RunDirError, match=r"is the working folder"):
            command(".")
    link = tmp_path / "splits_link.csv"
    link.symlink_to(run / "splits.csv")
    for out in (run / "splits.csv", run / "recipe.yaml", run / "checkpoints" / "best.csv", link):
        with pytest.raises(RunDirError, match=r"would replace .* of the run folder"):
            predict(run=run, inputs=[data / "cat"], out=out, progress=False)
        with pytest.raises(RunDirError, match=r"--json .* would replace"):
            check(data=data, json_out=out, progress=False)
    assert _tree(run.parent) == before
    table = predict(run=run, inputs=[data / "cat"], out=run / "predictions.csv", progress=False)  # a new name is fine
    assert len(table) == 6 and (run / "predictions.csv").is_file()
    (run / "predictions.csv").unlink()


# 2. Exported files are checked before they are trusted.


def test_opset_is_checked_against_what_this_installation_supports(run):
    low, high = onnx_format.opset_range()
    assert low == 7 and 18 <= high <= 30
    for opset in (0, low - 1, high + 1, 99, True, "18", 18.0):
        with pytest.raises(UsageError, match=rf"--opset .*: this installation .* exports and runs ONNX opsets {low} to {high}"):
            export(run=run, opset=opset, progress=False)
    done = CliRunner().invoke(app, ["export", str(run), "--opset", "99"])
    assert done.exit_code == 2 and len(done.stderr.strip().splitlines()) == 1 and f"opsets {low} to {high}" in done.stderr


def test_export_refuses_a_checkpoint_from_another_run(run, tmp_path):
    for change, message in [("classes", r"its classes .* are not the run's"), ("recipe", r"its recipe differs .*train.lr")]:
        copy = tmp_path / change
        shutil.copytree(run, copy)
        payload = torch.load(copy / "checkpoints" / "best.pt", weights_only=True)
        if change == "classes":
            payload["class_names"] = list(reversed(payload["class_names"]))
        else:
            payload["recipe"]["train"]["lr"] = 0.5
        torch.save(payload, copy / "checkpoints" / "best.pt")
        with pytest.raises(CheckpointError, match=rf"best.pt does not belong to the run .*{change}: {message}") as caught:
            export(run=copy, out=tmp_path / f"out-{change}", progress=False)
        _one_line(caught)
        assert not (tmp_path / f"out-{change}").exists()


def _onnx_with(source, target, edit):
    """A copy of an .onnx file whose metadata `edit` changed (without sealing it again)."""
    import onnx

    model = onnx.load(str(source))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(target))
    return target


def _torchscript_with(source, target, edit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        module = torch.jit.load(str(source))
        meta = torchscript_format.read_metadata(source)
        edit(meta)
        torch.jit.save(module, str(target), _extra_files={metadata.TORCHSCRIPT_EXTRA: json.dumps(meta)})
    return target


def _set(key, value):
    def edit(meta):
        meta[key] = value

    return edit


def _foreign(tmp_path, *, outputs, size):
    """An .onnx a user built with torch.onnx.export: uint8 NHWC image in, logits and probs out, no finetune metadata."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, outputs)

        def forward(self, image):
            logits = self.linear(image.to(torch.float32).mean(dim=(1, 2)))
            return logits, logits.softmax(dim=1)

    path = tmp_path / f"foreign_{outputs}_{size}.onnx"
    torch.onnx.export(
        Tiny().eval(),
        (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits", "probs"],
        dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}, "probs": {0: "b"}},
    )
    return path


def test_damaged_foreign_and_tampered_exports_are_one_line(shipped, tmp_path):
    onnx_file, script, program = shipped["onnx"], shipped["torchscript"], shipped["pt2"]
    meta = onnx_format.read_metadata(onnx_file)
    assert metadata.CHECKSUM in meta and torchscript_format.read_metadata(program)[metadata.CHECKSUM]
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "half.onnx").write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    (tmp_path / "junk.onnx").write_bytes(os.urandom(4096))
    half_script = tmp_path / "half.torchscript.pt"
    half_script.write_bytes(script.read_bytes()[:-2000])
    sealed = metadata.seal({**meta, "parity": {}})
    cases = {
        tmp_path / "empty.onnx": r"empty.onnx is empty \(0 bytes\)",
        tmp_path / "half.onnx": r"half.onnx is not a readable ONNX file",
        tmp_path / "junk.onnx": r"junk.onnx is not a readable ONNX file|carries no finetune metadata",
        half_script: r"half.torchscript.pt is not a readable exported file|graph cannot be loaded",
        _foreign(tmp_path, outputs=3, size=32): r"carries no finetune metadata",
        _onnx_with(_foreign(tmp_path, outputs=5, size=32), tmp_path / "transplant5.onnx", lambda m: m.update(sealed)): (
            r"metadata lists 3 classes but the graph gives 5 outputs per image"
        ),
        _onnx_with(_foreign(tmp_path, outputs=3, size=40), tmp_path / "transplant40.onnx", lambda m: m.update(sealed)): (
            r"does not take the 32 x 32 uint8 image its metadata describes"
        ),
        _onnx_with(onnx_file, tmp_path / "names.onnx", _set("class_names", ["dog", "cat", "eel"])): r"changed after export",
        _onnx_with(onnx_file, tmp_path / "temp.onnx", _set("temperature", 1.0)): r"changed after export",
        _onnx_with(onnx_file, tmp_path / "old.onnx", lambda m: m.pop(metadata.CHECKSUM)): r"has no contract checksum",
        _torchscript_with(script, tmp_path / "top.torchscript.pt", _set("top_k", 1)): r"changed after export",
        _torchscript_with(
            script, tmp_path / "wide.torchscript.pt", lambda m: m.update(metadata.seal({**m, "class_names": list("abcd")}))
        ): (r"metadata lists 4 classes but the graph gives 3"),
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as caught:
            load_exported(path)
        _one_line(caught)
    (tmp_path / "empty.pt2").write_bytes(b"")  # no archive: read as a checkpoint, and refused as one
    (tmp_path / "empty.torchscript.pt").write_bytes(b"")
    bad = ("empty.onnx", "transplant5.onnx", "names.onnx", "empty.pt2", "empty.torchscript.pt")
    for path in (tmp_path / name for name in bad):
        done = CliRunner().invoke(app, ["predict", str(path), str(shipped["onnx"].parent)])
        assert done.exit_code == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.output


def _valid():
    return {
        "format": metadata.FORMAT,
        "class_names": ["cat", "dog", "eel"],
        "input": {"height": 32, "width": 32},
        "resize": {"crop": 32, "crop_pct": 0.875, "interpolation": "bicubic"},
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "temperature": 1.3,
        "top_k": 5,
        "tta": ["hflip"],
        "task": "single_label",
    }


BAD_FIELDS = [
    ("class_names", []),
    ("class_names", ["cat", "cat"]),
    ("class_names", [1, 2]),
    ("class_names", ["cat", " "]),
    ("class_names", "cat,dog"),
    ("input", {"height": 32, "width": 40}),
    ("input", {"height": 0, "width": 0}),
    ("input", {"height": True, "width": True}),
    ("resize", {"crop": 0, "crop_pct": 0.875, "interpolation": "bicubic"}),
    ("resize", {"crop": "32", "crop_pct": 0.875, "interpolation": "bicubic"}),
    ("resize", {"crop": 32, "crop_pct": 0, "interpolation": "bicubic"}),
    ("resize", {"crop": 32, "crop_pct": 1.5, "interpolation": "bicubic"}),
    ("resize", {"crop": 32, "crop_pct": float("nan"), "interpolation": "bicubic"}),
    ("resize", {"crop": 32, "crop_pct": 1e-6, "interpolation": "bicubic"}),
    ("resize", {"crop": 32, "crop_pct": 0.875, "interpolation": "lanczos"}),
    ("resize", {"crop": 24, "crop_pct": 0.875, "interpolation": "bicubic"}),  # not the input's 32
    ("mean", [0.5, 0.5]),
    ("mean", [0.5, 0.5, float("inf")]),
    ("mean", ["a", 0.5, 0.5]),
    ("mean", [0.5, 0.5, True]),
    ("std", [0.2, 0.0, 0.2]),
    ("std", [0.2, -0.1, 0.2]),
    ("std", [0.2, 0.2, 0.2, 0.2]),
    ("std", None),
    ("temperature", 0),
    ("temperature", -1.0),
    ("temperature", float("inf")),
    ("temperature", "1.0"),
    ("top_k", 0),
    ("top_k", 101),
    ("top_k", 2.5),
    ("top_k", True),
    ("tta", ["rot90"]),
    ("tta", "hflip"),
    ("tta", ["hflip", "hflip"]),
    ("task", "multi_label_v9"),
]


@pytest.mark.parametrize(("key", "value"), BAD_FIELDS, ids=[f"{k}={v!r}" for k, v in BAD_FIELDS])
def test_every_contract_field_is_checked_even_under_a_valid_checksum(key, value, tmp_path):
    metadata.check_contract(metadata.seal(_valid()), tmp_path / "m.onnx")
    meta = metadata.seal({**_valid(), key: value})
    with pytest.raises(CheckpointError, match=rf"m.onnx: metadata '{key}' is .*, expected|m.onnx: metadata input") as caught:
        metadata.check_contract(meta, tmp_path / "m.onnx")
    _one_line(caught)
    missing = metadata.seal({k: v for k, v in _valid().items() if k != key})
    with pytest.raises(CheckpointError, match=rf"lacks '{key}'|carries no finetune metadata"):
        metadata.check_contract(missing, tmp_path / "m.onnx")


def test_the_contracts_names_are_those_the_code_uses():
    from finetune.data.transforms import _PIL_RESAMPLE

    assert set(metadata.INTERPOLATIONS) == set(_PIL_RESAMPLE)
