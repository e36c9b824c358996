"""Helpers shared by the estimators: devices, dtypes, conversions, warnings, splits."""

from ._torch import (
    core_warnings_as_sklearn,
    resolve_device,
    resolve_dtype,
    to_numpy,
    to_tensor,
    torch_generator,
)
from ._validation import check_numeric_target, check_splits

__all__ = [
    "check_numeric_target",
    "check_splits",
    "core_warnings_as_sklearn",
    "resolve_device",
    "resolve_dtype",
    "to_numpy",
    "to_tensor",
    "torch_generator",
]
