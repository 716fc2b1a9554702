"""summary.md, and the sentences the HTML shares with it: which split, how sure, how calibrated."""

from __future__ import annotations

from typing import Any

import pandas as pd

from finetune.evaluation.scorecard import Scorecard
from finetune.reporting.markdown import escape_markdown, markdown_table


def interval(metrics: dict[str, Any], name: str) -> str:
    """'64.2% (95% CI 55.6-72.3%)' for a metric with an interval in metrics['ci95'], else just the value."""
    value = metrics[name]
    bounds = metrics.get("ci95", {}).get(name)
    if bounds is None:
        return f"{value:.1%}"
    return f"{value:.1%} (95% CI {bounds[0]:.1%}-{bounds[1]:.1%})"


def split_sentence(split: str, selection: bool | str, leaks: pd.DataFrame | None = None) -> str:
    """What the numbers can be trusted for, given the split they were computed on (`selection`: True when it chose
    the best epoch, or the reason in words when the images are not new to the run for another cause), and the known
    leakage: the run's duplicate pairs across splits (leakage.csv), when there are any."""
    said = _split_words(split, selection)
    return f"{said} {leakage_sentence(leaks, split)}" if leaks is not None and len(leaks) else said


def leakage_sentence(leaks: pd.DataFrame, split: str) -> str:
    """'Known leakage: 34 duplicate pair(s) cross the splits, 22 of them reach the test split ...' (leakage.csv)."""
    reaching = (leaks["split_a"] == split) | (leaks["split_b"] == split)
    reach, total, up_to = int(reaching.sum()), len(leaks), ""
    if "group_pairs" in leaks.columns:  # a large group of look-alikes is listed up to a cap; group_pairs counts all
        counted = leaks.astype({"group_pairs": int})  # leakage.csv is read back as text
        groups = counted.groupby("group").agg(rows=("split_a", "size"), pairs=("group_pairs", "first"))
        total = int(groups["pairs"].sum())
        unlisted = groups.loc[groups.index.isin(leaks.loc[reaching, "group"]), ["rows", "pairs"]]
        if (unlisted["pairs"] > unlisted["rows"]).any():  # some of a capped group's unlisted pairs may reach it
            reach, up_to = reach + int((unlisted["pairs"] - unlisted["rows"]).sum()), "up to "
    where = f"{up_to}{reach} of them reach the {split} split" if reach else f"none reaches the {split} split"
    return (
        f"Known leakage: {total} duplicate pair(s) cross the splits (leakage.csv), {where}"
        + (", so these figures may be inflated" if reach else ", though the epoch and temperature choice may be flattered")
        + "; remove the copies or set data.group_pattern, and train again."
    )


def _split_words(split: str, selection: bool | str) -> str:
    if selection:
        why = (
            selection
            if isinstance(selection, str)
            else f"the {split} split also chose the best epoch (and fitted the temperature)"
        )
        return (
            f"Optimistic: {why}, so these figures flatter the model. "
            "Keep a test split (data.test_fraction, or a test/ folder) for numbers to quote."
        )
    if split == "test":
        return "Computed on the test split, which nothing during training saw: not early stopping, not the best epoch, not the temperature."
    return f"Computed on the '{split}' images, which this run did not train on."


def calibration_sentence(metrics: dict[str, Any]) -> str:
    calibration = metrics.get("calibration", {})
    after = calibration.get("after", {})
    if "before" not in calibration:
        return f"Confidence as the model gives it: ECE {after.get('ece', metrics['ece']):.3f} (no temperature fitted)."
    before = calibration["before"]
    return (
        f"Temperature {calibration['temperature']:.2f} (fitted on the validation split): ECE {before['ece']:.3f} -> {after['ece']:.3f}, "
        f"NLL {before['nll']:.3f} -> {after['nll']:.3f}, Brier {before['brier']:.3f} -> {after['brier']:.3f}."
    )


def coverage_sentence(metrics: dict[str, Any]) -> str:
    parts, total = [], int(metrics.get("num_images", 0))
    for target, coverage in metrics.get("coverage_at_accuracy", {}).items():
        answered = "no threshold reaches it"
        if coverage is not None:
            count = round(coverage * total)
            answered = f"{coverage:.0%} of images ({count} of {total}{', too few to trust' if count < 10 else ''})"
        parts.append(f"{float(target):.0%} accuracy: {answered}")
    return "Answering only above a confidence threshold: " + "; ".join(parts) + "." if parts else ""


def per_class_with_intervals(per_class: pd.DataFrame) -> pd.DataFrame:
    """class, precision, recall, f1 as 'value [lo, hi]' strings, and support; worst F1 first."""
    table = per_class.sort_values("f1")
    shown = pd.DataFrame({"class": table["class"]})
    for name in ("precision", "recall", "f1"):
        shown[name] = [
            f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(table[name], table[f"{name}_lo"], table[f"{name}_hi"])
        ]
    shown["support"] = table["support"]
    return shown


def summary_markdown(
    card: Scorecard,
    title: str,
    *,
    split: str | None,
    selection: bool | str,
    notes: dict[str, Any],
    leaks: pd.DataFrame | None = None,
) -> str:
    """The short human summary with the tables (`leaks`: the run's duplicate pairs across splits, said in the banner)."""
    m = card.metrics
    worst = card.per_class.sort_values("f1").iloc[0]
    headline = {k: v for k, v in m.items() if isinstance(v, float)}
    return "\n".join(
        [
            f"# {escape_markdown(title)}",
            "",
            *([f"> **{escape_markdown(split_sentence(split, selection, leaks))}**", ""] if split else []),
            f"{m['num_images']} images, {m['num_classes']} classes: accuracy **{interval(m, 'accuracy')}**, balanced accuracy "
            f"{interval(m, 'balanced_accuracy')}, macro-F1 {interval(m, 'macro_f1')}.",
            "",
            calibration_sentence(m),
            "",
            coverage_sentence(m),
            "",
            markdown_table(pd.Series(headline, name="value").to_frame(), index=True, floatfmt=".4f"),
            "",
            "## Per class (worst F1 first; 95% intervals: Wilson for precision and recall, a stratified bootstrap for F1)",
            "",
            markdown_table(per_class_with_intervals(card.per_class), names=["class"]),
            "",
            f"Weakest class: **{escape_markdown(worst['class'])}** (F1 {worst['f1']:.3f}). "
            "See report.html, confusion_matrix.png and predictions.csv for where its images went."
            if worst["f1"] < 1.0
            else f"Every class is right on all {m['num_images']} images (F1 1.000 each): no weakest class here.",
            "",
            *[f"- {escape_markdown(key)}: {escape_markdown(value)}" for key, value in notes.items()],
            "",
        ]
    )
