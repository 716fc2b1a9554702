"""The end of an epoch: validation (raw and EMA weights), the log line, early stopping and the checkpoints."""

from __future__ import annotations

import logging
from typing import Any

from finetune.inference.checkpoint import load_checkpoint
from finetune.models.build import ModelBundle
from finetune.run_dir import RunDir
from finetune.training.context import Env, FitContext, FitState, Phase
from finetune.training.distributed import barrier
from finetune.training.history import live_row
from finetune.training.scoring import EpochScores, chosen_weights, select
from finetune.training.validation import validate

log = logging.getLogger(__name__)


def validate_epoch(ctx: FitContext, env: Env, phase: Phase) -> EpochScores:
    """The raw weights on the validation split, and the EMA weights too when the recipe averages."""
    nets = [phase.val_net] + ([phase.ema_val_net] if phase.ema_val_net is not None else [])
    runs = [
        validate(
            net,
            phase.val_batches,
            device=env.device,
            ranks=env.ranks,
            total=len(ctx.val_set),
            num_classes=len(ctx.class_names),
            progress=ctx.progress,
            task=ctx.task,
        )
        for net in nets
    ]
    train = ctx.recipe.train
    return select(runs[0], runs[1] if len(runs) > 1 else None, train.ema, metric=ctx.monitored)


def log_epoch(row: dict[str, Any], *, best: bool) -> None:
    """The epoch's line of the table that `live_header` heads, as fastai grows its table during fit."""
    log.info("%s", live_row(row, best=best))


def after_epoch(
    bundle: ModelBundle,
    ctx: FitContext,
    env: Env,
    phase: Phase,
    state: FitState,
    *,
    metrics: dict[str, float],
    scores: EpochScores,
    last_phase: bool,
) -> None:
    """Early stopping and restore-best decisions, then best.pt / phase_best.pt / last.pt."""
    stopping_cfg = ctx.recipe.train.early_stopping
    verdict = env.stopping.update(metrics, state.epoch)
    weights = chosen_weights(scores, env.ema.module if env.ema is not None else None)
    if verdict.best_of_run:  # best.pt keeps its validation logits: calibration and the val report reuse them
        env.saver.save(ctx.run.best, epoch=state.epoch, metrics=metrics, outputs=scores.outputs(), weights=weights)
    if verdict.best_of_phase and stopping_cfg.restore_best:
        if verdict.best_of_run:
            env.saver.copy(ctx.run.best, ctx.run.phase_best)
        else:
            env.saver.save(ctx.run.phase_best, epoch=state.epoch, metrics=metrics, weights=weights)
    if verdict.stop_phase:
        log.info("early stopping: %s did not improve for %d epoch(s)", env.stopping.metric, env.stopping.bad_epochs)
        state.phase_epoch = phase.config.epochs
    phase_done = state.phase_epoch >= phase.config.epochs
    if phase_done and stopping_cfg.restore_best and env.stopping.bad_epochs > 0:
        restore_phase_best(bundle, ctx.run, env)  # before last.pt, so a resume sees the same weights
    state.finished = phase_done and last_phase
    next_phase = phase_done and not last_phase  # a resume starts the next phase afresh: no optimizer or schedule
    state.addons = env.addons.state_dict(with_phase=not next_phase)
    saved = state.to_dict()
    if next_phase:
        saved.update(phase=phase.index + 1, phase_epoch=0)
    env.saver.save(ctx.run.last, epoch=state.epoch, metrics=metrics, training_state=saved)


def restore_phase_best(bundle: ModelBundle, run: RunDir, env: Env) -> None:
    """The phase's best weights (raw or averaged, whichever it kept) become the model's, and the average's."""
    barrier()  # rank 0 has written phase_best.pt
    best = load_checkpoint(run.phase_best)
    weights = {k: v.to(env.device) for k, v in best["state_dict"].items()}
    bundle.model.load_state_dict(weights)
    if env.ema is not None:
        env.ema.module.load_state_dict(weights)
    log.info("restored the phase's best weights (epoch %d)", best["epoch"])
