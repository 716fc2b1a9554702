"""Label audit from out-of-fold probabilities: cleanlab's confident learning (which labels look wrong, how good each
label is, which classes overlap), conflicting duplicates, and outlier scores from backbone features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from finetune.errors import UsageError
from finetune.inference.predictions import Predictions


def require_cleanlab() -> None:
    """One line naming the extra when cleanlab is not installed (checked before any fold trains)."""
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise UsageError("finetune audit needs cleanlab: pip install '.[audit]' (or pip install cleanlab)") from None


@dataclass
class LabelAudit:
    """Per image (most suspect first), the overlapping class pairs, and cleanlab's overall label health score."""

    table: pd.DataFrame  # path, given_label, suggested_label, given_prob, suggested_prob, label_quality, label_issue
    overlapping: pd.DataFrame  # class_a, class_b, images, joint_probability
    health: float  # 1 - the estimated share of wrong labels


def audit_labels(preds: Predictions, class_names: list[str]) -> LabelAudit:
    """Confident learning on out-of-fold probabilities: `find_label_issues` (prune by noise rate) flags images,
    `get_label_quality_scores` (self-confidence) ranks them, `find_overlapping_classes` pairs the classes."""
    from cleanlab.dataset import find_overlapping_classes, overall_label_health_score
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels, probs = preds.targets.astype(int), np.asarray(preds.probs, dtype=np.float64)
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")] = True
    names = np.asarray(class_names, dtype=object)
    rows = np.arange(len(labels))
    table = pd.DataFrame(
        {
            "path": preds.paths,
            "given_label": names[labels],
            "suggested_label": names[probs.argmax(axis=1)],
            "given_prob": probs[rows, labels],
            "suggested_prob": probs.max(axis=1),
            "label_quality": get_label_quality_scores(labels, probs),
            "label_issue": flagged,
        }
    )
    table = table.sort_values(["label_issue", "label_quality"], ascending=[False, True], kind="stable").reset_index(drop=True)
    pairs = find_overlapping_classes(labels=labels, pred_probs=probs)
    overlapping = pd.DataFrame(
        {
            "class_a": names[pairs["Class Index A"].astype(int)] if len(pairs) else [],
            "class_b": names[pairs["Class Index B"].astype(int)] if len(pairs) else [],
            "images": pairs["Num Overlapping Examples"].astype(int) if len(pairs) else [],
            "joint_probability": pairs["Joint Probability"] if len(pairs) else [],
        }
    )
    health = float(overall_label_health_score(labels, probs, verbose=False))
    return LabelAudit(table=table, overlapping=overlapping, health=health)


def outlier_scores(features: np.ndarray) -> np.ndarray:
    """cleanlab's out-of-distribution score of every image from its backbone features (k nearest neighbours'
    average cosine distance, mapped to (0, 1]): low means unlike the rest of the data set."""
    from cleanlab.outlier import OutOfDistribution

    neighbours = max(1, min(10, len(features) - 1))
    detector = OutOfDistribution(params={"k": neighbours})
    return np.asarray(detector.fit_score(features=np.asarray(features, dtype=np.float32), verbose=False))


def audit_multilabel(preds: Predictions, class_names: list[str]) -> LabelAudit:
    """Several labels per image: cleanlab's multi-label confident learning on out-of-fold probabilities
    (`multilabel_classification.filter.find_label_issues` flags images, `rank.get_label_quality_scores` ranks them),
    and per image the labels that look missing (the models say yes, the label set lacks it) or wrong (given, the
    models say no, at probability 0.5). `overlapping` lists each class's own issue counts and quality."""
    from cleanlab.multilabel_classification.dataset import overall_multilabel_health_score, rank_classes_by_multilabel_quality
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    truth = np.asarray(preds.targets) > 0.5
    probs = np.asarray(preds.probs, dtype=np.float64)
    labels = [[int(c) for c in np.flatnonzero(row)] for row in truth]
    said = probs >= 0.5
    names = np.asarray(class_names, dtype=object)

    def joined(mask: np.ndarray) -> list[str]:
        return ["|".join(names[row]) for row in mask]

    table = pd.DataFrame(
        {
            "path": preds.paths,
            "given_labels": joined(truth),
            "suggested_labels": joined(said),
            "looks_missing": joined(said & ~truth),
            "looks_wrong": joined(truth & ~said),
            "label_quality": get_label_quality_scores(labels, probs),
            "label_issue": find_label_issues(labels=labels, pred_probs=probs),
        }
    )
    table = table.sort_values(["label_issue", "label_quality"], ascending=[False, True], kind="stable").reset_index(drop=True)
    ranked = rank_classes_by_multilabel_quality(labels=labels, pred_probs=probs)
    per_class = pd.DataFrame(
        {
            "class": names[ranked["Class Index"].astype(int)],
            "label_issues": ranked["Label Issues"].astype(int),
            "label_quality": ranked["Label Quality Score"],
        }
    )
    return LabelAudit(table=table, overlapping=per_class, health=float(overall_multilabel_health_score(labels, probs)))
