"""Learn training-sample weights from a small trusted set.

:class:`SampleReweighter` (classification) and
:class:`SampleReweighterRegressor` learn one weight per training sample, or a
Meta-Weight-Net mapping a sample's loss to its weight, so that a model
trained with the weights does well on trusted data (Ren et al. 2018; Shu et
al. 2019).
"""

from ._reweighter import SampleReweighter, SampleReweighterRegressor

__all__ = ["SampleReweighter", "SampleReweighterRegressor"]
