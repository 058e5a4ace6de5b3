"""Convert the image formats pipelines return into float tensors in [0, 1] (:mod:`diffboost.fidelity`)."""

from diffboost.fidelity import to_tensor01

__all__ = ["to_tensor01"]
