"""Versions of the libraries that shape weights, decoding and pipelines: stamped into checkpoints and cache keys."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

VERSIONED_LIBRARIES = ("finetune", "torch", "torchvision", "timm", "albumentations", "scikit-learn", "numpy", "pillow")
# What decodes and resizes an image or computes an activation: a change in any of them may change a cached tensor.
DECODING_LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "albumentations",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "opencv-python",
)


def library_versions(names: tuple[str, ...] = VERSIONED_LIBRARIES) -> dict[str, str]:
    """Python's version and each named distribution's ('not installed' when absent)."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
