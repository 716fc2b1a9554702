"""The training loop: phases of frozen/trainable stages, one epoch at a time, checkpointed so `--resume` is exact."""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from finetune.config.catalog import STAGES
from finetune.config.schema import PhaseConfig
from finetune.data.loader import batches_per_epoch, make_loader
from finetune.inference.device import autocast_dtype, resolve_device
from finetune.models.build import ModelBundle
from finetune.models.families import policy_note
from finetune.models.stages import set_train_mode
from finetune.training.addons import AddOns
from finetune.training.checkpoint import CheckpointSaver
from finetune.training.context import Env, FitContext, FitState, Phase
from finetune.training.distributed import Ranks, barrier, current, mean_across
from finetune.training.early_stopping import EarlyStopping
from finetune.training.ema import StageEma, moving_tensors
from finetune.training.epoch import Stepper, train_one_epoch
from finetune.training.epoch_end import after_epoch, log_epoch, validate_epoch
from finetune.training.feature_cache import CachedPhase, cached_modules, phase_cache
from finetune.training.history import append_history_row, clock, live_header, seconds_left
from finetune.training.loss import build_criterion
from finetune.training.mixup import Mixer, soft_target_criterion
from finetune.training.optim import build_scheduler, stage_lrs
from finetune.training.phase import set_up_phase
from finetune.training.precision import Precision, choose_layout, choose_precision, first_batch
from finetune.training.scoring import EpochScores
from finetune.training.seeding import epoch_seed, seed_epoch

__all__ = ["FitContext", "FitState", "fit"]

log = logging.getLogger(__name__)
RUN_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's own ETA would count the caching first epoch


def _precision(bundle: ModelBundle, ctx: FitContext, state: FitState, criterion: nn.Module, ranks: Ranks) -> Precision:
    """The recipe's amp made concrete: a resumed run keeps the choice its last.pt recorded; `auto` is decided once."""
    cfg = ctx.recipe.train
    device = resolve_device(cfg.device)
    if state.epoch > 0:
        precision = Precision()
        if "precision" in state.addons:
            precision.load_state_dict(state.addons["precision"])
        else:  # a last.pt from before the choice was recorded, when both autos meant off on every CPU
            legacy = "off" if cfg.amp == "auto" and device.type == "cpu" else cfg.amp
            precision = choose_precision(legacy, device=device, model=bundle.model, batch=None, criterion=criterion, ranks=ranks)
            precision.channels_last = cfg.channels_last is True
        log.info(
            "amp: %s%s, as the run chose when it started (%s)",
            precision.amp,
            ", channels_last" if precision.channels_last else "",
            precision.reason,
        )
        return precision
    candidate = cfg.amp == "auto" and autocast_dtype("auto", device) is not None  # else no image is decoded for it
    batch = first_batch(ctx.train_set, ctx.recipe.data.batch_size) if candidate else None
    precision = choose_precision(cfg.amp, device=device, model=bundle.model, batch=batch, criterion=criterion, ranks=ranks)
    precision.channels_last = choose_layout(cfg.channels_last, precision, device)
    if cfg.channels_last == "auto" and precision.channels_last:
        log.info("channels_last auto: on (bf16 autocast on a CPU with native bf16: NHWC measured faster for ResNet-50)")
    return precision


def _environment(bundle: ModelBundle, ctx: FitContext, state: FitState) -> Env:
    cfg = ctx.recipe.train
    device = resolve_device(cfg.device)
    ranks = current()
    criterion = build_criterion(ctx.recipe.loss, ctx.class_weights, task=ctx.task).to(device)
    precision = _precision(bundle, ctx, state, criterion, ranks)
    dtype = precision.dtype
    if precision.channels_last:  # before the weight average copies the model
        bundle.model.to(memory_format=torch.channels_last)
    stopping = EarlyStopping.from_config(cfg.early_stopping, task_metric=ctx.task.early_stopping_metric)
    ema = StageEma(bundle.model, cfg.ema) if cfg.ema is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    addons = AddOns()  # what last.pt keeps for the whole run; each phase adds its optimizer and schedule
    addons.register("stopping", stopping)
    addons.register("ema", ema)
    addons.register("scaler", scaler if scaler.is_enabled() else None)  # fp16's loss scale and its growth count
    if state.epoch > 0:  # a resumed run: every add-on continues where last.pt left it
        addons.load_run_state(state.addons)
    addons.register("precision", precision)  # after loading: a last.pt older than the choice holds none (legacy auto)
    mixer = None
    if cfg.mixup is not None:
        mixer = Mixer(
            cfg.mixup,
            label_smoothing=ctx.recipe.loss.label_smoothing,
            num_classes=len(ctx.class_names),
            multi_label=ctx.task.name == "multilabel",
        )
    return Env(
        device=device,
        dtype=dtype,
        channels_last=precision.channels_last,
        scaler=scaler,
        criterion=criterion,
        ranks=ranks,
        stopping=stopping,
        saver=CheckpointSaver(
            bundle=bundle,
            class_names=ctx.class_names,
            image=ctx.image,
            recipe=ctx.recipe,
            enabled=ranks.main,
            task=ctx.task.name,
            precision=precision.state_dict(),
        ),
        total_epochs=sum(p.epochs for p in cfg.resolved_phases()),
        ema=ema,
        mixer=mixer,
        mixed_criterion=soft_target_criterion(ctx.class_weights, task=ctx.task).to(device) if mixer is not None else None,
        addons=addons,
    )


def fit(bundle: ModelBundle, ctx: FitContext, *, state: FitState | None = None) -> FitState:
    """Train through every phase of the recipe; returns the final state. `state` resumes a run.

    One progress bar counts the run's epochs (with an ETA) above each epoch's own bar.
    """
    state = state or FitState()
    bundle.model.to(resolve_device(ctx.recipe.train.device))
    env = _environment(bundle, ctx, state)
    phases = ctx.recipe.train.resolved_phases()
    rows: list[dict[str, Any]] = []  # this process's epochs, for the run's ETA
    with tqdm(
        total=env.total_epochs, initial=state.epoch, desc="run", unit="epoch", disable=not ctx.progress, bar_format=RUN_BAR
    ) as bar:
        for index in range(state.phase, len(phases)):
            phase = _prepare_phase(bundle, ctx, env, phases[index], index, state)
            while state.phase_epoch < phase.config.epochs:
                scores, row = _run_epoch(bundle, ctx, env, phase, state, last_phase=index == len(phases) - 1)
                rows.append(row)
                left = seconds_left(pd.DataFrame(rows), env.total_epochs)
                # the postfix first: update() redraws, and the bar shows this epoch's accuracy, not the last one's
                estimate = f"left ~{clock(left)}" if left is not None else "left: after epoch 2"
                bar.set_postfix_str(f"val_acc={scores.chosen.metrics['val_accuracy']:.4f}, {estimate}", refresh=False)
                bar.update(state.epoch - bar.n)
    barrier()  # every checkpoint is on disk before any rank goes on
    return state


def _prepare_phase(bundle: ModelBundle, ctx: FitContext, env: Env, config: PhaseConfig, index: int, state: FitState) -> Phase:
    """Freeze, build the optimizer and schedule (restored when resuming inside this phase), pick what trains on what."""
    setup = set_up_phase(bundle, config, ctx.recipe.train)
    plan, trainable, optimizer = setup.plan, setup.trainable, setup.optimizer
    if env.ema is not None:  # still tensors are copied into the average, moving ones averaged from now on
        env.ema.start_phase(bundle.model, moving_tensors(bundle.model, plan, bundle.stages))
    # a batch of one can be neither normalised nor mixed with another: left out of the epoch
    lone = setup.lone_batch_fails or env.mixer is not None
    steps = max(1, batches_per_epoch(len(ctx.train_set), ctx.recipe.data.batch_size, world=env.ranks.world, drop_lone_last=lone))
    schedule = build_scheduler(
        optimizer, ctx.recipe.train, total_steps=config.epochs * steps, steps_per_epoch=steps, metric=ctx.monitored
    )
    env.addons.start_phase()
    env.addons.register("optimizer", optimizer, per_phase=True)
    env.addons.register("scheduler", schedule, per_phase=True)  # after the optimizer: it sets the restored rates
    if state.phase == index and state.phase_epoch > 0:  # resumed inside this phase
        env.addons.load_phase_state(state.addons)
    else:
        state.phase, state.phase_epoch = index, 0
        env.stopping.start_phase()
    log.info(
        "phase %d/%d: training %s (%s parameters), %d epoch(s), lr %g, norm %s",
        index + 1,
        len(ctx.recipe.train.resolved_phases()),
        ", ".join(plan.trainable),
        f"{trainable:,}",
        config.epochs,
        config.lr,
        "trains (no stage is frozen)"
        if set(plan.trainable) == set(STAGES)
        else f"{config.norm} ({policy_note(bundle.stages.normalisation, config.norm)})",
    )
    mean_ap = ctx.task.metric_family.headline == "mean_average_precision"  # the metric best.pt follows by default
    log.info("%s", live_header(ema=env.ema is not None, mean_ap=mean_ap))
    started = time.perf_counter()
    net, val_net, train_set, val_batches, cached = _phase_inputs(bundle, ctx, env, config)
    ema_val_net: nn.Module | None = None
    if env.ema is not None:
        ema_val_net = env.ema.module
        if cached is not None:
            ema_val_net = cached.network(env.ema.module, cached_modules(bundle, cached.first))
    return Phase(
        index=index,
        config=config,
        plan=plan,
        optimizer=optimizer,
        schedule=schedule,
        net=net,
        val_net=val_net,
        ema_val_net=ema_val_net,
        train_set=train_set,
        val_batches=val_batches,
        cached=cached,
        drop_lone_last=lone,
        setup_started=started,
    )


def _phase_inputs(
    bundle: ModelBundle, ctx: FitContext, env: Env, config: PhaseConfig
) -> tuple[nn.Module, nn.Module, Any, Any, CachedPhase | None]:
    """(training net, validation net, training set, validation batches, feature cache or None) for one phase."""
    data = ctx.recipe.data
    cached = phase_cache(
        bundle,
        ctx.recipe,
        config,
        train_set=ctx.train_set,
        val_set=ctx.val_set,
        device=env.device,
        dtype=env.dtype,
        distributed=env.ranks.enabled,
        progress=ctx.progress,
        root=ctx.cache_dir,
    )
    if cached is not None:  # the trainable suffix trains on the frozen prefix's cached outputs: no image decoding
        val_batches = make_loader(cached.val, batch_size=data.batch_size, num_workers=0, shuffle=False, seed=0)
        return cached.head, cached.head, cached.train, val_batches, cached
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
    if ctx.recipe.train.compile:  # the compiled forward shares the model's parameters: checkpoints are unchanged
        net = torch.compile(net)  # type: ignore[assignment]  # an OptimizedModule, typed as a plain callable
    return net, bundle.model, ctx.train_set, val_loader, None


def _run_epoch(
    bundle: ModelBundle, ctx: FitContext, env: Env, phase: Phase, state: FitState, *, last_phase: bool
) -> tuple[EpochScores, dict[str, Any]]:
    """Train one epoch, validate, write its metrics row, decide early stopping, write checkpoints, log its line."""
    epoch = state.epoch + 1
    started, phase.setup_started = phase.setup_started or time.perf_counter(), None
    set_train_mode(bundle.model, phase.plan, bundle.stages)
    seed_epoch(ctx.recipe.seed, epoch, rank=env.ranks.rank)
    lrs = stage_lrs(phase.optimizer)
    train_loss, train_acc = _train_epoch(ctx, env, phase, epoch)
    train_loss, train_acc = mean_across([train_loss, train_acc], env.ranks, env.device)
    scores = validate_epoch(ctx, env, phase)
    phase.schedule.end_epoch(scores.chosen.metrics)  # plateau decays look at the weights the run follows
    row = {
        "epoch": epoch,
        "phase": phase.index + 1,
        "phase_epoch": state.phase_epoch + 1,
        "lr": lrs["head"],
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        **scores.columns(),
        "seconds": time.perf_counter() - started,
    }
    if env.ranks.main:
        append_history_row(ctx.run, row)
        if ctx.trackers is not None:
            ctx.trackers.epoch(epoch, row, lrs)
    state.epoch, state.phase_epoch = epoch, state.phase_epoch + 1
    metrics = {k: float(v) for k, v in row.items() if k != "selected"} | scores.chosen.metrics
    after_epoch(bundle, ctx, env, phase, state, metrics=metrics, scores=scores, last_phase=last_phase)
    log_epoch(row, best=env.stopping.best_epoch == epoch)
    if ctx.on_epoch_end is not None:
        ctx.on_epoch_end(state)
    return scores, row


def _train_epoch(ctx: FitContext, env: Env, phase: Phase, epoch: int) -> tuple[float, float]:
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
        mix=env.mixer if env.mixer is not None and ctx.recipe.train.mixup and ctx.recipe.train.mixup.active(epoch) else None,
        mixed_criterion=env.mixed_criterion,
        ema=env.ema,
        channels_last=env.channels_last,
        task=ctx.task,
    )
    return train_one_epoch(
        phase.net, loader, stepper, epoch=epoch, progress=ctx.progress, desc=f"epoch {epoch}/{env.total_epochs}"
    )
