"""The names a recipe may use: stages, presets, policies, models and albumentations transforms.

Declared once here; the schema, the models and the data pipeline read them from this module. It
imports nothing else from finetune, and the heavy libraries (timm, torchvision, albumentations)
only when a list is first asked for.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, get_args

Stage = Literal["stem", "layer1", "layer2", "layer3", "layer4", "head"]
STAGES: tuple[Stage, ...] = get_args(Stage)
NormPolicy = Literal["frozen", "train"]  # the recipe's `norm:` (older spelling `bn:`)
TrainPreset = Literal["none", "light", "standard", "strong"]
TRAIN_PRESETS: tuple[str, ...] = get_args(TrainPreset)
TV_PREFIX = "tv:"
# Image files finetune reads, and the format each extension promises (the doctor flags files that lie).
EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(EXTENSION_FORMATS)


class FamilyNames(NamedTuple):
    """The model names one backbone family covers."""

    timm_modules: tuple[str, ...] = ()  # as `timm.list_models(module=...)` takes them
    tv_prefixes: tuple[str, ...] = ()  # torchvision builder names starting so, written `tv:` + name
    exclude: tuple[str, ...] = ()  # timm names in those modules the family does not cover (fnmatch patterns)

    def excludes(self, model_name: str) -> bool:
        """Whether `model_name` is one of the timm names this family leaves out."""
        return any(fnmatch.fnmatchcase(model_name, pattern) for pattern in self.exclude)

    def describe(self, family: str) -> str:
        """'family (what it covers)', for messages that list the families."""
        covered = [f"timm {m}" for m in self.timm_modules] + [f"{TV_PREFIX}{p}*" for p in self.tv_prefixes]
        covered += [f"not {pattern}" for pattern in self.exclude]
        return f"{family} ({', '.join(covered)})"


# The model names of each backbone family, as plain data so that the schema can list them without importing
# models/; finetune/models/families.py gives each family here its stage table (and refuses a family missing
# on either side).
FAMILY_NAMES: Mapping[str, FamilyNames] = MappingProxyType(
    {
        "resnet": FamilyNames(timm_modules=("resnet",)),  # timm's ResNet, wide ResNet, ResNeXt, -D, SE, ...
        "resnetv2": FamilyNames(timm_modules=("resnetv2",)),  # timm's pre-activation ResNet (and BiT)
        "tv_resnet": FamilyNames(tv_prefixes=("resnet", "wide_resnet", "resnext")),
        "convnext": FamilyNames(timm_modules=("convnext",)),  # ConvNeXt v1 and v2
        "efficientnet": FamilyNames(timm_modules=("efficientnet",)),  # EfficientNet, -V2, -Lite, MixNet, MnasNet, ...
        "mobilenetv3": FamilyNames(timm_modules=("mobilenetv3",)),  # MobileNetV3 and V4, LCNet, FBNetV3
        "regnet": FamilyNames(timm_modules=("regnet",)),  # RegNetX, RegNetY, RegNetV
        # ViT and DeiT; the distilled DeiTs classify with two heads (timm's VisionTransformerDistilled)
        "vit": FamilyNames(timm_modules=("vision_transformer", "deit"), exclude=("*distilled*",)),
    }
)


def family_listing() -> str:
    """Every backbone family and the names it covers, for messages about unknown models."""
    return "; ".join(names.describe(family) for family, names in FAMILY_NAMES.items())


@functools.cache
def known_model_names() -> tuple[str, ...]:
    """Names accepted in `model.name`: the timm names of every family, then torchvision ones with `tv:`."""
    import timm
    import torchvision

    timm_names = [
        name
        for names in FAMILY_NAMES.values()
        if names.timm_modules
        for name in timm.list_models(module=list(names.timm_modules))
        if not names.excludes(name)
    ]
    tv_prefixes = tuple(p for names in FAMILY_NAMES.values() for p in names.tv_prefixes)
    tv_names = [TV_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(tv_prefixes)]
    return tuple(sorted(timm_names) + sorted(tv_names))


@functools.cache
def transform_classes() -> dict[str, type]:
    """Every public albumentations transform class by name."""
    import albumentations as A

    return {
        name: obj
        for name, obj in vars(A).items()
        if isinstance(obj, type) and issubclass(obj, A.BasicTransform) and not name.startswith("_")
    }


def transform_arguments(cls: type) -> tuple[list[str], bool]:
    """(named arguments of the transform's constructor, whether it also takes **kwargs)."""
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return [p for p in params if p not in ("self", "args", "kwargs")], accepts_any


def make_transform(name: str, kwargs: dict[str, Any]) -> Any:
    """Instantiate an albumentations transform by class name (names and arguments were validated by the schema)."""
    return transform_classes()[name](**kwargs)
