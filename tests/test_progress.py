"""The live view (reporting/progress.py and the train command's epoch callback): progress.html and
training_curves.png rewritten after every epoch, the kept epoch marked; the terminal's epoch table and ETA."""

import base64
import re

import pandas as pd

from finetune import train
from finetune.inference.checkpoint import load_checkpoint
from finetune.reporting import plots
from finetune.training.history import live_header, live_row, seconds_left

from conftest import tiny_recipe


def test_the_page_and_the_curves_follow_every_epoch(tmp_path, image_folder, caplog):
    caplog.set_level("INFO", logger="finetune")
    run = tmp_path / "run"
    seen = []

    def look(state):  # what a browser would load between two epochs
        seen.append((state.epoch, (run / "progress.html").read_text(), (run / "training_curves.png").read_bytes()))

    train(recipe=tiny_recipe(train={"epochs": 3}), data=image_folder, out=run, progress=False, on_epoch_end=look)
    assert [epoch for epoch, _, _ in seen] == [1, 2, 3]
    for epoch, page, curves in seen:
        assert '<meta http-equiv="refresh" content="10">' in page
        assert f"<h1>Training: epoch {epoch} of 3 done</h1>" in page
        assert len(re.findall(r"<tr[ >]", page)) == epoch + 1  # the header and one row per epoch
        assert f"data:image/png;base64,{base64.b64encode(curves).decode()}" in page  # the figure is inside the page
        assert not re.search(r"https?://|<script|<link", page)  # self-contained
    assert "Time left: shown after epoch 2." in seen[0][1] and re.search(
        r"About \d\d:\d\d left \(from the latest epochs\)", seen[1][1]
    )
    assert len({curves for _, _, curves in seen}) == 3  # redrawn each time
    final = (run / "progress.html").read_text()
    kept = load_checkpoint(run / "checkpoints" / "best.pt")["epoch"]
    assert "http-equiv" not in final and "<h1>Finished: 3 epoch(s)</h1>" in final and 'href="report/report.html"' in final
    assert [int(e) for marked, e in re.findall(r'<tr( class="kept")?>\s*<td>(\d+)</td>', final) if marked] == [kept]
    assert f"Kept: epoch {kept} (best val_accuracy " in final and "a tie goes to the lower val_loss" in final
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.endswith("3 epoch(s), lr 0.001, norm trains (no stage is frozen)") for line in lines)  # not "BN frozen"
    assert "training all stages at lr 0.001, norm trains (no stage is frozen)" in (run / "report" / "report.html").read_text()
    header = live_header(ema=False)
    assert header in lines and header.split() == [
        "epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "duration", "best"
    ]  # fmt: skip
    rows = [line.split() for line in lines if re.match(r"^\s+\d+\s+1\s+\d\.\d{4}", line)]
    assert [row[0] for row in rows] == ["1", "2", "3"] and rows[0][-1] == "*"  # epoch 1 is always a best so far
    assert [row[-1] == "*" for row in rows][kept - 1]


def test_the_curves_mark_the_kept_epoch(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "phase": [1, 1, 1],
            "lr": [1e-3] * 3,
            "train_loss": [1.0, 0.8, 0.7],
            "train_accuracy": [0.5, 0.6, 0.7],
            "val_loss": [0.9, 0.8, 0.85],
            "val_accuracy": [0.6, 0.7, 0.7],
            "val_macro_f1": [0.55, 0.68, 0.69],
        }
    )
    plots.plot_training_curves(history, tmp_path / "c.png", kept_epoch=2)
    loss, accuracy, _ = drawn[0].axes
    assert "kept: epoch 2" in loss.get_legend_handles_labels()[1] and "kept: epoch 2" in accuracy.get_legend_handles_labels()[1]
    star = next(line for line in accuracy.lines if line.get_label() == "kept: epoch 2")
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [0.7]


def test_the_learning_rate_axis_is_labelled_in_plain_text_not_raw_mathtext(tmp_path, monkeypatch):
    """The report's names-are-text rule (text.parse_math off) drew matplotlib's own log ticks as
    `$\\mathdefault{10^{-3}}$`; the learning-rate axes of the curves and of lr-find now read `1e-03`."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: (fig.draw_without_rendering(), drawn.append(fig)))
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "phase": [1, 1, 1],
            "lr": [1e-4, 1e-3, 3e-4],
            **{
                column: [0.5, 0.6, 0.7] for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1")
            },
        }
    )
    plots.plot_training_curves(history, tmp_path / "c.png", kept_epoch=2)
    curve = pd.DataFrame({"lr": [1e-6, 1e-5, 1e-4, 1e-3], "loss": [1.0, 0.9, 0.5, 0.7], "smoothed": [1.0, 0.9, 0.6, 0.7]})
    plots.plot_lr_curve(curve, 1e-4, tmp_path / "lr.png")
    lr_axes = [drawn[0].axes[2].yaxis, drawn[1].axes[0].xaxis]
    for axis in lr_axes:
        labels = [t.get_text() for t in (*axis.get_majorticklabels(), *axis.get_minorticklabels()) if t.get_text()]
        assert labels and not any("$" in label or "mathdefault" in label for label in labels), labels
    assert "1e\u221203" in [t.get_text() for t in lr_axes[0].get_majorticklabels()]


def test_curves_of_several_labels_per_image_show_the_map_that_kept_the_epoch(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    history = pd.DataFrame(
        {
            "epoch": [1, 2],
            "phase": [1, 1],
            "lr": [1e-3, 1e-3],
            **{column: [0.5, 0.6] for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1")},
            "val_mean_average_precision": [0.8, 0.9],
        }
    )
    plots.plot_training_curves(history, tmp_path / "c.png", kept_epoch=2)
    accuracy = drawn[0].axes[1]
    assert "val mAP" in accuracy.get_legend_handles_labels()[1]
    star = next(line for line in accuracy.lines if line.get_label() == "kept: epoch 2")
    assert list(star.get_ydata()) == [0.9]  # on the mAP that chose it, not on the accuracy (0.6)


def test_the_time_left_comes_from_later_epochs_not_a_caching_first_one():
    history = pd.DataFrame({"epoch": [1], "phase": [1], "phase_epoch": [1], "seconds": [30.0]})
    assert seconds_left(history, 10) is None  # one epoch that filled a cache says nothing of the others
    history = pd.DataFrame({"epoch": [1, 2, 3], "phase": [1, 1, 1], "phase_epoch": [1, 2, 3], "seconds": [30.0, 2.0, 4.0]})
    assert seconds_left(history, 10) == 7 * 3.0
    two_phases = pd.DataFrame({"epoch": [1, 2, 3], "phase": [1, 1, 2], "phase_epoch": [1, 2, 1], "seconds": [30.0, 2.0, 50.0]})
    assert seconds_left(two_phases, 5) == 2 * 2.0  # phase 2's first epoch paid for its own caching
    firsts = pd.DataFrame({"epoch": [1, 2], "phase": [1, 2], "phase_epoch": [1, 1], "seconds": [3.0, 5.0]})
    assert seconds_left(firsts, 3) == 4.0  # one-epoch phases: their first epochs are all there is


def test_a_live_row_marks_the_best_and_mixed_epochs():
    row = {"epoch": 3, "phase": 2, "train_loss": 0.5, "train_accuracy": float("nan"), "val_loss": 0.4}
    row |= {"val_accuracy": 0.875, "val_macro_f1": 0.8, "seconds": 75.0}
    assert live_row(row, best=True).split() == ["3", "2", "0.5000", "mixed", "0.4000", "0.8750", "0.8000", "01:15", "*"]
    assert len(live_row(row, best=False)) == len(live_header(ema=False))
    several = row | {"val_mean_average_precision": 0.9375}  # several labels per image: the metric best.pt follows
    assert live_row(several, best=False).split()[7] == "0.9375"
    assert len(live_row(several, best=False)) == len(live_header(ema=False, mean_ap=True))
    assert live_header(ema=False, mean_ap=True).split()[7] == "val_mAP"
    assert live_row(several | {"val_mean_average_precision": float("nan")}, best=False).split()[7] == "-"


def test_the_bar_shows_this_epochs_accuracy(tmp_path, image_folder, capsys):
    result = train(recipe=tiny_recipe(train={"epochs": 2}), data=image_folder, out=tmp_path / "run", progress=True)
    shown = re.findall(r"run: +\d+%\|[^|]*\| (\d)/2 \[[^\]]*val_acc=([\d.]+)", capsys.readouterr().err)
    wanted = {str(e): f"{a:.4f}" for e, a in zip(result.history["epoch"], result.history["val_accuracy"])}
    assert shown and all(wanted[epoch] == accuracy for epoch, accuracy in shown)
