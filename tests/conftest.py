"""Tiny image folders in assorted modes and a tiny-but-real recipe, shared by the tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. torch's default (spin, then sleep) turns every parallel op into a
# wait for a busy core whenever anything else runs beside it: a DataLoader worker, a CLI subprocess, another job on
# the machine. On 2 shared cores a ResNet-18 step at 32 px took 1.4 s with 2 spinning threads, 0.08 s without the
# spin. Set before torch is imported (here and in every subprocess, which inherits it); a value given outside wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
CLASSES = ("cat", "dog", "eel")  # three classes: never the default 1000


def _pattern(label: int, i: int, size: int = 32) -> np.ndarray:
    """A class-dependent image (colour + stripes) so that a tiny model can learn something."""
    rng = np.random.default_rng(label * 1000 + i)
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    img[..., label % 3] += 150  # colour and stripe position tell up to 3 x 8 classes apart
    img[:, (label * 5) % size :: 8] = 255
    return img


def write_mode_image(path: Path, mode: str, array: np.ndarray) -> None:
    """Save `array` (HxWx3 uint8) as the given kind of file."""
    rgb = Image.fromarray(array, "RGB")
    if mode == "rgb_jpeg":
        rgb.save(path.with_suffix(".jpg"), quality=95)
    elif mode == "grey_png":
        rgb.convert("L").save(path.with_suffix(".png"))
    elif mode == "palette_png":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(path.with_suffix(".png"))
    elif mode == "rgba_png":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(path.with_suffix(".png"))
    elif mode == "grey16_png":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path.with_suffix(".png"))
    elif mode == "cmyk_jpeg":
        rgb.convert("CMYK").save(path.with_suffix(".jpg"))
    elif mode == "exif_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 CW on display
        rgb.save(path.with_suffix(".jpg"), exif=exif)
    elif mode == "gif_as_jpg":
        rgb.convert("P").save(path.with_suffix(".jpg"), format="GIF")
    else:
        raise ValueError(mode)


MODES = ("rgb_jpeg", "grey_png", "palette_png", "rgba_png", "grey16_png", "cmyk_jpeg", "exif_jpeg", "gif_as_jpg")


def make_folder(root: Path, *, per_class: int = 8, classes=CLASSES, size: int = 32) -> Path:
    """root/<class>/img_<i>.<ext> in assorted modes."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            write_mode_image(root / name / f"img_{i:02d}", MODES[i % len(MODES)], _pattern(label, i, size))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "flat")


@pytest.fixture
def presplit_folder(tmp_path: Path) -> Path:
    root = tmp_path / "presplit"
    make_folder(root / "train", per_class=6)
    make_folder(root / "val", per_class=3)
    return root


def tiny_recipe(**sections) -> dict:
    """A recipe that trains in seconds: ResNet-18 at 32 px, one epoch, no workers.

    fp32 on every machine (`amp: off`): `auto` picks bf16 where the CPU computes it natively, and the tests that
    compare two runs number for number (cache or none, resumed or not, two processes or one) must not depend on the
    machine they run on. tests/test_precision.py tests `auto` itself.
    """
    recipe = {
        "seed": 0,
        "data": {"val_fraction": 0.25, "batch_size": 8, "num_workers": 0},
        "model": {"name": "resnet18", "pretrained": False},
        "transforms": {"input_size": 32, "train": "light"},
        "train": {"epochs": 1, "lr": 0.001, "amp": "off"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    if "phases" in recipe["train"]:  # phases carry their own epochs and lr
        recipe["train"].pop("epochs", None)
        recipe["train"].pop("lr", None)
    return recipe


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # `pytest -n N`: the cores are shared N ways
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    return


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_dir(tmp_path_factory):
    """Feature caches go to a temporary folder (subprocesses inherit it), never to the user's ~/.cache."""
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    return


@pytest.fixture(autouse=True, scope="module")
def _module_scratch_is_removed(request, tmp_path_factory):
    """Folders a module's fixtures made (runs, checkpoints: gigabytes over a session) go when its tests all pass.

    Per-test `tmp_path` folders go with each passing test (`tmp_path_retention_policy = "failed"`); a
    failing module keeps everything for inspection.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Captured output stays printable: a test of file names that are not UTF-8 logs them with surrogate escapes,
    which pytest-xdist cannot send from its worker (execnet encodes strict UTF-8)."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections]
