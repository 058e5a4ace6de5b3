"""Visual-token pruning for Transformers vision-language models (LLaVA-1.5 layout).

    import diffboost
    from diffboost.vlm import HiPrune
    diffboost.apply(model, HiPrune(keep=0.25))      # model: LlavaForConditionalGeneration
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
    diffboost.remove(model)

One module per method: :mod:`.hiprune`, :mod:`.hired`, :mod:`.visionzip`, :mod:`.downsample` (the
baseline) prune the vision features before the language model; :mod:`.fastv` prunes inside it.
"""

from .adapter import VlmAdapter
from .base import VisualTokenPlugin
from .downsample import Downsample
from .fastv import FastV
from .hired import HiRED
from .hiprune import HiPrune
from .visionzip import VisionZip

METHODS = (HiPrune, HiRED, VisionZip, FastV, Downsample)

__all__ = ["Downsample", "FastV", "HiPrune", "HiRED", "METHODS", "VisionZip", "VisualTokenPlugin", "VlmAdapter"]
