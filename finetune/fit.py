"""The training loop: phases of frozen/trainable stages, optimizer and schedule per phase, checkpoints, resume."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from finetune.checkpoint import make_payload, save_checkpoint
from finetune.data import ImageDataset, make_loader
from finetune.distributed import barrier, current, gather_predictions, mean_across
from finetune.errors import FinetuneError, did_you_mean
from finetune.feature_cache import CachedPhase, cached_phase, why_not_cached
from finetune.freeze import FreezePlan, apply_freeze, set_train_mode, stage_of_names
from finetune.inference import resolve_device, run_inference
from finetune.model import ModelBundle
from finetune.recipe import STAGES, LossConfig, PhaseConfig, Recipe, TrainConfig
from finetune.transforms import ImageConfig

log = logging.getLogger(__name__)

METRICS_COLUMNS = ["epoch", "phase", "phase_epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "seconds"]


class TrainingError(FinetuneError):
    """Training cannot go on (for example a non-finite loss)."""


@dataclass
class FitState:
    """Where training stands; stored in `last.pt` so `--resume` continues exactly."""

    epoch: int = 0  # epochs completed over all phases
    phase: int = 0
    phase_epoch: int = 0  # epochs completed within `phase`
    best_metric: float | None = None
    best_epoch: int = 0
    phase_best: float | None = None
    bad_epochs: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitContext:
    """Everything `fit` needs besides the model: data, recipe, where to write."""

    recipe: Recipe
    class_names: list[str]
    image: ImageConfig
    train_set: ImageDataset
    val_set: ImageDataset
    run_dir: Path
    class_weights: list[float] | None = None
    progress: bool = True
    on_epoch_end: Callable[[FitState], None] | None = None


def stage_lr_multipliers(phase: PhaseConfig) -> dict[str, float]:
    """Per-stage LR factor: layer-wise decay (head 1, layer4 d, layer3 d^2, ...) times explicit lr_mult."""
    depth = {stage: len(STAGES) - 1 - i for i, stage in enumerate(STAGES)}
    decay = phase.layer_decay or 1.0
    return {stage: decay ** depth[stage] * phase.lr_mult.get(stage, 1.0) for stage in STAGES}


def build_optimizer(model: nn.Module, phase: PhaseConfig, cfg: TrainConfig, *, classifier: str) -> torch.optim.Optimizer:
    """One param group per (trainable stage, decay / no-decay); biases and norm weights get no weight decay."""
    stages = stage_of_names(model, classifier)
    mults = stage_lr_multipliers(phase)
    groups = []
    for stage in phase.trainable():
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and stages[n] == stage]
        for decay, chosen in ((True, [p for n, p in params if p.ndim > 1]), (False, [p for n, p in params if p.ndim <= 1])):
            if chosen:
                groups.append({"params": chosen, "lr": phase.lr * mults[stage], "weight_decay": cfg.weight_decay if decay else 0.0, "stage": stage})
    if not groups:
        raise TrainingError(f"phase trains {list(phase.trainable())} but they hold no parameters; train at least 'head'")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=phase.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=phase.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, total_steps: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay (or constant), stepped every batch."""
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(cfg: LossConfig, *, class_names: list[str], targets: list[int]) -> list[float] | None:
    """Per-class loss weights from the training labels: sklearn's 'balanced', Cui et al.'s effective number, or given."""
    if cfg.class_weights == "none":
        return None
    counts = np.bincount(np.asarray(targets), minlength=len(class_names)).astype(float)
    if isinstance(cfg.class_weights, dict):
        unknown = sorted(set(cfg.class_weights) - set(class_names))
        if unknown:
            raise TrainingError(f"loss.class_weights names unknown class(es) {unknown}{did_you_mean(unknown[0], class_names)}; classes: {class_names}")
        return [float(cfg.class_weights.get(name, 1.0)) for name in class_names]
    if cfg.class_weights == "balanced":
        weights = compute_class_weight("balanced", classes=np.arange(len(class_names)), y=np.asarray(targets))
    else:
        weights = (1.0 - cfg.beta) / (1.0 - np.power(cfg.beta, counts))
        weights = weights * len(class_names) / weights.sum()
    return [float(w) for w in weights]


def build_criterion(cfg: LossConfig, weights: list[float] | None = None) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing and optional class weights."""
    tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    return nn.CrossEntropyLoss(weight=tensor, label_smoothing=cfg.label_smoothing)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision where the device supports it: bf16 (or fp16) on CUDA; on CPU only when asked (bf16)."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if amp == "bf16" else None


def _improved(value: float, best: float | None, metric: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if metric == "val_loss" else value > best + min_delta


def _append_row(path: Path, row: dict[str, Any]) -> None:
    pd.DataFrame([row], columns=METRICS_COLUMNS).to_csv(path, mode="a", header=not path.exists(), index=False, float_format="%.6g")


def _train_epoch(model, loader, optimizer, scheduler, criterion, *, device, dtype, scaler, grad_clip, progress, desc, epoch) -> tuple[float, float]:
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch}, step {step + 1} (lr {lr:.3g}); "
                "HINT: lower train.lr or set train.grad_clip (the last good checkpoint is kept)"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        batch = targets.size(0)
        loss_sum += loss.item() * batch
        correct += (logits.argmax(1) == targets).sum().item()
        seen += batch
        if progress:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def fit(bundle: ModelBundle, ctx: FitContext, *, state: FitState | None = None) -> FitState:
    """Train through every phase of the recipe; returns the final state. `state` resumes a run."""
    cfg = ctx.recipe.train
    data_cfg = ctx.recipe.data
    device = resolve_device(cfg.device)
    model = bundle.model.to(device)
    dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = build_criterion(ctx.recipe.loss, ctx.class_weights).to(device)
    stopping = cfg.early_stopping
    phases = cfg.resolved_phases()
    state = state or FitState()
    ranks = current()
    ckpt_dir = ctx.run_dir / "checkpoints"
    metrics_path = ctx.run_dir / "metrics.csv"
    val_loader = make_loader(ctx.val_set, batch_size=data_cfg.batch_size, num_workers=data_cfg.num_workers, shuffle=False, seed=0, ranks=ranks)
    total_epochs = sum(p.epochs for p in phases)

    for phase_index in range(state.phase, len(phases)):
        phase = phases[phase_index]
        plan = FreezePlan(trainable=phase.trainable(), bn=phase.bn)
        trainable = apply_freeze(model, plan, classifier=bundle.classifier)
        optimizer = build_optimizer(model, phase, cfg, classifier=bundle.classifier)
        steps = max(1, math.ceil(math.ceil(len(ctx.train_set) / ranks.world) / data_cfg.batch_size))
        scheduler = build_scheduler(optimizer, cfg, total_steps=phase.epochs * steps, steps_per_epoch=steps)
        if state.phase == phase_index and state.phase_epoch > 0 and state.optimizer:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        else:
            state.phase, state.phase_epoch, state.phase_best, state.bad_epochs = phase_index, 0, None, 0
        log.info("phase %d/%d: training %s (%s parameters), %d epoch(s), lr %g, BN %s",
                 phase_index + 1, len(phases), ", ".join(plan.trainable), f"{trainable:,}", phase.epochs, phase.lr, phase.bn)
        setup_started: float | None = time.perf_counter()  # the phase's first epoch is charged its feature caching
        cached = _phase_features(bundle, ctx, phase, device=device, dtype=dtype, distributed=ranks.enabled)
        if cached is not None:  # the classifier trains on cached backbone outputs: same parameters, no image decoding
            net, train_set, val_net = cached.head, cached.train, cached.head
            val_batches = make_loader(cached.val, batch_size=data_cfg.batch_size, num_workers=0, shuffle=False, seed=0)
        elif ranks.enabled:
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
            net, train_set, val_net, val_batches = DistributedDataParallel(model, device_ids=device_ids), ctx.train_set, model, val_loader
        else:
            net, train_set, val_net, val_batches = model, ctx.train_set, model, val_loader

        while state.phase_epoch < phase.epochs:
            epoch = state.epoch + 1
            started, setup_started = setup_started or time.perf_counter(), None
            set_train_mode(model, plan, classifier=bundle.classifier)
            epoch_seed = ctx.recipe.seed * 100_003 + epoch
            if cached is not None:
                cached.train.choose_views(epoch_seed)
            loader = make_loader(train_set, batch_size=data_cfg.batch_size, num_workers=0 if cached else data_cfg.num_workers,
                                 shuffle=True, seed=epoch_seed, pin_memory=device.type == "cuda" and cached is None,
                                 balanced=data_cfg.sampler == "weighted", ranks=ranks)
            lr = optimizer.param_groups[-1]["lr"]
            train_loss, train_acc = _train_epoch(
                net, loader, optimizer, scheduler, criterion, device=device, dtype=dtype, scaler=scaler,
                grad_clip=cfg.grad_clip, progress=ctx.progress, desc=f"epoch {epoch}/{total_epochs}", epoch=epoch,
            )
            train_loss, train_acc = mean_across([train_loss, train_acc], ranks, device)
            preds, val_loss = run_inference(val_net, val_batches, device=device, paths=ctx.val_set.paths, progress=ctx.progress, desc="validate")
            preds, val_loss = gather_predictions(preds, val_loss, ranks, paths=ctx.val_set.paths)
            val_acc = float((preds.predicted == preds.targets).mean())
            val_f1 = float(f1_score(preds.targets, preds.predicted, average="macro", labels=list(range(len(ctx.class_names))), zero_division=0))
            row = {"epoch": epoch, "phase": phase_index + 1, "phase_epoch": state.phase_epoch + 1, "lr": lr,
                   "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
                   "val_accuracy": val_acc, "val_macro_f1": val_f1, "seconds": time.perf_counter() - started}
            if ranks.main:
                _append_row(metrics_path, row)
            log.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f (%.1fs)",
                     epoch, train_loss, train_acc, val_loss, val_acc, val_f1, row["seconds"])

            monitored = row[stopping.metric]
            state.epoch, state.phase_epoch = epoch, state.phase_epoch + 1
            payload_extra = {"epoch": epoch, "metrics": {k: float(v) for k, v in row.items()}}
            if _improved(monitored, state.best_metric, stopping.metric, stopping.min_delta):
                state.best_metric, state.best_epoch = float(monitored), epoch
                if ranks.main:
                    save_checkpoint(make_payload(bundle=bundle, class_names=ctx.class_names, image=ctx.image, recipe=ctx.recipe, extra=payload_extra),
                                    ckpt_dir / "best.pt")
            if _improved(monitored, state.phase_best, stopping.metric, stopping.min_delta):
                state.phase_best, state.bad_epochs = float(monitored), 0
                if stopping.restore_best and ranks.main:
                    save_checkpoint({"state_dict": model.state_dict(), "epoch": epoch}, ckpt_dir / "phase_best.pt")
            else:
                state.bad_epochs += 1
            stop_phase = stopping.patience is not None and state.bad_epochs >= stopping.patience
            if stop_phase:
                log.info("early stopping: %s did not improve for %d epoch(s)", stopping.metric, state.bad_epochs)
                state.phase_epoch = phase.epochs
            phase_done = state.phase_epoch >= phase.epochs
            if phase_done and stopping.restore_best and state.bad_epochs > 0:
                barrier()  # rank 0 has written phase_best.pt
                best_of_phase = torch.load(ckpt_dir / "phase_best.pt", map_location=device, weights_only=True)
                model.load_state_dict(best_of_phase["state_dict"])  # before last.pt, so a resume sees the same weights
                log.info("restored the phase's best weights (epoch %d)", best_of_phase["epoch"])
            saved = asdict(state)
            if phase_done and phase_index + 1 < len(phases):  # a resume starts the next phase afresh
                saved.update(phase=phase_index + 1, phase_epoch=0, phase_best=None, bad_epochs=0, optimizer={}, scheduler={})
            else:
                saved.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
            if ranks.main:
                save_checkpoint(make_payload(bundle=bundle, class_names=ctx.class_names, image=ctx.image, recipe=ctx.recipe,
                                             extra={**payload_extra, "training_state": saved}), ckpt_dir / "last.pt")
            if ctx.on_epoch_end is not None:
                ctx.on_epoch_end(state)
    barrier()  # every checkpoint is on disk before any rank goes on
    return state


def _phase_features(bundle: ModelBundle, ctx: FitContext, phase: PhaseConfig, *, device: torch.device, dtype: torch.dtype | None,
                    distributed: bool) -> CachedPhase | None:
    """Cached backbone features for a head-only phase with frozen BN, or None (with the reason logged)."""
    reason = why_not_cached(ctx.recipe, phase, distributed=distributed)
    if reason is not None:
        if phase.trainable() == ("head",):
            log.info("feature cache not used: %s", reason)
        return None
    return cached_phase(bundle, ctx.recipe, train_paths=ctx.train_set.paths, train_targets=ctx.train_set.targets,
                        val_paths=ctx.val_set.paths, val_targets=ctx.val_set.targets, train_pipeline=ctx.train_set.transform,
                        eval_pipeline=ctx.val_set.transform, device=device, dtype=dtype, progress=ctx.progress)


def state_from_payload(payload: dict[str, Any]) -> FitState:
    """The FitState stored in a `last.pt` payload."""
    known = {f.name for f in fields(FitState)}
    return FitState(**{k: v for k, v in payload["training_state"].items() if k in known})


def read_history(run_dir: Path, *, up_to_epoch: int | None = None) -> pd.DataFrame:
    """metrics.csv, optionally cut after `up_to_epoch` (rows written after the last checkpoint are dropped on resume)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return pd.DataFrame(columns=METRICS_COLUMNS)
    history = pd.read_csv(path)
    if up_to_epoch is not None:
        history = history[history["epoch"] <= up_to_epoch]
        history.to_csv(path, index=False, float_format="%.6g")
    return history


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (model init and anything outside the loaders)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
