"""Events an accelerated pipeline's runtime sends during a call, in this order:

- :class:`CallStarted` (call number, step count) when the pipeline call starts;
- per solver step, :class:`StepStarted` at its first denoiser call, one :class:`SkipDecided` per
  plugin decision (which plugin, CFG pass, step, computed in full or not), :class:`StepEnded`;
- :class:`StageSwitched` when a multi-resolution sampler changes the latents' size.

Plugins talk to each other through these; a user can listen too::

    handle = diffboost.apply(pipe, "fast")
    handle.subscribe(diffboost.events.SkipDecided, lambda e: print(e.plugin, e.step, e.computed))
"""

from .plugins.runtime import EVENTS, CallStarted, SkipDecided, StageSwitched, StepEnded, StepStarted

__all__ = ["EVENTS", "CallStarted", "SkipDecided", "StageSwitched", "StepEnded", "StepStarted"]
