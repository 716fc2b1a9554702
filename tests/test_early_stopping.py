"""Best epoch on ties (training/early_stopping.py, training/scoring.py): equal on the metric, the next metric decides."""

import numpy as np
import pandas as pd

from finetune import train
from finetune.config.train_schema import EmaConfig
from finetune.inference.checkpoint import load_checkpoint
from finetune.training.early_stopping import EarlyStopping
from finetune.training.scoring import select
from finetune.training.validation import Validation

from conftest import tiny_recipe


def _epochs(stopping, rows):
    return [stopping.update({"val_accuracy": acc, "val_loss": loss, "val_macro_f1": acc}, epoch) for epoch, (acc, loss) in rows]


def test_a_tie_on_accuracy_goes_to_the_lower_val_loss_and_patience_counts_the_metric():
    stopping = EarlyStopping(metric="val_accuracy", patience=2)
    verdicts = _epochs(stopping, enumerate([(0.627, 0.70), (0.627, 0.65), (0.627, 0.66)], start=1))
    assert stopping.best_epoch == 2 and stopping.best == 0.627 and stopping.best_second == 0.65
    assert [v.best_of_run for v in verdicts] == [True, True, False]
    assert [v.best_of_phase for v in verdicts] == [True, True, False]
    assert [v.stop_phase for v in verdicts] == [False, False, True]  # two epochs without a better accuracy
    again = EarlyStopping(metric="val_accuracy", patience=2)
    again.load_state_dict(stopping.state_dict())  # a resumed run breaks the next tie the same way
    assert again.update({"val_accuracy": 0.627, "val_loss": 0.60}, 4).best_of_run and again.best_epoch == 4


def test_a_tie_on_val_loss_goes_to_the_higher_accuracy():
    stopping = EarlyStopping(metric="val_loss")
    _epochs(stopping, enumerate([(0.60, 0.5), (0.70, 0.5), (0.65, 0.5)], start=1))
    assert stopping.best_epoch == 2


def test_a_checkpointed_state_without_the_tiebreak_still_resumes():
    old = {k: v for k, v in EarlyStopping(best=0.5, best_epoch=1, phase_best=0.5).state_dict().items() if "second" not in k}
    stopping = EarlyStopping()
    stopping.load_state_dict(old)
    assert not stopping.update({"val_accuracy": 0.5, "val_loss": 0.1}, 2).best_of_run  # no loss to compare with
    assert stopping.update({"val_accuracy": 0.6, "val_loss": 0.1}, 3).best_of_run


def test_raw_and_ema_weights_tied_on_accuracy_go_to_the_lower_loss():
    def validation(acc, loss):
        return Validation(
            metrics={"val_accuracy": acc, "val_loss": loss, "val_macro_f1": acc}, logits=np.zeros((1, 2)), targets=np.zeros(1)
        )

    both = EmaConfig(evaluate="both")
    assert select(validation(0.8, 0.5), validation(0.8, 0.4), both, metric="val_accuracy").selected == "ema"
    assert select(validation(0.8, 0.4), validation(0.8, 0.5), both, metric="val_accuracy").selected == "raw"


def test_training_keeps_the_tied_epoch_with_the_lowest_val_loss(tmp_path, image_folder):
    """A learning rate of 1e-9 leaves the predictions (and the accuracy) as they are while BatchNorm statistics move
    the loss: every epoch ties, and best.pt must be the lowest-loss one, not the first."""
    result = train(recipe=tiny_recipe(train={"epochs": 4, "lr": 1e-9}), data=image_folder, out=tmp_path / "run", progress=False)
    history: pd.DataFrame = result.history
    assert history["val_accuracy"].nunique() == 1, history  # the ties this test is about
    lowest = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert load_checkpoint(result.best_checkpoint)["epoch"] == lowest != 1
