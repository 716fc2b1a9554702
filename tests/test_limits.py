"""Sizes are bounded before memory is spent (issue 27, item 3; finetune/data/limits.py): a file too large is not
read, an image with too many pixels is not decoded, and a thin image is resized without scaling its short side to
full size first, the same way in screening, training, evaluation, export parity and prediction."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import check, evaluate, export, predict, train
from finetune.config.loading import recipe_from_dict
from finetune.data import limits
from finetune.data.decode import decode_bytes, load_image
from finetune.data.facts import examine_image
from finetune.data.transforms import resize_shorter_and_crop
from finetune.errors import DataError

from conftest import make_folder, tiny_recipe

THIN = {"tall strip": (3_000_000, 1), "wide strip": (1, 3_000_000), "two rows": (2, 600_000), "narrow": (20_000, 7)}


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:  # no data written: the file system stores a hole
        handle.truncate(size)
    return path


@pytest.fixture
def no_reading(monkeypatch):
    """Reading any file's bytes fails the test: a size limit must hold before a byte is read."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{self} was read")

    monkeypatch.setattr(Path, "read_bytes", refuse)


@pytest.mark.parametrize(
    ("name", "size"),
    [("photo.jpg", 30 * 2**30), ("scan.PNG", limits.MAX_FILE_BYTES + 1), ("frame.jpeg", 4 * 2**30), ("x.tif", 2**31)],
)
def test_a_file_over_the_size_limit_is_skipped_unread(tmp_path, no_reading, name, size):
    path = _sparse(tmp_path / name, size)
    facts = examine_image(path)
    assert facts.problem == "too large" and "over the limit of 1.0 GB per image file (not read)" in facts.detail
    with pytest.raises(DataError, match=r"cannot read image .*: .* GB on disk, over the limit of 1\.0 GB"):
        load_image(path)


def test_a_file_at_the_size_limit_is_read(tmp_path):
    path = _sparse(tmp_path / "blank.jpg", 4096)
    assert examine_image(path).problem == "not an image"  # read and looked at: not refused for its size


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (its data is a few bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def _bmp_header(path: Path, width: int, height: int) -> Path:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + info + b"\0" * 64)
    return path


@pytest.mark.parametrize(
    ("make", "width", "height"),
    [(_png_header, 60_000, 60_000), (_png_header, 1, 200_000_000), (_png_header, 13_400, 13_400), (_bmp_header, 20_000, 9_000)],
)
@pytest.mark.parametrize("pillow_limit", ["pillow's", "none"])
def test_a_header_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch, make, width, height, pillow_limit):
    if pillow_limit == "none":  # a program that switched Pillow's own check off still gets finetune's
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = make(tmp_path / f"big{make.__name__}", width, height)
    facts = examine_image(path)
    assert facts.problem == "too many pixels", facts
    assert f"{width * height:,} pixels (from its header), over the limit of 178,956,970" in facts.detail
    with pytest.raises(DataError, match=r"cannot decode image .*: .*pixels \(from its header\), over the limit"):
        load_image(path)
    with pytest.raises(DataError, match="over the limit of 178,956,970"):
        decode_bytes(path.read_bytes(), where="upload")


@pytest.fixture
def resize_sizes(monkeypatch):
    """Every size Pillow is asked to resize to; one over the budget fails at once (before memory is asked for)."""
    asked: list[tuple[int, int]] = []
    original = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        asked.append(tuple(size))
        assert size[0] * size[1] <= limits.MAX_RESIZE_PIXELS, f"a resize to {size} was asked for"
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return asked


@pytest.mark.parametrize("shape", list(THIN.values()), ids=list(THIN))
@pytest.mark.parametrize(
    ("size", "crop_pct", "interpolation"), [(224, 0.875, "bilinear"), (32, 1.0, "bicubic"), (384, 0.95, "area")]
)
def test_a_thin_image_is_resized_without_scaling_its_short_side_to_full_size(resize_sizes, shape, size, crop_pct, interpolation):
    image = np.zeros((*shape, 3), np.uint8)
    image[..., 0] = 200
    out = resize_shorter_and_crop(image, size=size, crop_pct=crop_pct, interpolation=interpolation)
    assert out.shape == (size, size, 3) and (out[..., 0] == 200).all() and resize_sizes


def test_an_ordinary_image_keeps_timms_exact_resize(resize_sizes):
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    assert limits.fit_for_resize(image, short_side=256, crop=224) is image
    out = resize_shorter_and_crop(image, size=224, crop_pct=0.875, interpolation="bilinear")
    assert resize_sizes == [(341, 256)] and out.shape == (224, 224, 3)


@pytest.mark.parametrize("shape", [(3, 60_000), (3, 60_001), (5, 90_001), (60_001, 3)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_fitted_thin_image_shows_what_the_full_size_resize_shows(shape, interpolation):
    """Small enough for the full-size resize to be affordable here (20 M pixels): its crop and the fitted one agree
    within one level on a picture that is smooth at the scale of a source pixel."""
    long = max(shape)
    wave = (127.5 + 127.5 * np.sin(2 * np.pi * np.arange(long) / 400)).astype(np.uint8)
    line = wave[None, :, None] if shape[1] > shape[0] else wave[:, None, None]
    image = np.ascontiguousarray(np.broadcast_to(line, (*shape, 3)))
    assert limits.fit_for_resize(image, short_side=32, crop=32).size < image.size // 1000
    scaled = Image.fromarray(image).resize(
        (32, 32 * long // min(shape)) if shape[0] > shape[1] else (32 * long // min(shape), 32),
        getattr(Image.Resampling, interpolation.upper()),
    )
    full = np.asarray(scaled)
    top, left = round((full.shape[0] - 32) / 2), round((full.shape[1] - 32) / 2)
    fitted = resize_shorter_and_crop(image, size=32, crop_pct=1.0, interpolation=interpolation)
    assert np.abs(full[top : top + 32, left : left + 32].astype(int) - fitted).max() <= 1


def _thin_png(path: Path, height: int, width: int, value: int) -> None:
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)


@pytest.fixture(scope="module")
def thin_data(tmp_path_factory):
    """A folder whose every class holds two strips of 1 x 300,000 px (scaled to 32 px across: 9.6 M px long), one
    tall, one wide, so training, validation or test meets them."""
    root = make_folder(tmp_path_factory.mktemp("limits") / "data", per_class=6)
    for i, name in enumerate(sorted(p.name for p in root.iterdir())):
        _thin_png(root / name / "strip.png", 300_000, 1, 40 * i)
        _thin_png(root / name / "band.png", 1, 300_000, 40 * i + 20)
    return root


@pytest.fixture(scope="module")
def run(thin_data, tmp_path_factory):
    recipe = recipe_from_dict(tiny_recipe(data={"test_fraction": 0.25}))
    return train(recipe=recipe, data=thin_data, out=tmp_path_factory.mktemp("limits-run") / "run", progress=False).run_dir


def test_thin_images_train_evaluate_export_and_predict(run, thin_data, tmp_path):
    assert not (run / "skipped.csv").exists() or "strip.png" not in (run / "skipped.csv").read_text()
    report = evaluate(run=run, data=thin_data, out=tmp_path / "eval", progress=False)
    assert report.metrics["num_images"] == len(list(thin_data.rglob("*.*")))
    result = export(run=run, formats="onnx", out=tmp_path / "export", progress=False)
    assert result.parity["onnx"]["top1_agreement"] == 1.0
    strips = sorted(str(p) for p in thin_data.rglob("*.png") if p.stem in ("strip", "band"))
    table = predict(run=run, inputs=strips, progress=False)
    assert list(table["path"]) == strips


def test_predict_skips_a_huge_file_with_its_reason_and_refuses_it_alone(run, thin_data, tmp_path, caplog):
    big = _sparse(tmp_path / "huge.jpg", 30 * 2**30)
    good = sorted(str(p) for p in thin_data.rglob("*.png"))[:2]
    table = predict(run=run, inputs=[big, *good], progress=False)
    assert list(table["path"]) == good
    assert "huge.jpg (too large: 30.0 GB on disk" in caplog.text
    with pytest.raises(DataError, match=r"could be decoded, e\.g\. .*huge\.jpg \(too large: 30\.0 GB on disk"):
        predict(run=run, inputs=[big], progress=False)


def test_check_lists_huge_files_and_headers_with_their_reason(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4)
    _sparse(data / "cat" / "huge.jpg", 30 * 2**30)
    _png_header(data / "eel" / "bomb.png", 60_000, 60_000)
    findings = check(data=data, progress=False).findings.set_index("kind")
    assert "huge.jpg" in findings.loc["too large", "path"]
    assert "bomb.png" in findings.loc["too many pixels", "path"]
    assert os.stat(data / "cat" / "huge.jpg").st_blocks < 100  # the hole was never read into, nor written
