"""`RunDir`: the one place that spells the paths of a run folder (what `finetune train` writes)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import RunDirError
from finetune.files import check_writable_folder, guarded


def timestamped_run(prefix: str) -> Path:
    """The default output folder of a command: runs/PREFIX-YYYYmmdd-HHMMSS in the working folder."""
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class RunDir:
    """Every file of a run folder, by name; nothing is created until a writer asks for it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def recipe(self) -> Path:
        """The resolved recipe; written last when a run starts, so its presence marks a resumable folder."""
        return self.root / "recipe.yaml"

    @property
    def started_recipe(self) -> Path:
        """The recipe as the run started, written before recipe.yaml: --resume refuses a recipe.yaml edited since,
        even when the run was stopped before its first checkpoint (which also stores the recipe)."""
        return self.root / ".recipe_at_start.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    @property
    def classes(self) -> Path:
        return self.root / "classes.json"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.csv"

    @property
    def leakage(self) -> Path:
        return self.root / "leakage.csv"

    @property
    def class_weights(self) -> Path:
        return self.root / "class_weights.json"

    @property
    def train_transforms(self) -> Path:
        return self.root / "train_transforms.yaml"

    @property
    def eval_transforms(self) -> Path:
        return self.root / "eval_transforms.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def progress(self) -> Path:
        """The live view: a self-contained page that reloads itself, redrawn after every epoch."""
        return self.root / "progress.html"

    @property
    def curves(self) -> Path:
        """Loss, accuracy and learning rate per epoch with the kept epoch marked, redrawn after every epoch."""
        return self.root / "training_curves.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def phase_best(self) -> Path:
        """The current phase's best weights (same format as best.pt), kept for `early_stopping.restore_best`."""
        return self.checkpoints / "phase_best.pt"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def reject(self) -> Path:
        """The last threshold `predict --reject auto` chose from this run's validation split."""
        return self.root / "reject.json"

    @property
    def excluded(self) -> Path:
        """The images `data.exclude` left out of the run."""
        return self.root / "excluded.csv"

    @property
    def folds(self) -> Path:
        """path, label, split, fold of every image; its presence marks a cross-validation folder (`--folds K`)."""
        return self.root / "folds.csv"

    def fold(self, number: int) -> RunDir:
        """Fold run `number` (from 1) of a cross-validation folder: an ordinary run folder."""
        return RunDir(self.root / f"fold_{number}")

    def fold_manifest(self, number: int) -> Path:
        return self.root / "manifests" / f"fold_{number}.csv"

    @property
    def oof(self) -> Path:
        """The report of the out-of-fold predictions: every image predicted by the fold model that did not train on it."""
        return self.root / "oof"

    @property
    def cv_summary(self) -> Path:
        return self.root / "cv_summary.csv"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def holds_work(self) -> bool:
        """Whether the folder holds anything but its lock file."""
        return self.root.exists() and any(p.name != self.lock.name for p in self.root.iterdir())

    def is_run(self) -> bool:
        """True when the folder was started by `finetune train` (its recipe.yaml exists)."""
        return self.recipe.is_file()

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir | None:
        """The run folder a `RUN/checkpoints/*.pt` file belongs to, or None for a checkpoint copied elsewhere."""
        checkpoint = Path(checkpoint)
        if checkpoint.parent.name != "checkpoints":
            return None
        run = cls(checkpoint.parent.parent)
        return run if run.is_run() else None


@contextlib.contextmanager
def locked(run: RunDir, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run folder: a second process writing the same run is refused, not interleaved.

    An OS file lock (flock) on RUN/.lock, which holds the owner's PID for the message. The kernel drops the lock
    when its process dies, even by kill -9, so a lock left by a dead process is stale and taken over.
    """
    if not enabled:  # torchrun ranks other than 0 write nothing
        yield
        return
    with guarded(run.lock):  # a read-only folder or a full disk: one line, not a traceback
        run.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunDirError(
                f"{run.root} is in use by another finetune process (PID {holder}); wait for it to end, or write to another --out"
            ) from None
        with guarded(run.lock):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def claim_output(run: RunDir, *, marker: Path, holds: str, restartable: bool = False) -> None:
    """The one output-folder policy of the commands that write a folder: never overwrite work.

    The folder must be writable; one holding `marker` already holds `holds` (a run, a cross-validation) and is
    continued with --resume; any other non-empty folder is refused, except, when `restartable`, a run folder that
    never finished an epoch (started again).
    """
    check_writable_folder(run.root)
    if marker.exists():
        raise RunDirError(f"{run.root} already holds a {holds}; continue it with --resume {run.root} or choose another --out")
    if run.holds_work() and not (restartable and run.is_run()):
        raise RunDirError(f"output folder {run.root} is not empty; choose a new --out folder")


@contextlib.contextmanager
def removed_if_unstarted(run: RunDir, *, marker: Path | None = None) -> Iterator[None]:
    """A start that fails before `marker` (recipe.yaml) is written leaves no folder behind, so the same command can
    be retried."""
    existed = run.root.exists()
    started = marker or run.recipe
    try:
        yield
    except BaseException:
        if not existed and run.root.exists() and not started.exists():
            shutil.rmtree(run.root, ignore_errors=True)  # everything in it was written by this call
        raise
