"""finetune against fastai on the same folder, model, image size, batch and epochs, in one process, alternating.

fastai: `ImageDataLoaders.from_folder` (Resize(224), batch 32, 2 workers), `vision_learner(tv resnet18,
pretrained=False)`, `fit_one_cycle(2)`. finetune: recipes/full_finetune.yaml with `tv:resnet18`, no weights,
2 epochs, batch 32, 2 workers. Both on hymenoptera's train/ and val/ at 224 px. Reports the median epoch time of
each (training + validation), the ratio (goal: finetune >= 1.2x fastai's epoch throughput), the final validation
accuracy of each, and the wall time of finetune's whole call (screening, training, report) against fastai's
training alone (goal: no longer). fastai is optional: without it the peer figures are reported as not measured.
On a CPU with native bf16 (AMX or AVX512-BF16) a third contender runs: finetune with `train.amp: bf16` and
`train.channels_last: true`, reported on its own row (a lever of finetune's recipes, not a like-for-like run).
Run: python benchmarks/bench_peers.py   (needs ../shared/datasets/hymenoptera; fastai importable)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from finetune import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "full_finetune.yaml"
FAST = ("train.amp=bf16", "train.channels_last=true")


def run_fastai(epochs: int) -> tuple[list[float], float, float]:
    from fastai.callback.core import Callback
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, resnet18, vision_learner

    times: list[float] = []

    class EpochTimer(Callback):  # each epoch's wall time, training and validation
        def before_epoch(self) -> None:
            self.begun = time.perf_counter()

        def after_epoch(self) -> None:
            times.append(time.perf_counter() - self.begun)

    started = time.perf_counter()
    dls = ImageDataLoaders.from_folder(DATA, train="train", valid="val", item_tfms=Resize(224), bs=32, num_workers=2)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, cbs=[EpochTimer()])
    return times, float(learn.recorder.values[-1][2]), time.perf_counter() - started


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 autocast is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def run_finetune(epochs: int, out: Path, extra: tuple[str, ...] = ()) -> tuple[list[float], float, float]:
    overrides = [
        *extra,
        "model.name=tv:resnet18",
        "model.pretrained=false",
        f"train.phases.0.epochs={epochs}",
        "data.batch_size=32",
        "data.num_workers=2",
        "transforms.input_size=224",
    ]
    started = time.perf_counter()
    result = train(recipe=RECIPE, data=DATA, out=out, overrides=overrides, progress=False)
    return list(result.history["seconds"]), float(result.history["val_accuracy"].iloc[-1]), time.perf_counter() - started


def run(*, epochs: int = 2, repeats: int = 2) -> list[dict]:
    if importlib.util.find_spec("fastai") is None:
        print("fastai is not installed: the peer comparison is not measured (pip install fastai to run it)")
        return [
            {
                "figure": "epoch throughput, finetune / fastai",
                "measured": "fastai not installed",
                "ratio": float("nan"),
                "target": ">= 1.2",
                "met": None,
            }
        ]
    ours: list[tuple[float, float, float]] = []
    theirs: list[tuple[float, float, float]] = []
    fast: list[tuple[float, float, float]] | None = [] if native_bf16() else None
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            order = ["fastai", "finetune"] if repeat % 2 == 0 else ["finetune", "fastai"]
            for name in order:
                if name == "fastai":
                    times, acc, wall = run_fastai(epochs)
                    theirs.append((statistics.median(times), acc, wall))
                else:
                    times, acc, wall = run_finetune(epochs, Path(tmp) / f"ft{repeat}")
                    ours.append((statistics.median(times), acc, wall))
            if fast is not None:  # finetune's own levers on this CPU, beside the like-for-like pair
                times, acc, wall = run_finetune(epochs, Path(tmp) / f"bf16_{repeat}", FAST)
                fast.append((statistics.median(times), acc, wall))
    ours_epoch, theirs_epoch = statistics.median(o[0] for o in ours), statistics.median(t[0] for t in theirs)
    ratio = theirs_epoch / ours_epoch
    ours_wall, theirs_fit = statistics.median(o[2] for o in ours), statistics.median(t[2] for t in theirs)
    print(
        f"epoch: finetune {ours_epoch:.1f} s, fastai {theirs_epoch:.1f} s -> finetune {ratio:.2f}x fastai's throughput (goal >= 1.2)"
    )
    print(f"val accuracy: finetune {[round(o[1], 3) for o in ours]}, fastai {[round(t[1], 3) for t in theirs]}")
    print(f"whole call: finetune {ours_wall:.0f} s (screening, training, report) vs fastai's training {theirs_fit:.0f} s")
    accs = [o[1] for o in ours] + [t[1] for t in theirs]
    rows = [
        {
            "figure": "epoch throughput, finetune / fastai (tv resnet18, 224 px, hymenoptera)",
            "measured": f"{ours_epoch:.1f} vs {theirs_epoch:.1f} s per epoch; val acc {min(accs):.2f}-{max(accs):.2f}",
            "ratio": ratio,
            "target": ">= 1.2",
            "met": ratio >= 1.2,
        },
        {
            "figure": "finetune's whole call / fastai's training alone",
            "measured": f"{ours_wall:.0f} vs {theirs_fit:.0f} s",
            "ratio": ours_wall / theirs_fit,
            "target": "<= 1",
            "met": ours_wall <= theirs_fit,
        },
    ]
    if fast:
        fast_epoch = statistics.median(f[0] for f in fast)
        print(f"finetune with {' '.join(FAST)}: {fast_epoch:.1f} s per epoch, val accuracy {[round(f[1], 3) for f in fast]}")
        rows.append(
            {
                "figure": "epoch throughput, finetune (amp: bf16, channels_last on this AMX CPU) / fastai (fp32)",
                "measured": f"{fast_epoch:.1f} vs {theirs_epoch:.1f} s per epoch; val acc {min(f[1] for f in fast):.2f}-{max(f[1] for f in fast):.2f}",
                "ratio": theirs_epoch / fast_epoch,
                "target": ">= 1.2 (not like for like)",
                "met": theirs_epoch / fast_epoch >= 1.2,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run(epochs=args.epochs, repeats=args.repeats)


if __name__ == "__main__":
    main()
