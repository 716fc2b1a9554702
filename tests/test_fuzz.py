"""Fuzz: random recipe mutations and random or broken files through train / check / predict, in process.

Every failure must be a FinetuneError (one line for the CLI); nothing else may escape, and nothing may crash.
"""

import copy
import random
import shutil
import struct
import zlib

import numpy as np
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
