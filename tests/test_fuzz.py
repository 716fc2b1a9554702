"""Fuzz: random recipe mutations and random or broken files through train / check / predict, in process.

Every failure must be a FinetuneError (one line for the CLI); nothing else may escape, and nothing may crash.
"""

import copy
import math
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from finetune import check, predict, train
from finetune.errors import FinetuneError

from conftest import make_folder, tiny_recipe

MUTANTS = 300
TRAINED_AT_MOST = 12  # mutants that validate train for real; the rest stop after validation (the suite stays short)
ODD_VALUES = [
    None,
    True,
    float("inf"),
    float("nan"),
    2**40,
    -1,
    0,
    1,
    3,
    1e9,
    -1e-9,
    0.5,
    "",
    "x",
    "off",
    "none",
    "all",
    [],
    ["head"],
    ["bogus"],
    {},
    {"a": 1},
    True,
    "1e3",
    "NA",
]


def _paths(tree, prefix=()):
    for key, value in tree.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _mutate(tree, rng):
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(tree)))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.15:
            del parent[path[-1]]
        elif action < 0.25:
            parent[path[-1] + rng.choice(["s", "_", "x"])] = rng.choice(ODD_VALUES)
        elif action < 0.6:
            parent[path[-1]] = rng.choice(ODD_VALUES)
        else:
            value = parent[path[-1]]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                parent[path[-1]] = type(value)(value * rng.choice([0, 0.5, 2, -1]))
            else:
                parent[path[-1]] = rng.choice(ODD_VALUES)
    return tree


def _shrink(tree):
    """A mutant that validated: keep it cheap to train (1 epoch, small images), whatever else it says."""
    train_section = tree.setdefault("train", {})
    if isinstance(train_section, dict):
        if isinstance(train_section.get("phases"), list):
            for phase in train_section["phases"]:
                if isinstance(phase, dict):
                    phase["epochs"] = 1
        elif "epochs" in train_section or "phases" not in train_section:
            train_section["epochs"] = 1
    transforms = tree.setdefault("transforms", {})
    if isinstance(transforms, dict):
        transforms["input_size"] = 32
    return tree


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("fuzz") / "data", per_class=6)


def test_recipe_mutations_fail_only_with_finetune_errors(tmp_path, data):
    rng = random.Random(20261125)
    base = tiny_recipe()
    trained = failed = 0
    for i in range(MUTANTS):
        mutant = _mutate(base, rng)
        path = tmp_path / f"m{i}.yaml"
        path.write_text(yaml.safe_dump(mutant))
        try:
            from finetune import load_recipe

            load_recipe(path)
        except FinetuneError as exc:
            assert "\n" not in str(exc), str(exc)
            failed += 1
            continue
        if trained >= TRAINED_AT_MOST:
            continue
        path.write_text(yaml.safe_dump(_shrink(mutant)))
        try:
            train(recipe=path, data=data, out=tmp_path / f"run{i}", progress=False)
        except FinetuneError as exc:
            assert "\n" not in str(exc), str(exc)
        shutil.rmtree(tmp_path / f"run{i}", ignore_errors=True)  # 175 MB each
        trained += 1
    assert failed > MUTANTS // 2 and trained == TRAINED_AT_MOST  # the fuzz reached both the schema and training


def _bomb_png(path):
    """A valid PNG header that claims 60000 x 60000 pixels (a decompression bomb)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _broken_files(folder, rng):
    good = folder / "good.jpg"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(good)
    whole = good.read_bytes()
    png = folder / "good.png"
    Image.fromarray(np.full((40, 40, 3), 60, np.uint8)).save(png)
    made = []
    for i in range(40):
        target = folder / f"f{i}{rng.choice(['.jpg', '.png', '.gif', '.webp', '.tif', '.bmp'])}"
        kind = rng.random()
        if kind < 0.3:
            target.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400))))
        elif kind < 0.6:
            source = rng.choice([whole, png.read_bytes()])
            target.write_bytes(source[: rng.randint(0, len(source))])
        else:
            source = bytearray(rng.choice([whole, png.read_bytes()]))
            for _ in range(rng.randint(1, 20)):  # flipped bytes inside an otherwise valid file
                source[rng.randrange(len(source))] = rng.getrandbits(8)
            target.write_bytes(bytes(source))
        made.append(target)
    _bomb_png(folder / "bomb.png")
    return made


def test_random_and_truncated_files_through_check_train_and_predict(tmp_path, data):
    rng = random.Random(7)
    dirty = make_folder(tmp_path / "dirty", per_class=6)
    _broken_files(dirty / "cat", rng)
    result = check(data=dirty, progress=False)  # never raises on bad files: it reports them
    assert result.summary["errors"] > 10
    run = train(recipe=tiny_recipe_recipe(), data=dirty, out=tmp_path / "run", progress=False)
    skipped = (run.run_dir / "skipped.csv").read_text()
    assert "bomb.png" in skipped
    loose = tmp_path / "loose"
    loose.mkdir()
    _broken_files(loose, random.Random(8))
    try:
        table = predict(run=run.run_dir, inputs=[loose], progress=False)
        assert set(table["path"]) <= {str(p) for p in loose.iterdir()}
    except FinetuneError as exc:
        assert "\n" not in str(exc)


def tiny_recipe_recipe():
    from finetune.config.loading import recipe_from_dict

    return recipe_from_dict(tiny_recipe())


NUMBERS = [float("inf"), float("-inf"), float("nan"), True, False, 2**63, -(2**63), 1e308, -1e308, 5e-324, -0.0, -1, 0, "1e3"]


def _numeric_leaves(tree, prefix=()):
    """Every number of a resolved recipe, list items (mean, std) included, as a path of keys and indices."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _numeric_leaves(value, (*prefix, key))
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            yield from ((*prefix, key, i) for i in range(len(value)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield (*prefix, key)


def _numbers_are_finite(tree):
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else [tree]
    for value in values:
        if isinstance(value, (dict, list)):
            _numbers_are_finite(value)
        elif isinstance(value, float):
            assert math.isfinite(value), tree


def test_numeric_recipe_fields_take_odd_numbers_as_errors_or_finite_values():
    """Each number of a full recipe (the defaults made explicit, the optional ones set) replaced by an odd number,
    one at a time and a few at once: a one-line FinetuneError, or a recipe whose every number is finite; a boolean is
    never taken for a number."""
    from finetune.config.loading import recipe_from_dict

    base = recipe_from_dict(tiny_recipe()).to_dict()
    base["transforms"].update(crop_pct=0.9, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    base["model"]["head"]["hidden"] = 16
    base["train"]["grad_clip"] = 1.0
    base["train"]["early_stopping"]["patience"] = 3
    leaves = list(_numeric_leaves(base))
    rng = random.Random(27)
    cases = [[(leaf, value)] for leaf in leaves for value in NUMBERS]
    cases += [[(rng.choice(leaves), rng.choice(NUMBERS)) for _ in range(3)] for _ in range(100)]
    accepted = 0
    for changes in cases:
        tree = copy.deepcopy(base)
        for path, value in changes:
            parent = tree
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
        try:
            recipe = recipe_from_dict(tree)
        except FinetuneError as exc:
            assert "\n" not in str(exc), str(exc)
            continue
        assert not any(isinstance(value, bool) for _, value in changes), changes
        _numbers_are_finite(recipe.to_dict())
        accepted += 1
    assert len(leaves) >= 20 and 0 < accepted < len(cases)


SPELLINGS = ("relative", "absolute", "dot", "dot-dot", "double slash", "symlinked file", "symlinked folder")


def _spell(path, how, root, rng):
    """`path` (under root/data) written another way that names the same file, relative to the manifest in root."""
    relative = path.relative_to(root)
    if how == "absolute":
        return str(path)
    if how == "dot":
        return "./" + "/./".join(relative.parts)
    if how == "dot-dot":
        return "/".join((*relative.parts[:-1], "..", relative.parts[-2], relative.parts[-1]))
    if how == "double slash":
        return "//".join(relative.parts)
    if how == "symlinked file":
        link = root / "links" / f"{rng.getrandbits(32):08x}{path.suffix}"
        link.symlink_to(path)
        return str(link.relative_to(root))
    if how == "symlinked folder":
        return str(Path("class_links") / path.parent.name / path.name)
    return str(relative)


def test_manifest_path_spellings_name_one_file_once(tmp_path):
    """Random manifests over one folder, every row spelled its own way, some files repeated, some under a second
    label, some splits without training rows: the error says which file is under two labels exactly when one is, and
    otherwise every file is one sample."""
    from finetune.data.scan import read_manifest
    from finetune.data.split import split_samples

    root = tmp_path
    data = make_folder(root / "data", per_class=3)
    (root / "links").mkdir()
    (root / "class_links").mkdir()
    for folder in data.iterdir():
        (root / "class_links" / folder.name).symlink_to(folder)
    files = sorted(p for p in data.rglob("*.*"))
    rng = random.Random(2027)
    refused = kept = 0
    for trial in range(60):
        rows = []
        for path in rng.sample(files, rng.randint(4, len(files))):
            for _ in range(rng.choice([1, 1, 2, 3])):
                label = path.parent.name if rng.random() > 0.04 else "other"
                rows.append((_spell(path, rng.choice(SPELLINGS), root, rng), label, rng.choice(["", "train", "val", "test"])))
        rng.shuffle(rows)
        manifest = root / f"m{trial}.csv"
        pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(manifest, index=False)
        labels = {}
        for written, label, _ in rows:
            labels.setdefault((root / written).resolve(), set()).add(label)
        try:
            samples = read_manifest(manifest)
        except FinetuneError as exc:
            assert "is listed under 2 labels" in str(exc) and "\n" not in str(exc), str(exc)
            assert any(len(found) > 1 for found in labels.values())
            refused += 1
            continue
        assert all(len(found) == 1 for found in labels.values())
        assert sorted(Path(p).resolve() for p in samples["path"]) == sorted(labels)  # each file once
        try:
            split_samples(samples, val_fraction=0.25, test_fraction=0.0, seed=0, source=manifest)
        except FinetuneError as exc:
            assert "\n" not in str(exc)
        kept += 1
    assert refused and kept


METADATA_MUTANTS = 400
THROUGH_FILES = 60  # mutants also written into a real .onnx file and predicted with (the rest: the contract check only)


def _tiny_onnx(path):
    """A real exported file of a 3-class graph (finetune's packaging around a tiny model) and its valid contract."""
    import torch

    from finetune.data.transforms import ImageConfig
    from finetune.deploy import onnx_format
    from finetune.deploy.metadata import FORMAT
    from finetune.deploy.package import PackagedClassifier

    image = ImageConfig(input_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic")
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3))
    onnx_format.export_onnx(PackagedClassifier(model, image, 1.2), path, size=32, opset=17)
    return {
        "format": FORMAT,
        "class_names": ["cat", "dog", "eel"],
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "channels": "RGB", "height": 32, "width": 32},
        "outputs": {"logits": "raw scores", "probs": "softmax"},
        "resize": {"short_side": 36, "crop": 32, "crop_pct": 0.875, "interpolation": "bicubic", "steps": "..."},
        "mean": list(image.mean),
        "std": list(image.std),
        "temperature": 1.2,
        "top_k": 2,
        "tta": ["hflip"],
        "task": "single_label",
    }


def _store(path, meta):
    """The metadata written as is (no new checksum): what a hand edit of the file does."""
    import json

    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))


def _mutate_lists(tree, rng):
    """Change, drop or add one element of a list field (class names, mean, std, test-time views)."""
    lists = [key for key, value in tree.items() if isinstance(value, list)]
    if lists:
        key = rng.choice(lists)
        items = list(tree[key])
        action = rng.random()
        if action < 0.3 and items:
            items.pop(rng.randrange(len(items)))
        elif action < 0.5:
            items.append(rng.choice(ODD_VALUES + items))
        elif items:
            items[rng.randrange(len(items))] = rng.choice(ODD_VALUES)
        tree[key] = items
    return tree


def test_exported_metadata_mutations_fail_only_with_finetune_errors(tmp_path, data):
    from finetune.deploy.metadata import CHECKSUM, check_contract, seal
    from finetune.deploy.predictor import ExportedPredictor

    rng = random.Random(11)
    file = tmp_path / "tiny.onnx"
    base = _tiny_onnx(file)
    _store(file, seal(base))
    assert len(ExportedPredictor(file).predict([data / "cat"])) == 6
    outcomes = {"refused": 0, "accepted": 0}
    for n in range(METADATA_MUTANTS):
        mutant = _mutate(base, rng) if rng.random() < 0.7 else _mutate_lists(copy.deepcopy(base), rng)
        meta = seal(mutant) if rng.random() < 0.8 else {**mutant, CHECKSUM: seal(base)[CHECKSUM]}  # re-sealed or not
        try:
            check_contract(meta, file)
            outcomes["accepted"] += 1
        except FinetuneError as exc:
            assert "\n" not in str(exc), str(exc)
            outcomes["refused"] += 1
            if n >= THROUGH_FILES:
                continue
        if n >= THROUGH_FILES and outcomes["accepted"] > THROUGH_FILES:
            continue
        _store(file, meta)
        try:
            table = ExportedPredictor(file).predict([data / "cat"])
        except FinetuneError as exc:
            assert "\n" not in str(exc), str(exc)
            continue
        assert len(table) == 6 and set(table["predicted_label"]) <= set(meta["class_names"]), meta
    assert outcomes["refused"] > METADATA_MUTANTS // 2 and outcomes["accepted"] > 10, outcomes
