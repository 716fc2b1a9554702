"""Every user-facing error is a `FinetuneError`; the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class FinetuneError(Exception):
    """Base class: the message says what is wrong, where, and how to fix it."""

    exit_code = 2  # what the CLI exits with


class UsageError(FinetuneError):
    """The arguments of a command or API call do not go together (no recipe, no --out under torchrun, ...)."""


class RecipeError(FinetuneError):
    """The recipe (YAML or --set overrides) does not validate, or a value does not fit the data."""


class DataError(FinetuneError):
    """The dataset folder, manifest or an image cannot be used."""


class ModelError(FinetuneError):
    """The model name or its structure cannot be used."""


class WeightsError(FinetuneError):
    """Pretrained or local weights cannot be loaded."""


class RunDirError(FinetuneError):
    """A run or output folder cannot be created, written, locked or resumed."""


class CheckpointError(FinetuneError):
    """A checkpoint is missing, unreadable or does not match its model."""


class TrainingError(FinetuneError):
    """Training cannot go on (for example a non-finite loss)."""


class HubError(FinetuneError):
    """The Hugging Face Hub cannot be reached, or refused the upload (the folder is written and kept)."""


class ParityError(FinetuneError):
    """An exported model disagrees with PyTorch beyond the tolerance (its files are kept for inspection)."""

    exit_code = 1


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_failure(exc: BaseException) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in one plain line: the pickled object it met, never
    torch's own advice to re-run with weights_only=False (which would run the file's code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled Python object ({found.group(1)}), which a safe load refuses to run"
    if "Weights only load failed" in text:
        return "it holds pickled Python objects, which a safe load refuses to run"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__
