"""Several labels per image on the multi-label digits example (`build_multilabel_digits`: 1 to 3 of the digits 0-5
per 64 px picture, a fixed train / val / test split), test-split mean average precision (scikit-learn's macro AP)
and wall time of:

- plain: a bare timm loop (ResNet-18 from random initialisation, BCEWithLogitsLoss, AdamW at the quickstart recipe's
  lr and weight decay, its batch size, `--epochs` epochs at a constant lr, no augmentation) on the train split;
- like for like: finetune with the quickstart recipe made the same (constant lr, no warmup, no augmentation, no
  label smoothing, `--epochs` epochs);
- shipped: finetune with the quickstart recipe as shipped (its augmentation, warmup, cosine decay and 8 epochs).

finetune's figures come with their 95% bootstrap interval. Run: python benchmarks/bench_multilabel.py [--epochs 3]
[--images 1500] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from finetune import train
from finetune.config.builtin import builtin_recipe
from finetune.config.loading import load_recipe
from finetune.data.demo import build_multilabel_digits
from finetune.data.split import multi_hot

CLASSES = [str(d) for d in range(6)]


def _tensors(frame: pd.DataFrame, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in frame["path"]]).astype(np.float32)
    x = torch.from_numpy((images / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(multi_hot(list(frame["labels"]), CLASSES))


def plain_loop(frame: pd.DataFrame, root: Path, *, epochs: int, lr: float, weight_decay: float, batch: int, seed: int) -> float:
    """Test mAP of a bare timm ResNet-18 trained with BCE on the train split."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(CLASSES))
    x, y = _tensors(frame[frame["split"] == "train"], root)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x), generator=generator).split(batch):
            optimizer.zero_grad()
            loss(model(x[index]), y[index]).backward()
            optimizer.step()
    model.eval()
    tx, ty = _tensors(frame[frame["split"] == "test"], root)
    with torch.inference_mode():
        probs = torch.sigmoid(torch.cat([model(part) for part in tx.split(128)])).numpy()
    return float(average_precision_score(ty.numpy(), probs, average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        manifest = build_multilabel_digits(root / "multidigits", images=args.images)
        frame = pd.read_csv(manifest, keep_default_na=False)
        recipe = load_recipe(builtin_recipe("quickstart").path, overrides=["transforms.input_size=64"])
        same = [
            "transforms.train=none",
            "train.warmup_epochs=0",
            "train.scheduler=constant",
            "loss.label_smoothing=0",
            f"train.epochs={args.epochs}",
        ]
        alike = load_recipe(builtin_recipe("quickstart").path, overrides=["transforms.input_size=64", *same])
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            started = time.perf_counter()
            plain = plain_loop(
                frame,
                root,
                epochs=args.epochs,
                lr=recipe.train.lr,
                weight_decay=recipe.train.weight_decay,
                batch=recipe.data.batch_size,
                seed=seed,
            )
            rows.append(
                {
                    "seed": seed,
                    "run": f"plain timm loop, {args.epochs} epochs",
                    "test_mAP": round(plain, 4),
                    "ci95": "",
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            for name, chosen in (
                (f"finetune like for like, {args.epochs} epochs", alike),
                ("finetune quickstart as shipped", recipe),
            ):
                started = time.perf_counter()
                ours = train(
                    recipe=chosen.model_copy(update={"seed": seed}), data=manifest, out=root / f"{len(rows)}", progress=False
                )
                assert ours.report is not None
                lo, hi = ours.report.metrics["ci95"]["mean_average_precision"]
                rows.append(
                    {
                        "seed": seed,
                        "run": f"{name} ({len(ours.history)} epochs)",
                        "test_mAP": round(ours.report.metrics["mean_average_precision"], 4),
                        "ci95": f"[{lo:.4f}, {hi:.4f}]",
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
        print(f"{len(frame)} pictures ({(frame['split'] == 'test').sum()} test), 64 px, torch threads 2")
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
