"""Stage patterns (stem, layer1..layer4) of a timm model, derived from timm's own description of it.

timm's `group_matcher(coarse=True)` names the stem and the *units* of the trunk (ResNet's `layerN`, EfficientNet's
`blocks.N`, ConvNeXt's `stages.N`, a ViT's `blocks.N`); `feature_info` says which units end a feature stage. The
four deepest feature stages are layer1..layer4:

- the units up to and including a stage's tap belong to that stage (EfficientNet's `blocks.3`, which no tap ends,
  joins `blocks.4` in its stage);
- a model with more than four feature stages folds the early ones into layer1 (EfficientNet's five: `blocks.0-1`);
- taps before the first stage (ResNet's `act1`, MobileNetV3's `bn1`) belong to the stem;
- what timm groups with the last block (ResNetV2's final `norm`, EfficientNet's `conv_head`/`bn2`, a ViT's `norm`,
  in either matcher) belongs to layer4.

A plain transformer has one tap per block and no stages at all: `even_block_patterns` splits its blocks into four
equal groups instead (the remainder going to the early groups: 14 blocks are 4 + 4 + 3 + 3).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from finetune.config.catalog import Stage
from finetune.errors import ModelError

LAYERS: tuple[Stage, ...] = ("layer1", "layer2", "layer3", "layer4")
# timm's MATCH_PREV_GROUP (timm/models/_manipulate.py): a group_matcher pattern that joins the last block's group,
# such as ResNetV2's final pre-activation `norm`.
_WITH_LAST_BLOCK = (99999,)

StagePatterns = Callable[[nn.Module], dict[Stage, str]]


def anchored(patterns: Iterable[str]) -> str:
    """One pattern for a module or tensor name that starts with any of `patterns` and ends there or at a dot."""
    return "^(?:" + "|".join(f"(?:{p})" for p in patterns) + r")(?:\.|$)"


def _split_matcher(value: Any) -> tuple[list[str], list[str]]:
    """(own patterns, patterns that join the last block) of one `group_matcher` entry: a regex, or (regex, group) pairs."""
    if isinstance(value, str):
        return [value], []
    own = [pattern for pattern, group in value if group != _WITH_LAST_BLOCK]
    return own, [pattern for pattern, group in value if group == _WITH_LAST_BLOCK]


@dataclass(frozen=True)
class TimmGrouping:
    """What timm says about one model: stem patterns, trunk units in forward order, feature taps, and the patterns
    that join the last block."""

    stem: list[str]
    units: list[str]
    taps: list[str]
    after: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> TimmGrouping:
        timm_model: Any = model  # group_matcher and feature_info are timm's, not nn.Module's
        coarse = timm_model.group_matcher(coarse=True)
        stem, _ = _split_matcher(coarse["stem"])
        blocks, after = _split_matcher(coarse["blocks"])
        _, fine_after = _split_matcher(timm_model.group_matcher(coarse=False)["blocks"])
        units = [name for name, _ in model.named_modules() if name and any(re.fullmatch(p, name) for p in blocks)]
        taps = [str(info["module"]) for info in timm_model.feature_info]
        return cls(stem=stem, units=units, taps=taps, after=list(dict.fromkeys(after + fine_after)))

    def unit_of(self, tap: str) -> int | None:
        """Index of the unit that `tap` is (or lies in); None for a tap outside the trunk (the stem's)."""
        return next((i for i, u in enumerate(self.units) if tap == u or tap.startswith(u + ".")), None)


def _patterns(
    grouping: TimmGrouping, stem_taps: Sequence[str], groups: Sequence[Sequence[str]], layer4_extra: Sequence[str]
) -> dict[Stage, str]:
    patterns: dict[Stage, str] = {"stem": anchored(grouping.stem + [re.escape(t) for t in stem_taps])}
    for layer, group in zip(LAYERS, groups, strict=True):
        patterns[layer] = anchored([re.escape(unit) for unit in group])
    patterns["layer4"] = anchored([*(re.escape(u) for u in groups[-1]), *grouping.after, *layer4_extra])
    return patterns


def _fold(groups: list[list[str]]) -> list[list[str]]:
    """Four groups: the early ones folded into the first when there are more."""
    early = len(groups) - len(LAYERS) + 1
    return [[unit for group in groups[:early] for unit in group], *groups[early:]]


def timm_stage_patterns(model: nn.Module, *, layer4_extra: Sequence[str] = ()) -> dict[Stage, str]:
    """stem and layer1..layer4 from timm's grouping of `model` (module docstring); `layer4_extra`: patterns of
    modules after the last unit that timm's matcher does not name (RegNet's `final_conv`)."""
    grouping = TimmGrouping.of(model)
    ends = sorted({i for i in map(grouping.unit_of, grouping.taps) if i is not None})
    if len(ends) < len(LAYERS):
        stages = [grouping.units[i] for i in ends]
        raise ModelError(
            f"{type(model).__name__} has {len(ends)} stages in timm's feature_info ({', '.join(stages)}); "
            f"finetune names {len(LAYERS)} ({', '.join(LAYERS)}): give its family explicit stage patterns"
        )
    starts = [0, *(end + 1 for end in ends[:-1])]
    groups = [grouping.units[start : end + 1] for start, end in zip(starts, ends, strict=True)]
    groups[-1] += grouping.units[ends[-1] + 1 :]
    first_stage_tap = next(t for t in grouping.taps if grouping.unit_of(t) is not None)
    stem_taps = grouping.taps[: grouping.taps.index(first_stage_tap)]
    return _patterns(grouping, stem_taps, _fold(groups), layer4_extra)


def even_block_patterns(model: nn.Module, *, layer4_extra: Sequence[str] = ()) -> dict[Stage, str]:
    """stem and layer1..layer4 of a plain transformer: its blocks in four equal groups, the remainder early."""
    grouping = TimmGrouping.of(model)
    count = len(grouping.units)
    if count < len(LAYERS):
        raise ModelError(
            f"{type(model).__name__} has {count} blocks; finetune needs at least {len(LAYERS)} to name layer1..layer4"
        )
    sizes = [count // len(LAYERS) + (1 if i < count % len(LAYERS) else 0) for i in range(len(LAYERS))]
    groups = [grouping.units[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(LAYERS))]
    return _patterns(grouping, [], groups, layer4_extra)


def fixed_stage_patterns(patterns: Mapping[Stage, str]) -> StagePatterns:
    """Stage patterns spelled out, for a family timm does not describe."""
    return lambda model: dict(patterns)
