import albumentations as A
import numpy as np
import pytest

from finetune.config.schema import TransformsConfig
from finetune.data.transforms import ImageConfig, build_eval_pipeline, build_train_pipeline, resolve_image_config, save_pipeline

IMAGE = ImageConfig(input_size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), interpolation="bicubic", crop_pct=0.9)


@pytest.mark.parametrize("preset", ["none", "light", "standard", "strong"])
def test_presets_give_normalised_tensors_of_model_size(preset):
    pipeline = build_train_pipeline(TransformsConfig(train=preset), IMAGE, seed=0)
    out = pipeline(image=np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))["image"]
    assert tuple(out.shape) == (3, 48, 48) and out.dtype.is_floating_point


def test_explicit_list_from_yaml():
    cfg = TransformsConfig(train=[{"HorizontalFlip": {"p": 1.0}}, {"ToGray": {"p": 1.0}}])
    names = [type(t).__name__ for t in build_train_pipeline(cfg, IMAGE).transforms]
    assert names == ["HorizontalFlip", "ToGray", "Resize", "Normalize", "ToTensorV2"]


def test_size_and_normalisation_default_to_the_model_config():
    timm_cfg = {
        "input_size": (3, 224, 224),
        "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6),
        "interpolation": "bicubic",
        "crop_pct": 0.95,
    }
    image = resolve_image_config(TransformsConfig(), timm_cfg)
    assert (image.input_size, image.mean, image.std, image.crop_pct) == (224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0.95)
    image = resolve_image_config(TransformsConfig(input_size=64, mean=(0.5, 0.5, 0.5)), timm_cfg)
    assert image.input_size == 64 and image.mean == (0.5, 0.5, 0.5) and image.std == (0.4, 0.5, 0.6)


@pytest.mark.parametrize("which", ["train", "eval"])
def test_saved_pipelines_round_trip(tmp_path, which):
    pipeline = (
        build_train_pipeline(TransformsConfig(train="standard"), IMAGE, seed=5)
        if which == "train"
        else build_eval_pipeline(IMAGE)
    )
    save_pipeline(pipeline, tmp_path / "p.yaml")
    loaded = A.load(str(tmp_path / "p.yaml"), data_format="yaml")
    assert A.to_dict(loaded) == A.to_dict(pipeline)
    image = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    if which == "eval":  # deterministic: identical output
        assert np.array_equal(pipeline(image=image)["image"].numpy(), loaded(image=image)["image"].numpy())


def test_eval_pipeline_centre_crops_like_timm():
    image = np.zeros((100, 200, 3), np.uint8)
    out = build_eval_pipeline(IMAGE)(image=image)["image"]
    assert tuple(out.shape) == (3, 48, 48)


def test_eval_pipeline_equals_timm_create_transform_on_real_photos():
    """The evaluation pipeline is timm's own eval transform, pixel for pixel, on real JPEGs of every aspect ratio."""
    import timm
    from PIL import Image

    from finetune.data.decode import load_image
    from finetune.models.build import TV_DATA_CONFIG

    from conftest import HYMENOPTERA

    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} absent (fresh clone without ../shared)")
    paths = sorted(HYMENOPTERA.glob("val/*/*.jpg"))[::8]
    for model_config in (timm.data.resolve_model_data_config(timm.create_model("resnet50")), TV_DATA_CONFIG):
        reference = timm.data.create_transform(**model_config, is_training=False)
        ours = build_eval_pipeline(resolve_image_config(TransformsConfig(), model_config))
        for path in paths:
            image = load_image(path)
            expected = reference(Image.fromarray(image)).numpy()
            got = ours(image=image)["image"].numpy()
            assert got.shape == expected.shape == (3, 224, 224)
            assert np.abs(got - expected).max() < 1e-5, path
