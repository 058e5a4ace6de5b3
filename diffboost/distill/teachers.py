"""What the distillation trainer needs from a teacher pipeline, per architecture.

A :class:`Teacher` encodes prompts, draws the noise the pipeline starts from, runs the whole
teacher (all its steps, its guidance) from a given noise to the final latent, and calls a denoiser
of the teacher's class at a noise level. Flux-architecture pipelines (``FluxPipeline``: packed
latents, flow matching) are supported; other families are refused with the list of supported ones.
"""

from __future__ import annotations

from typing import Any

import torch


class UnsupportedTeacherError(ValueError):
    """The teacher pipeline's family has no distillation support (yet)."""


class Teacher:
    """Interface; see :class:`FluxTeacher`."""

    denoiser_attr = "transformer"

    def __init__(self, pipe: Any, call_kwargs: dict[str, Any]):
        self.pipe = pipe
        self.call_kwargs = dict(call_kwargs)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, prompts: list[str], noise: torch.Tensor, steps: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                 cond: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class FluxTeacher(Teacher):
    """``FluxPipeline`` and pipelines of its layout (packed 2x2 latents, ``true_cfg_scale``)."""

    def __init__(self, pipe: Any, call_kwargs: dict[str, Any]):
        super().__init__(pipe, call_kwargs)
        self.height = int(call_kwargs.get("height") or 64)
        self.width = int(call_kwargs.get("width") or 64)
        self.max_sequence_length = int(call_kwargs.get("max_sequence_length") or 512)
        scale = 2 * pipe.vae_scale_factor
        if self.height % scale or self.width % scale:
            raise ValueError(f"height and width must be multiples of {scale} for this pipeline, "
                             f"got {self.height}x{self.width}")
        self.h, self.w = self.height // scale, self.width // scale
        self.channels = pipe.transformer.config.in_channels
        if getattr(pipe.transformer.config, "guidance_embeds", False):
            raise UnsupportedTeacherError(
                "guidance-distilled Flux teachers (guidance_embeds=True, FLUX.1-dev) are not supported yet: "
                "distil a teacher that uses true CFG or none")

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, self.h * self.w, self.channels), generator=generator)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=self.denoiser.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}

    def sample(self, prompts: list[str], noise: torch.Tensor, steps: int) -> torch.Tensor:
        kwargs = {k: v for k, v in self.call_kwargs.items() if k not in ("num_inference_steps",)}
        out = self.pipe(prompts, latents=noise.to(self.denoiser.device, self.denoiser.dtype),
                        num_inference_steps=steps, output_type="latent", **kwargs)
        return out.images.float().cpu()

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                 cond: dict[str, torch.Tensor]) -> torch.Tensor:
        device, dtype = x.device, x.dtype
        img_ids = self.pipe._prepare_latent_image_ids(x.shape[0], self.h, self.w, device, dtype)
        txt = cond["prompt_embeds"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=device, dtype=dtype)
        return model(hidden_states=x, timestep=sigma.to(device, dtype), guidance=None,
                     pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
                     encoder_hidden_states=txt.to(device, dtype), txt_ids=txt_ids, img_ids=img_ids,
                     return_dict=False)[0]


def teacher_for(pipe: Any, call_kwargs: dict[str, Any]) -> Teacher:
    """The :class:`Teacher` of a pipeline, or :class:`UnsupportedTeacherError` naming what is supported."""
    from diffusers import FluxPipeline

    if isinstance(pipe, FluxPipeline):
        return FluxTeacher(pipe, call_kwargs)
    raise UnsupportedTeacherError(
        f"diffboost distill supports Flux-architecture teachers (FluxPipeline), not {type(pipe).__name__}")

