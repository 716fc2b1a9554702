"""The training loop: phases of frozen/trainable stages, one epoch at a time, checkpointed so `--resume` is exact."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.config.schema import PhaseConfig, Recipe
from finetune.data.loader import ImageDataset, batches_per_epoch, make_loader
from finetune.data.transforms import ImageConfig
from finetune.models.build import ModelBundle
from finetune.models.stages import FreezePlan, apply_freeze, batchnorm_trains, set_train_mode
from finetune.run_dir import RunDir
from finetune.training.checkpoint import CheckpointSaver, load_checkpoint
from finetune.training.device import autocast_dtype, resolve_device
from finetune.training.distributed import Ranks, barrier, current, mean_across
from finetune.training.early_stopping import EarlyStopping
from finetune.training.epoch import Stepper, train_one_epoch
from finetune.training.feature_cache import CachedPhase, cached_phase, why_not_cached
from finetune.training.history import append_history_row
from finetune.training.loss import build_criterion
from finetune.training.optim import Schedule, build_optimizer, build_scheduler
from finetune.training.seeding import epoch_seed, seed_epoch
from finetune.training.validation import validate

log = logging.getLogger(__name__)


@dataclass
class FitState:
    """Where training stands; stored in `last.pt` so `--resume` continues exactly."""

    epoch: int = 0  # epochs completed over all phases
    phase: int = 0
    phase_epoch: int = 0  # epochs completed within `phase`
    finished: bool = False  # every phase has run (or stopped early): the run can be exported
    stopping: dict[str, Any] = field(default_factory=dict)  # EarlyStopping.state_dict()
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "phase": self.phase,
            "phase_epoch": self.phase_epoch,
            "finished": self.finished,
            "stopping": self.stopping,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> FitState:
        """The state stored in a `last.pt` payload."""
        stored = payload["training_state"]
        return cls(
            **{
                k: stored[k]
                for k in ("epoch", "phase", "phase_epoch", "finished", "stopping", "optimizer", "scheduler")
                if k in stored
            }
        )


@dataclass
class FitContext:
    """Everything `fit` needs besides the model: data, recipe, where to write."""

    recipe: Recipe
    class_names: list[str]
    image: ImageConfig
    train_set: ImageDataset
    val_set: ImageDataset
    run: RunDir
    class_weights: list[float] | None = None
    cache_dir: Path = Path(".cache") / "finetune" / "features"  # where head-only phases keep backbone features
    progress: bool = True
    on_epoch_end: Callable[[FitState], None] | None = None


@dataclass
class _Env:
    """What stays fixed over a fit: device, precision, loss, processes, early stopping and the checkpoint writer."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ranks: Ranks
    stopping: EarlyStopping
    saver: CheckpointSaver
    total_epochs: int


@dataclass
class _Phase:
    """One phase ready to train: what trains, on which data, with which optimizer and schedule."""

    index: int
    config: PhaseConfig
    plan: FreezePlan
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    net: nn.Module  # what training batches go through: the model, its DDP wrapper, or the head on cached features
    val_net: nn.Module
    train_set: Any
    val_batches: Iterable[Any]
    cached: CachedPhase | None
    drop_lone_last: bool  # BatchNorm trains: a last batch of one image is left out of each epoch
    setup_started: float | None  # the phase's first epoch is charged its preparation (feature caching)


def _environment(bundle: ModelBundle, ctx: FitContext, state: FitState) -> _Env:
    cfg = ctx.recipe.train
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.amp, device)
    ranks = current()
    stopping = EarlyStopping.from_config(cfg.early_stopping)
    if state.stopping:
        stopping.load_state_dict(state.stopping)
    return _Env(
        device=device,
        dtype=dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        criterion=build_criterion(ctx.recipe.loss, ctx.class_weights).to(device),
        ranks=ranks,
        stopping=stopping,
        saver=CheckpointSaver(bundle=bundle, class_names=ctx.class_names, image=ctx.image, recipe=ctx.recipe, enabled=ranks.main),
        total_epochs=sum(p.epochs for p in cfg.resolved_phases()),
    )


def fit(bundle: ModelBundle, ctx: FitContext, *, state: FitState | None = None) -> FitState:
    """Train through every phase of the recipe; returns the final state. `state` resumes a run."""
    state = state or FitState()
    bundle.model.to(resolve_device(ctx.recipe.train.device))
    env = _environment(bundle, ctx, state)
    phases = ctx.recipe.train.resolved_phases()
    for index in range(state.phase, len(phases)):
        phase = _prepare_phase(bundle, ctx, env, phases[index], index, state)
        while state.phase_epoch < phase.config.epochs:
            _run_epoch(bundle, ctx, env, phase, state, last_phase=index == len(phases) - 1)
    barrier()  # every checkpoint is on disk before any rank goes on
    return state


def _prepare_phase(bundle: ModelBundle, ctx: FitContext, env: _Env, config: PhaseConfig, index: int, state: FitState) -> _Phase:
    """Freeze, build the optimizer and schedule (restored when resuming inside this phase), pick what trains on what."""
    plan = FreezePlan(trainable=config.trainable_stages(), bn=config.bn)
    trainable = apply_freeze(bundle.model, plan, bundle.stages)
    optimizer = build_optimizer(bundle.model, config, ctx.recipe.train, bundle.stages)
    lone = batchnorm_trains(plan, bundle.stages)  # a batch of one cannot be normalised: left out of the epoch
    steps = max(1, batches_per_epoch(len(ctx.train_set), ctx.recipe.data.batch_size, world=env.ranks.world, drop_lone_last=lone))
    schedule = build_scheduler(optimizer, ctx.recipe.train, total_steps=config.epochs * steps, steps_per_epoch=steps)
    if state.phase == index and state.phase_epoch > 0 and state.optimizer:
        optimizer.load_state_dict(state.optimizer)
        schedule.load_state_dict(state.scheduler)
    else:
        state.phase, state.phase_epoch = index, 0
        env.stopping.start_phase()
    log.info(
        "phase %d/%d: training %s (%s parameters), %d epoch(s), lr %g, BN %s",
        index + 1,
        len(ctx.recipe.train.resolved_phases()),
        ", ".join(plan.trainable),
        f"{trainable:,}",
        config.epochs,
        config.lr,
        config.bn,
    )
    started = time.perf_counter()
    net, val_net, train_set, val_batches, cached = _phase_inputs(bundle, ctx, env, config)
    return _Phase(
        index=index,
        config=config,
        plan=plan,
        optimizer=optimizer,
        schedule=schedule,
        net=net,
        val_net=val_net,
        train_set=train_set,
        val_batches=val_batches,
        cached=cached,
        drop_lone_last=lone,
        setup_started=started,
    )


def _phase_inputs(
    bundle: ModelBundle, ctx: FitContext, env: _Env, config: PhaseConfig
) -> tuple[nn.Module, nn.Module, Any, Any, CachedPhase | None]:
    """(training net, validation net, training set, validation batches, feature cache or None) for one phase."""
    data = ctx.recipe.data
    reason = why_not_cached(ctx.recipe, config, distributed=env.ranks.enabled)
    if reason is None:  # the classifier trains on cached backbone outputs: same parameters, no image decoding
        cached = cached_phase(
            bundle,
            ctx.recipe,
            train_paths=ctx.train_set.paths,
            train_targets=ctx.train_set.targets,
            val_paths=ctx.val_set.paths,
            val_targets=ctx.val_set.targets,
            train_pipeline=ctx.train_set.transform,
            eval_pipeline=ctx.val_set.transform,
            device=env.device,
            dtype=env.dtype,
            progress=ctx.progress,
            root=ctx.cache_dir,
        )
        val_batches = make_loader(cached.val, batch_size=data.batch_size, num_workers=0, shuffle=False, seed=0)
        return cached.head, cached.head, cached.train, val_batches, cached
    if config.trainable_stages() == ("head",):
        log.info("feature cache not used: %s", reason)
    val_loader = make_loader(
        ctx.val_set,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        shuffle=False,
        seed=0,
        rank=env.ranks.rank,
        world=env.ranks.world,
    )
    net: nn.Module = bundle.model
    if env.ranks.enabled:
        device_ids = (
            [env.device.index if env.device.index is not None else torch.cuda.current_device()]
            if env.device.type == "cuda"
            else None
        )
        net = DistributedDataParallel(bundle.model, device_ids=device_ids)
    return net, bundle.model, ctx.train_set, val_loader, None


def _run_epoch(bundle: ModelBundle, ctx: FitContext, env: _Env, phase: _Phase, state: FitState, *, last_phase: bool) -> None:
    """Train one epoch, validate, log a metrics row, decide early stopping, write checkpoints."""
    epoch = state.epoch + 1
    started, phase.setup_started = phase.setup_started or time.perf_counter(), None
    set_train_mode(bundle.model, phase.plan, bundle.stages)
    seed_epoch(ctx.recipe.seed, epoch, rank=env.ranks.rank)
    lr = phase.optimizer.param_groups[-1]["lr"]
    train_loss, train_acc = _train_epoch(ctx, env, phase, epoch)
    train_loss, train_acc = mean_across([train_loss, train_acc], env.ranks, env.device)
    val = validate(
        phase.val_net,
        phase.val_batches,
        device=env.device,
        ranks=env.ranks,
        total=len(ctx.val_set),
        num_classes=len(ctx.class_names),
        progress=ctx.progress,
    )
    row = {
        "epoch": epoch,
        "phase": phase.index + 1,
        "phase_epoch": state.phase_epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        **val.metrics,
        "seconds": time.perf_counter() - started,
    }
    if env.ranks.main:
        append_history_row(ctx.run, row)
    log.info(
        "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f (%.1fs)",
        epoch,
        train_loss,
        train_acc,
        row["val_loss"],
        row["val_accuracy"],
        row["val_macro_f1"],
        row["seconds"],
    )
    state.epoch, state.phase_epoch = epoch, state.phase_epoch + 1
    outputs = {"val_logits": torch.from_numpy(val.logits), "val_targets": torch.from_numpy(val.targets)}
    metrics = {k: float(v) for k, v in row.items()}
    _after_epoch(bundle, ctx, env, phase, state, metrics=metrics, outputs=outputs, last_phase=last_phase)
    if ctx.on_epoch_end is not None:
        ctx.on_epoch_end(state)


def _after_epoch(
    bundle: ModelBundle,
    ctx: FitContext,
    env: _Env,
    phase: _Phase,
    state: FitState,
    *,
    metrics: dict[str, float],
    outputs: dict[str, torch.Tensor],
    last_phase: bool,
) -> None:
    """Early stopping and restore-best decisions, then best.pt / phase_best.pt / last.pt."""
    stopping_cfg = ctx.recipe.train.early_stopping
    verdict = env.stopping.update(metrics, state.epoch)
    if verdict.best_of_run:  # best.pt keeps its validation logits: calibration and the val report reuse them
        env.saver.save(ctx.run.best, epoch=state.epoch, metrics=metrics, outputs=outputs)
    if verdict.best_of_phase and stopping_cfg.restore_best:
        if verdict.best_of_run:
            env.saver.copy(ctx.run.best, ctx.run.phase_best)
        else:
            env.saver.save(ctx.run.phase_best, epoch=state.epoch, metrics=metrics)
    if verdict.stop_phase:
        log.info("early stopping: %s did not improve for %d epoch(s)", env.stopping.metric, env.stopping.bad_epochs)
        state.phase_epoch = phase.config.epochs
    phase_done = state.phase_epoch >= phase.config.epochs
    if phase_done and stopping_cfg.restore_best and env.stopping.bad_epochs > 0:
        _restore_phase_best(bundle, ctx.run, env.device)  # before last.pt, so a resume sees the same weights
    state.stopping = env.stopping.state_dict()
    state.finished = phase_done and last_phase
    saved = state.to_dict()
    if phase_done and not last_phase:  # a resume starts the next phase afresh
        saved.update(phase=phase.index + 1, phase_epoch=0)
    else:
        saved.update(optimizer=phase.optimizer.state_dict(), scheduler=phase.schedule.state_dict())
    env.saver.save(ctx.run.last, epoch=state.epoch, metrics=metrics, training_state=saved)


def _restore_phase_best(bundle: ModelBundle, run: RunDir, device: torch.device) -> None:
    barrier()  # rank 0 has written phase_best.pt
    best = load_checkpoint(run.phase_best)
    bundle.model.load_state_dict({k: v.to(device) for k, v in best["state_dict"].items()})
    log.info("restored the phase's best weights (epoch %d)", best["epoch"])


def _train_epoch(ctx: FitContext, env: _Env, phase: _Phase, epoch: int) -> tuple[float, float]:
    """This epoch's loader (order and augmentation from the seed and the epoch number), then one pass over it."""
    data = ctx.recipe.data
    seed = epoch_seed(ctx.recipe.seed, epoch)
    if phase.cached is not None:
        phase.cached.train.choose_views(seed)
    loader = make_loader(
        phase.train_set,
        batch_size=data.batch_size,
        num_workers=0 if phase.cached else data.num_workers,
        shuffle=True,
        seed=seed,
        pin_memory=env.device.type == "cuda" and phase.cached is None,
        balanced=data.sampler == "weighted",
        rank=env.ranks.rank,
        world=env.ranks.world,
        drop_lone_last=phase.drop_lone_last,
    )
    stepper = Stepper(
        criterion=env.criterion,
        optimizer=phase.optimizer,
        schedule=phase.schedule,
        device=env.device,
        dtype=env.dtype,
        scaler=env.scaler,
        grad_clip=ctx.recipe.train.grad_clip,
    )
    return train_one_epoch(
        phase.net, loader, stepper, epoch=epoch, progress=ctx.progress, desc=f"epoch {epoch}/{env.total_epochs}"
    )
