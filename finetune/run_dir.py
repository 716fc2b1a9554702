"""`RunDir`: the one place that spells the paths of a run folder (what `finetune train` writes)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
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

    def class_names(self) -> tuple[list[str], bool]:
        """classes.json: (the class names, whether the run gives several labels per image). It holds a list of
        names, or {"task": "multilabel", "classes": [...]} for several labels per image."""
        stored = json.loads(self.classes.read_text(encoding="utf-8"))
        multilabel = isinstance(stored, dict) and stored.get("task") == "multilabel"
        names = stored.get("classes", []) if isinstance(stored, dict) else stored
        return [str(c) for c in names], multilabel

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


def _owning_run(real: Path) -> Path | None:
    """The run or cross-validation folder `real` is (or whose checkpoints/ it is), else None."""
    for root in (real, real.parent if real.name == "checkpoints" else None):
        if root is not None and (RunDir(root).is_run() or RunDir(root).folds.is_file()):
            return root
    return None


def check_destination(folder: str | Path, *, what: str = "--out", reads: Sequence[Path] = (), holds_runs: bool = False) -> Path:
    """Refuse, before any work, an output folder whose files a command did not write: a file, a run or
    cross-validation folder (or its checkpoints/), the working or home folder or any folder above them, a folder
    holding a run the command reads or (unless `holds_runs`: compare's and audit's folders hold their own runs) any
    run folder. Links are followed: a link to a run folder is that run folder. The folder back."""
    folder = Path(folder)
    check_writable_folder(folder, what=what)
    real = folder.resolve()
    owner = _owning_run(real)
    if owner is not None:
        raise RunDirError(
            f"{what} {folder} is the run folder {owner}{'/checkpoints' if owner != real else ''}, not a place for "
            f"output; choose a new folder such as {owner / 'outputs'}"
        )
    guarded = [(Path(p).resolve(), f"the run {p}") for p in reads]
    with contextlib.suppress(OSError, RuntimeError):  # no home folder, or a working folder deleted meanwhile
        guarded.insert(0, (Path.home().resolve(), "your home folder"))
    with contextlib.suppress(OSError):
        guarded.insert(0, (Path.cwd().resolve(), "the working folder"))
    for place, name in guarded:
        if real == place or real in place.parents:
            verb = "is" if real == place else "holds"
            raise RunDirError(f"{what} {folder} {verb} {name} ({place}); choose a new, empty folder for the output")
    held = None if holds_runs else _first_run_inside(real)
    if held is not None:
        raise RunDirError(f"{what} {folder} holds the run folder {held.name}; choose a new, empty folder for the output")
    return folder


def _first_run_inside(folder: Path) -> Path | None:
    try:
        return next((p for p in folder.iterdir() if _owning_run(p)), None) if folder.is_dir() else None
    except OSError:  # an unreadable folder holds nothing we can name
        return None


def check_destination_file(path: str | Path, *, what: str = "--out") -> None:
    """Refuse an output file that is one of a run's own files (recipe.yaml, splits.csv, checkpoints/, ...), also
    through a link: writing it would destroy the run."""
    real = Path(path).resolve()
    owner = _owning_run(real.parent)
    if owner is None:
        return
    if real.parent != owner or real.name in _run_file_names() or real.name.startswith("."):
        raise RunDirError(
            f"{what} {path} would replace {real.relative_to(owner)} of the run folder {owner}; choose another file name"
        )


def _run_file_names() -> set[str]:
    """The names RunDir spells (recipe.yaml, splits.csv, checkpoints, ...), but report/ (eval's default output)."""
    run = RunDir(Path("."))
    return {getattr(run, name).name for name, value in vars(RunDir).items() if isinstance(value, property) and name != "report"}


@contextlib.contextmanager
def folder_lock(folder: Path, *, holder: str = "finetune export") -> Iterator[None]:
    """An OS lock (flock) on the folder itself, held while a command writes into it: a second writer is refused. The
    kernel drops it when the process dies, so no stale lock is left; no file is added to the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"{folder} is being written by another {holder}; wait for it to end, or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)
