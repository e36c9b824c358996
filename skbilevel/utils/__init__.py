"""Helpers shared by the estimators: devices, dtypes, conversions, warnings."""

from ._torch import (
    core_warnings_as_sklearn,
    resolve_device,
    resolve_dtype,
    to_numpy,
    to_tensor,
    torch_generator,
)

__all__ = [
    "core_warnings_as_sklearn",
    "resolve_device",
    "resolve_dtype",
    "to_numpy",
    "to_tensor",
    "torch_generator",
]
