"""Dataset distillation: a few synthetic samples that teach like the full data."""

from ._distiller import DatasetDistiller

__all__ = ["DatasetDistiller"]
