"""The base of every recipe section: unknown keys are errors, assignments are validated too, floats are finite and
true/false is no number."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes true/false anywhere (bool, a union or literal with it, Any)."""
    if annotation is bool or annotation is Any or annotation is True or annotation is False:
        return True
    return any(_admits_bool(arg) for arg in typing.get_args(annotation))


def _holds_section(annotation: Any) -> bool:
    """Whether a field's type is (or may be) a recipe section, which checks its own fields."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_section(arg) for arg in typing.get_args(annotation))


def _holds_bool(value: Any) -> bool:
    """true/false as the value, an item of a list, or a value of a mapping (not inside a section's own fields)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, bool) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, bool) for v in value.values())
    return False


class Strict(BaseModel):
    # allow_inf_nan=False: inf and NaN are refused in every float field (std, warmup, class weights, ...)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1 in a number field; a recipe saying `epochs: true` means something else."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None or _holds_section(field.annotation) or _admits_bool(field.annotation):
            return value
        if _holds_bool(value):
            raise ValueError("true/false is not a number or name here; write the value itself")
        return value
