"""Tiny, random-init Diffusers pipelines for tests.

This module is the single place where the test-suite builds pipelines.  Every
factory returns a *fresh* pipeline (eval mode, float32, CPU, progress bar off)
whose weights depend only on ``seed``: ``torch.manual_seed`` is called before
each component is constructed.  Nothing is downloaded: text encoders are tiny
``transformers`` models built from configs and the tokenizers are word-level
``tokenizers.Tokenizer`` objects wrapped in ``PreTrainedTokenizerFast``.

Families (see ``FAMILIES``):

=============== ============================ =====================================
name            pipeline                     denoiser
=============== ============================ =====================================
flux            FluxPipeline                 FluxTransformer2DModel (2 dual + 2 single)
sd3             StableDiffusion3Pipeline     SD3Transformer2DModel (2 joint blocks)
pixart_sigma    PixArtSigmaPipeline          PixArtTransformer2DModel (2 blocks)
sana            SanaPipeline                 SanaTransformer2DModel (2 blocks), tiny Gemma2
wan             WanPipeline                  WanTransformer3DModel (2 blocks), tiny UMT5
cogvideox       CogVideoXPipeline            CogVideoXTransformer3DModel (2 blocks)
hunyuan_video   HunyuanVideoPipeline         HunyuanVideoTransformer3DModel (2 dual + 2 single)
sd              StableDiffusionPipeline      UNet2DConditionModel (2 down / 2 up blocks)
sdxl            StableDiffusionXLPipeline    UNet2DConditionModel, text_time embedding
chroma          ChromaPipeline               ChromaTransformer2DModel (2 dual + 2 single on the joined stream)
auraflow        AuraFlowPipeline             AuraFlowTransformer2DModel (2 joint + 2 single), tiny UMT5
bria            BriaPipeline                 BriaTransformer2DModel (2 dual + 2 single)
cogview3plus    CogView3PlusPipeline         CogView3PlusTransformer2DModel (2 blocks)
cogview4        CogView4Pipeline             CogView4Transformer2DModel (2 blocks), tiny GlmModel
lumina2         Lumina2Pipeline              Lumina2Transformer2DModel (2 layers + 2 refiners), tiny Gemma2
z_image         ZImagePipeline               ZImageTransformer2DModel (2 layers + 2 refiners), tiny Qwen3
qwen_image      QwenImagePipeline            QwenImageTransformer2DModel (2 blocks), tiny Qwen2.5-VL
ltx_video       LTXPipeline                  LTXVideoTransformer3DModel (2 blocks)
mochi           MochiPipeline                MochiTransformer3DModel (2 blocks)
allegro         AllegroPipeline              AllegroTransformer3DModel (2 blocks)
skyreels_v2     SkyReelsV2Pipeline           SkyReelsV2Transformer3DModel (2 blocks), tiny UMT5
flux2           Flux2KleinPipeline           Flux2Transformer2DModel (2 dual + 2 single), tiny Qwen3
hunyuan_image   HunyuanImagePipeline         HunyuanImageTransformer2DModel (2 dual + 2 single), Qwen2.5-VL + ByT5
=============== ============================ =====================================

T5-family text encoders unless said otherwise. The text length of every default call differs from
its image token count, so that a swapped (text, image) block output fails loudly.

``default_call_kwargs(family)`` gives the smallest call that exercises the
denoising loop with classifier-free guidance switched on wherever the pipeline
has it (Flux and HunyuanVideo only have an embedded guidance scale by default;
pass ``true_cfg_scale=2.0, negative_prompt="..."`` to turn on their two-pass
true CFG).  ``run(pipe, family, seed)`` adds a seeded CPU generator and returns
the output as a tensor.

Shape notes for the default calls (batch 1):

* flux: packed latents ``(1, 16, 16)``: 4x4 tokens of 4 ch x 2x2 patch; 8
  text tokens.
* sd3 / pixart_sigma / sd / sdxl: latents ``(1, 4, 8, 8)`` (64x64 px, VAE /8).
* sana: latents ``(1, 4, 8, 8)`` (64x64 px, DC-AE /8).
* wan: latents ``(1, 4, 2, 8, 8)`` (5 frames, 64x64 px).
* cogvideox: latents ``(1, 3, 4, 8, 8)`` (9 frames; CogVideoX returns
  ``(B, F, C, H, W)``).  9 frames -> 3 latent frames (odd, like the real
  49 -> 13); CogVideoX's VAE decodes latents in pairs after an odd first
  chunk, so an even latent count (e.g. 5 frames -> 2) decodes to 8 frames.
* hunyuan_video: latents ``(1, 4, 2, 8, 8)`` (5 frames, 64x64 px).

Wan 2.2-style two-expert pipelines (``transformer`` + ``transformer_2``) are
available with ``make_wan(two_experts=True)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

__all__ = [
    "FAMILIES",
    "VIDEO_FAMILIES",
    "default_call_kwargs",
    "run",
    "make_flux",
    "make_sd3",
    "make_pixart_sigma",
    "make_sana",
    "make_wan",
    "make_cogvideox",
    "make_hunyuan_video",
    "make_sd",
    "make_sdxl",
    "make_chroma",
    "make_auraflow",
    "make_bria",
    "make_cogview3plus",
    "make_cogview4",
    "make_lumina2",
    "make_z_image",
    "make_qwen_image",
    "make_ltx_video",
    "make_mochi",
    "make_allegro",
    "make_skyreels_v2",
    "make_flux2",
    "make_hunyuan_image",
    "make_tokenizer",
]

# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]
_WORDS = (
    "a an the of and in on with at by to from is are this that it "
    "red green blue yellow black white orange purple pink gray "
    "circle square triangle star line dot shape box ball "
    "cat dog bird fish horse car tree house flower mountain river sea sky sun moon "
    "photo painting picture drawing video image scene view portrait landscape "
    "big small tiny large bright dark "
    "running walking flying sitting standing "
    "high quality detailed blurry low ugly bad , . : ! ?"
).split()
# Text encoders use a slightly larger vocabulary than the tokenizer so that any
# id it emits is valid.
VOCAB_SIZE = 128


@functools.lru_cache(maxsize=None)
def make_tokenizer(model_max_length: int = 77):
    """A word-level fast tokenizer: lower-cases, splits on whitespace and
    punctuation, maps unknown words to ``<unk>`` and appends ``</s>``.

    ids: ``<pad>``=0, ``</s>``=1, ``<s>``=2, ``<unk>``=3.  Cached per
    ``model_max_length``; callers must not mutate it except for attributes the
    pipelines themselves set (Sana sets ``padding_side = "right"``).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= VOCAB_SIZE

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>",
        pair="$A </s> $B </s>",
        special_tokens=[("</s>", EOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


# ---------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------


def _clip_config(hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _clip_text(seed: int, hidden: int = 32):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_clip_config(hidden))


def _clip_text_proj(seed: int, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_config(hidden, projection_dim))


def _t5(seed: int, d_model: int = 32, umt5: bool = False):
    if umt5:
        from transformers import UMT5Config as Cfg
        from transformers import UMT5EncoderModel as Model
    else:
        from transformers import T5Config as Cfg
        from transformers import T5EncoderModel as Model
    cfg = Cfg(
        vocab_size=VOCAB_SIZE,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    return Model(cfg)


def _finish(pipe):
    # Components are built on CPU in float32 (torch's default dtype); calling
    # ``pipe.to(dtype=...)`` would only add a diffusers warning.
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.eval()
            p = next(component.parameters(), None)
            assert p is None or (p.dtype == torch.float32 and p.device.type == "cpu"), name
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------
# Image families
# ---------------------------------------------------------------------------


def _vae_kl(seed: int, latent_channels: int = 4, **extra):
    """AutoencoderKL with 4 resolution levels (scale factor 8), 8 channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **extra,
    )


def make_flux(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: FluxTransformer2DModel (2 double-stream + 2 single-stream
    blocks, 2 heads x 16), CLIPTextModel + T5EncoderModel, AutoencoderKL /8."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    text_encoder = _clip_text(seed)
    text_encoder_2 = _t5(seed)
    vae = _vae_kl(seed, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    # Same scheduler settings as FLUX.1 checkpoints: resolution-dependent shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(16),
        transformer=transformer,
    )
    return _finish(pipe)


def make_flux_wide(
    seed: int = 0, double: int = 2, single: int = 4, heads: int = 4, head_dim: int = 32
) -> Any:
    """``make_flux`` with a wider transformer, for benchmarks at larger token counts (tiny text
    encoders and VAE kept)."""
    from diffusers import FluxTransformer2DModel

    pipe = make_flux(seed)
    torch.manual_seed(seed)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=pipe.transformer.config.in_channels,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=pipe.transformer.config.joint_attention_dim,
        pooled_projection_dim=pipe.transformer.config.pooled_projection_dim,
        guidance_embeds=pipe.transformer.config.guidance_embeds,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    ).eval()
    return pipe


def make_sd3(seed: int = 0):
    """StableDiffusion3Pipeline: SD3Transformer2DModel (2 joint blocks, the
    last with ``context_pre_only=True``), 2x CLIPTextModelWithProjection + T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model (CLIP embeds are zero-padded to it)
        caption_projection_dim=32,
        pooled_projection_dim=32,  # 16 + 16 CLIP projections
        pos_embed_max_size=16,
    )
    text_encoder = _clip_text_proj(seed, hidden=16, projection_dim=16)
    text_encoder_2 = _clip_text_proj(seed + 1, hidden=16, projection_dim=16)
    text_encoder_3 = _t5(seed)
    vae = _vae_kl(seed, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(77),
        text_encoder_3=text_encoder_3,
        tokenizer_3=make_tokenizer(16),
    )
    return _finish(pipe)


def make_pixart_sigma(seed: int = 0):
    """PixArtSigmaPipeline: PixArtTransformer2DModel (2 BasicTransformerBlocks,
    ada_norm_single, learned sigma), T5EncoderModel, DPMSolverMultistep."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma: the pipeline keeps the first half
        num_layers=2,
        norm_num_groups=4,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=32,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    text_encoder = _t5(seed)
    vae = _vae_kl(seed)
    pipe = PixArtSigmaPipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _finish(pipe)


def make_sana(seed: int = 0):
    """SanaPipeline: SanaTransformer2DModel (2 blocks, linear attention),
    tiny Gemma2Model text encoder, AutoencoderDC /8, flow-matching DPM-Solver."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        mlp_ratio=2.0,
        sample_size=8,
        patch_size=1,
    )
    cfg = Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=32,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(cfg)
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=("ResBlock",) * 4,
        decoder_block_types=("ResBlock",) * 4,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), ()),
        decoder_qkv_multiscales=((), (), (), ()),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=1.0,
    )
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = SanaPipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


def make_sd(seed: int = 0):
    """StableDiffusionPipeline: UNet2DConditionModel (DownBlock2D +
    CrossAttnDownBlock2D / CrossAttnUpBlock2D + UpBlock2D), tiny CLIP, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    text_encoder = _clip_text(seed)
    vae = _vae_kl(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(77),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def make_sdxl(seed: int = 0):
    """StableDiffusionXLPipeline: UNet2DConditionModel with
    ``addition_embed_type="text_time"``, CLIPTextModel + CLIPTextModelWithProjection."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,  # 16 (text_encoder) + 16 (text_encoder_2)
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text + 6 time ids
    )
    text_encoder = _clip_text(seed, hidden=16)
    text_encoder_2 = _clip_text_proj(seed + 1, hidden=16, projection_dim=16)
    vae = _vae_kl(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_tokenizer(77),
        tokenizer_2=make_tokenizer(77),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipe)


# ---------------------------------------------------------------------------
# Video families
# ---------------------------------------------------------------------------


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def make_wan(seed: int = 0, two_experts: bool = False):
    """WanPipeline: WanTransformer3DModel (2 blocks), UMT5EncoderModel,
    AutoencoderKLWan (/8 spatial, /4 temporal).  With ``two_experts=True`` a
    second transformer is registered as ``transformer_2`` and used for the
    low-noise steps (``boundary_ratio=0.5``), like Wan 2.2 A14B."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = _wan_transformer(seed)
    transformer_2 = _wan_transformer(seed + 1) if two_experts else None
    text_encoder = _t5(seed, umt5=True)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = WanPipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.5 if two_experts else None,
    )
    return _finish(pipe)


def _cogvideox_ddim():
    """The DDIM scheduler CogVideoX and CogView3-Plus ship: v-prediction, zero terminal SNR."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )


def make_cogvideox(seed: int = 0):
    """CogVideoXPipeline: CogVideoXTransformer3DModel (2 blocks, sincos
    positions, CogVideoX-2B style), T5EncoderModel, AutoencoderKLCogVideoX."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    text_encoder = _t5(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = _cogvideox_ddim()
    pipe = CogVideoXPipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


def make_hunyuan_video(seed: int = 0):
    """HunyuanVideoPipeline: HunyuanVideoTransformer3DModel (1 token-refiner
    block, 2 dual-stream + 2 single-stream blocks, embedded guidance), tiny
    LlamaModel + CLIPTextModel, AutoencoderKLHunyuanVideo."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    text_encoder = LlamaModel(cfg)
    text_encoder_2 = _clip_text(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(64),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(77),
    )
    return _finish(pipe)


# ---------------------------------------------------------------------------
# More image families: dual/single-stream DiTs with T5 text encoders
# ---------------------------------------------------------------------------


def make_chroma(seed: int = 0):
    """ChromaPipeline: ChromaTransformer2DModel (2 double-stream + 2 single-stream blocks, 2 heads x
    16, tiny distilled-guidance approximator), T5EncoderModel, AutoencoderKL /8 (4 latent channels,
    packed 2x2), FlowMatchEulerDiscreteScheduler with resolution-dependent shift."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=2,
    )
    text_encoder = _t5(seed)
    vae = _vae_kl(seed, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = ChromaPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(16),
        transformer=transformer,
    )
    return _finish(pipe)


def make_auraflow(seed: int = 0):
    """AuraFlowPipeline: AuraFlowTransformer2DModel (2 joint MMDiT blocks + 2 single DiT blocks on
    cat([text, image]), 2 heads x 16, 8 register tokens), UMT5EncoderModel, AutoencoderKL /8,
    FlowMatchEulerDiscreteScheduler (shift 1.73)."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # UMT5 d_model
        caption_projection_dim=32,  # must equal the inner dim (register tokens are concatenated)
        pos_embed_max_size=64,  # an 8x8 grid of learned positions
    )
    text_encoder = _t5(seed, umt5=True)
    vae = _vae_kl(seed)
    pipe = AuraFlowPipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )
    return _finish(pipe)


def make_bria(seed: int = 0):
    """BriaPipeline: BriaTransformer2DModel (2 double-stream + 2 single-stream blocks, 2 heads x 16,
    no guidance embedding), T5EncoderModel (prompt embeddings zero-padded), AutoencoderKL /8 (4
    latent channels, packed 2x2; the pipeline's ``vae_scale_factor`` is 16 = VAE /8 x packing),
    FlowMatchEulerDiscreteScheduler."""
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = BriaTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        axes_dims_rope=[4, 6, 6],
    )
    text_encoder = _t5(seed)
    vae = _vae_kl(seed, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    pipe = BriaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(16),
    )
    return _finish(pipe)


def make_cogview3plus(seed: int = 0):
    """CogView3PlusPipeline: CogView3PlusTransformer2DModel (2 blocks with joint text+image
    attention, 2 heads x 16, SDXL-style size conditioning), T5EncoderModel, AutoencoderKL /8,
    CogVideoXDDIMScheduler (v-prediction, zero-SNR, trailing)."""
    from diffusers import CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=32,  # T5 d_model
        time_embed_dim=32,
        condition_dim=8,
        pos_embed_max_size=16,
        sample_size=8,
    )
    text_encoder = _t5(seed)
    vae = _vae_kl(seed)
    scheduler = _cogvideox_ddim()
    pipe = CogView3PlusPipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


# ---------------------------------------------------------------------------
# More image families: LLM text encoders (GLM, Gemma2, Qwen3, Qwen2.5-VL)
# ---------------------------------------------------------------------------


def make_cogview4(seed: int = 0):
    """CogView4Pipeline: CogView4Transformer2DModel (2 blocks, 2 heads x 16, patch 1), tiny
    GlmModel text encoder (the pipeline reads ``hidden_states[-2]``), AutoencoderKL /8,
    FlowMatchEulerDiscreteScheduler with CogView4's linear dynamic shift."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=1,  # 64 image tokens, distinct from the 16 (padded) text tokens
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        text_embed_dim=32,  # GLM hidden size
        time_embed_dim=32,
        condition_dim=16,
        sample_size=8,
        rope_axes_dim=(16, 16),
    )
    cfg = GlmConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    torch.manual_seed(seed)
    text_encoder = GlmModel(cfg)
    vae = _vae_kl(seed, latent_channels=4, scaling_factor=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.25,
        max_shift=0.75,
        time_shift_type="linear",
        use_dynamic_shifting=True,
    )
    pipe = CogView4Pipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


def _gemma2(seed: int):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=32,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    torch.manual_seed(seed)
    return Gemma2Model(cfg)


def make_lumina2(seed: int = 0):
    """Lumina2Pipeline: Lumina2Transformer2DModel (2 main ``layers`` + 1 ``noise_refiner`` +
    1 ``context_refiner`` block, 2 heads x 16, 1 kv head, patch 2), tiny Gemma2Model (as in
    ``make_sana``), AutoencoderKL /8 (Flux-style: no quant convs, shift 0, scale 1),
    FlowMatchEulerDiscreteScheduler(shift=6)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),  # sums to the head dim (16)
        axes_lens=(64, 32, 32),
        cap_feat_dim=32,  # Gemma2 hidden size
    )
    text_encoder = _gemma2(seed)
    vae = _vae_kl(seed, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(16),
    )
    return _finish(pipe)


# ZImagePipeline renders the prompt with ``tokenizer.apply_chat_template(messages,
# add_generation_prompt=True, enable_thinking=True)``: the smallest template that works with the
# word-level tokenizer passes the user message through unchanged.
_PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def _chat_tokenizer(model_max_length: int):
    """A fresh (uncached) ``make_tokenizer`` with a pass-through ``chat_template``, so that the
    shared cached tokenizer is not mutated."""
    tok = make_tokenizer.__wrapped__(model_max_length)
    tok.chat_template = _PLAIN_CHAT_TEMPLATE
    return tok


def make_z_image(seed: int = 0):
    """ZImagePipeline: ZImageTransformer2DModel (2 main ``layers`` + 1 ``noise_refiner`` +
    1 ``context_refiner`` block, dim 32, 2 heads x 16, patch 2), tiny Qwen3Model (the pipeline
    reads ``hidden_states[-2]``; tokenizer with a pass-through chat template), AutoencoderKL /8
    (Flux-style), FlowMatchEulerDiscreteScheduler(shift=3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=32,  # Qwen3 hidden size
        axes_dims=[4, 6, 6],  # sums to the head dim (16)
        axes_lens=[256, 64, 64],
    )
    cfg = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(cfg)
    vae = _vae_kl(seed, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_chat_tokenizer(16),
        transformer=transformer,
    )
    return _finish(pipe)


# Flux2KleinPipeline stacks the text encoder's hidden states 9, 18 and 27 (its default
# text_encoder_out_layers): the tiny Qwen3 needs 27 layers for them to exist (hidden size 32).
_KLEIN_TEXT_LAYERS = 27


def make_flux2(seed: int = 0):
    """Flux2KleinPipeline: Flux2Transformer2DModel (2 double-stream + 2 single-stream blocks,
    2 heads x 16, in 16 = 4 latent ch x 2x2 patch, rope axes (4, 4, 4, 4) over (T, H, W, L), no
    guidance embedding: Klein passes ``guidance=None``), tiny Qwen3ForCausalLM (hidden 32, 27 layers
    so that hidden_states 9/18/27 exist; joint_attention_dim = 3 x 32), AutoencoderKLFlux2 /8 with
    4 latent channels (batch-norm over the 16 patchified channels), FlowMatchEulerDiscreteScheduler
    (Klein passes ``mu``, so dynamic shifting is on).  ``is_distilled=False``: guidance_scale > 1
    runs true CFG (two transformer calls per step, cache_context "cond" / "uncond")."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 32,  # 3 stacked Qwen3 hidden states of size 32
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # sums to the head dim (16)
        guidance_embeds=False,
    )
    cfg = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=_KLEIN_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(cfg)
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_chat_tokenizer(16),
        transformer=transformer,
        is_distilled=False,
    )
    return _finish(pipe)


# Defaults entry for ``factories._DEFAULTS``:
# true CFG: two transformer calls per step (cache_context "cond" / "uncond", batch 1 each), the
# negative prompt is always ""; 8 text tokens vs 16 image tokens (64 px -> 8x8 latents -> 4x4 patches).


def _qwen25_vl(seed: int):
    """A tiny Qwen2.5-VL text encoder (2 text layers, hidden 32, mrope (2, 3, 3); one vision layer
    that never runs), as Qwen-Image and HunyuanImage use it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            fullatt_block_indexes=[0],
        ),
        # ids the word-level tokenizer never emits (its vocabulary ends well below 124)
        vision_start_token_id=124,
        vision_end_token_id=125,
        image_token_id=126,
        video_token_id=127,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def make_hunyuan_image(seed: int = 0):
    """HunyuanImagePipeline: HunyuanImageTransformer2DModel (2 dual-stream + 2 single-stream blocks,
    1 token-refiner layer, 2 heads x 16, patch 1x1, ByT5 projection 32 -> 32), tiny
    Qwen2_5_VLForConditionalGeneration (2 text layers, 1 vision layer the pipeline never runs; the
    pipeline reads ``hidden_states[-3]``), tiny T5EncoderModel with the ByT5 tokenizer's vocabulary
    (384), AutoencoderKLHunyuanImage (/8 spatial, 4 latent ch), FlowMatchEulerDiscreteScheduler.
    ``guider`` is an AdaptiveProjectedMixGuidance (scale 3.5: CFG on), ``ocr_guider`` None: the pipeline then uses a disabled
    AdaptiveProjectedMixGuidance, i.e. one conditional denoiser call per step (no CFG).

    Instance attributes set after construction (the pipeline's defaults are for the real
    tokenizers): ``prompt_template_encode_start_idx`` = the template prefix's length under the
    word-level tokenizer; ``tokenizer_max_length`` = 16 (Qwen tokens kept after the prefix, padded
    to that length; real: 1000) and ``tokenizer_2_max_length`` = 8 (ByT5 tokens, real: 128), so a
    default call has 16 + 8 = 24 text tokens against 8x8 = 64 image tokens."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance
    from diffusers import (
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer_2 = ByT5Tokenizer()  # byte-level, needs no files: 3 specials + 256 bytes + 125 extra ids

    torch.manual_seed(seed)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=(1, 1),
        guidance_embeds=False,
        text_embed_dim=32,  # Qwen2.5-VL text hidden size
        text_embed_2_dim=32,  # T5 d_model
        rope_axes_dim=(8, 8),  # sums to the head dim (16)
    )
    text_encoder = _qwen25_vl(seed)
    t5_cfg = T5Config(
        vocab_size=len(tokenizer_2),  # 384 > VOCAB_SIZE, so factories._t5 does not fit
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(t5_cfg)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 32, 32),  # GroupNorm(32) needs multiples of 32
        layers_per_block=1,
        spatial_compression_ratio=8,
        sample_size=64,
        scaling_factor=1.0,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    tokenizer = make_tokenizer(128)  # the templated prompt is ~40 words
    pipe = HunyuanImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        # CFG on: two passes per step, named by the pipeline (pred_cond / pred_uncond)
        guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5),
        ocr_guider=None,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix, add_special_tokens=False).input_ids)
    pipe.tokenizer_max_length = 16
    pipe.tokenizer_2_max_length = 8
    return _finish(pipe)


def make_qwen_image(seed: int = 0):
    """QwenImagePipeline: QwenImageTransformer2DModel (2 dual-stream blocks, 2 heads x 16,
    in 16 = 4 latent ch x 2x2 packing), tiny Qwen2_5_VLForConditionalGeneration (2 text layers,
    1 vision layer that the pipeline never runs), AutoencoderKLQwenImage (/8 spatial),
    FlowMatchEulerDiscreteScheduler with Qwen-Image's exponential dynamic shift.

    The pipeline formats the prompt into its chat template and drops the template's first
    ``prompt_template_encode_start_idx`` tokens (34 for the real tokenizer); the factory sets that
    instance attribute to the prefix's length under the word-level tokenizer."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x 2x2 packing
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # Qwen2.5-VL text hidden size
        axes_dims_rope=(4, 6, 6),  # sums to the head dim (16)
    )
    text_encoder = _qwen25_vl(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=math.log(3),
        max_image_seq_len=8192,
        max_shift=math.log(3),
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    tokenizer = make_tokenizer(128)  # the templated prompt is ~47 words
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix, add_special_tokens=False).input_ids)
    return _finish(pipe)


# ---------------------------------------------------------------------------
# More video families
# ---------------------------------------------------------------------------


def make_ltx_video(seed: int = 0):
    """LTXPipeline: LTXVideoTransformer3DModel (2 blocks, 2 heads x 16, patch 1), T5EncoderModel,
    AutoencoderKLLTXVideo (3 levels, 1 layer each, patch 1: /8 spatial, /8 temporal),
    FlowMatchEulerDiscreteScheduler with LTX's resolution-dependent shift."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,  # the caption projection maps text to the inner dim
        num_layers=2,
        caption_channels=32,  # T5 d_model
    )
    text_encoder = _t5(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8),
        down_block_types=("LTXVideoDownBlock3D",) * 3,
        decoder_block_out_channels=(8, 8, 8),
        layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("conv", "conv", "conv"),
        upsample_residual=(False, False, False),
        upsample_factor=(1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    # LTX-Video checkpoints: dynamic shift between (1024, 0.95) and (4096, 2.05) tokens, terminal 0.1.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    pipe = LTXPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(16),
        transformer=transformer,
    )
    return _finish(pipe)


def make_mochi(seed: int = 0):
    """MochiPipeline: MochiTransformer3DModel (2 blocks, 2 heads x 16, 16-dim text stream, the last
    block ``context_pre_only``), T5EncoderModel, AutoencoderKLMochi (32 channels -- its group norms
    have 32 groups -- 1 layer per block, no attention; /8 spatial, /6 temporal, 12 latent channels),
    FlowMatchEulerDiscreteScheduler with inverted sigmas."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=16,  # width of the text stream (distinct from the 32-dim image stream)
        in_channels=12,
        text_embed_dim=32,  # T5 d_model (its attention pool has 8 heads)
        time_embed_dim=32,
        max_sequence_length=16,
    )
    text_encoder = _t5(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(
        in_channels=15,  # 3 RGB channels + Fourier features
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        latent_channels=12,  # MochiPipeline reshapes latents_mean/std to 12 channels
        layers_per_block=(1, 1, 1, 1, 1),
        temporal_expansions=(1, 2, 3),
        spatial_expansions=(2, 2, 2),
        add_attention_block=(False, False, False, False, False),
        latents_mean=(0.0,) * 12,
        latents_std=(1.0,) * 12,
        scaling_factor=1.0,
    )
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(16),
        transformer=transformer,
    )
    return _finish(pipe)


def make_allegro(seed: int = 0):
    """AllegroPipeline: AllegroTransformer3DModel (2 blocks, 2 heads x 12 -- the 3D RoPE splits the
    head dim in three even parts), T5EncoderModel, AutoencoderKLAllegro (8 channels, 1 layer per
    block, /8 spatial, /4 temporal; tiling on, since it cannot decode without), and
    EulerAncestralDiscreteScheduler like the Allegro release."""
    from diffusers import (
        AllegroPipeline,
        AllegroTransformer3DModel,
        AutoencoderKLAllegro,
        EulerAncestralDiscreteScheduler,
    )

    torch.manual_seed(seed)
    transformer = AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,  # the caption projection maps text to the inner dim
        sample_height=8,
        sample_width=8,
        sample_frames=2,
        caption_channels=32,  # T5 d_model
    )
    text_encoder = _t5(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLAllegro(
        in_channels=3,
        out_channels=3,
        down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        temporal_downsample_blocks=(True, True, False, False),
        temporal_upsample_blocks=(False, True, True, False),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_size=64,
    )
    vae.enable_tiling()  # AutoencoderKLAllegro.decode raises NotImplementedError without tiling
    pipe = AllegroPipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=EulerAncestralDiscreteScheduler(),
    )
    return _finish(pipe)


def _ftfy_fallback() -> None:
    """SkyReelsV2Pipeline cleans prompts with ``ftfy.fix_text`` without checking that ftfy is
    installed (WanPipeline checks and skips it); without ftfy every text prompt raises NameError.
    Give the pipeline module the identity that WanPipeline uses when ftfy is missing."""
    import types

    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2 as module

    if not hasattr(module, "ftfy"):
        module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


def make_skyreels_v2(seed: int = 0):
    """SkyReelsV2Pipeline: SkyReelsV2Transformer3DModel (2 blocks, 2 heads x 12, Wan-sized),
    UMT5EncoderModel, AutoencoderKLWan (/8 spatial, /4 temporal), flow-matching UniPC
    (flow_shift=8.0, the T2V setting).  Installs the ``ftfy`` fallback (see ``_ftfy_fallback``)."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    text_encoder = _t5(seed, umt5=True)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    _ftfy_fallback()
    pipe = SkyReelsV2Pipeline(
        tokenizer=make_tokenizer(16),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    )
    return _finish(pipe)


# ---------------------------------------------------------------------------
# Registry and call helpers
# ---------------------------------------------------------------------------

FAMILIES: dict[str, Callable[..., Any]] = {
    "flux": make_flux,
    "sd3": make_sd3,
    "pixart_sigma": make_pixart_sigma,
    "sana": make_sana,
    "wan": make_wan,
    "cogvideox": make_cogvideox,
    "hunyuan_video": make_hunyuan_video,
    "sd": make_sd,
    "sdxl": make_sdxl,
    "chroma": make_chroma,
    "auraflow": make_auraflow,
    "bria": make_bria,
    "cogview3plus": make_cogview3plus,
    "cogview4": make_cogview4,
    "lumina2": make_lumina2,
    "z_image": make_z_image,
    "qwen_image": make_qwen_image,
    "ltx_video": make_ltx_video,
    "mochi": make_mochi,
    "allegro": make_allegro,
    "skyreels_v2": make_skyreels_v2,
    "flux2": make_flux2,
    "hunyuan_image": make_hunyuan_image,
}

VIDEO_FAMILIES = frozenset({"wan", "cogvideox", "hunyuan_video", "ltx_video", "mochi", "allegro", "skyreels_v2"})

# Hunyuan's default prompt template is a long Llama-3 chat prompt cropped at a
# fixed token offset (95) that only makes sense for the real tokenizer.
_HUNYUAN_TEMPLATE = {"template": "{}", "crop_start": 0}

_DEFAULTS: dict[str, dict[str, Any]] = {
    # guidance_scale feeds the guidance embedding (no second pass).
    # max_sequence_length=8 keeps the text length (8) distinct from the image
    # token count (16) so that swapped (encoder, hidden) outputs fail loudly.
    "flux": dict(height=64, width=64, guidance_scale=3.5, max_sequence_length=8),
    "sd3": dict(height=64, width=64, guidance_scale=5.0, max_sequence_length=16),
    "pixart_sigma": dict(
        height=64, width=64, guidance_scale=4.5, max_sequence_length=16,
        clean_caption=False, use_resolution_binning=False,
    ),
    "sana": dict(
        height=64, width=64, guidance_scale=4.5, max_sequence_length=16,
        clean_caption=False, use_resolution_binning=False, complex_human_instruction=None,
    ),
    "wan": dict(height=64, width=64, num_frames=5, guidance_scale=5.0, max_sequence_length=16),
    "cogvideox": dict(
        height=64, width=64, num_frames=9, guidance_scale=6.0, max_sequence_length=16,
        use_dynamic_cfg=False,
    ),
    # guidance_scale feeds the guidance embedding (no second pass).
    "hunyuan_video": dict(
        height=64, width=64, num_frames=5, guidance_scale=6.0, max_sequence_length=16,
        prompt_template=_HUNYUAN_TEMPLATE,
    ),
    "sd": dict(height=64, width=64, guidance_scale=7.5),
    "sdxl": dict(height=64, width=64, guidance_scale=5.0),
    # two transformer calls per step, no cache_context: prompt, then negative prompt ("" by default)
    "chroma": dict(height=64, width=64, guidance_scale=5.0, max_sequence_length=8),
    # doubled batch; 8 register + 16 text tokens vs 16 image tokens
    "auraflow": dict(height=64, width=64, guidance_scale=3.5, max_sequence_length=16),
    # doubled batch; the negative embedding is zeros when no negative prompt is given
    "bria": dict(height=64, width=64, guidance_scale=5.0, max_sequence_length=8),
    "cogview3plus": dict(height=64, width=64, guidance_scale=7.0, max_sequence_length=8),
    # two calls per step (cache_context "cond" / "uncond"); text padded to 16, 64 image tokens (patch 1)
    "cogview4": dict(height=64, width=64, guidance_scale=5.0, max_sequence_length=16),
    # two calls per step, no cache_context; system_prompt="" keeps the prompt inside 16 tokens
    "lumina2": dict(height=64, width=64, guidance_scale=4.0, max_sequence_length=16, system_prompt=""),
    # one call per step on a doubled batch (lists of latents / captions)
    "z_image": dict(height=64, width=64, guidance_scale=5.0, max_sequence_length=16),
    # true CFG: two calls per step (cache_context "cond" / "uncond"), needs a negative prompt
    "qwen_image": dict(
        height=64, width=64, true_cfg_scale=4.0, negative_prompt="blurry low quality", max_sequence_length=16
    ),
    "ltx_video": dict(height=64, width=64, num_frames=9, guidance_scale=3.0, max_sequence_length=16),
    "mochi": dict(height=64, width=64, num_frames=7, guidance_scale=4.5, max_sequence_length=16),
    "allegro": dict(
        height=64, width=64, num_frames=8, guidance_scale=7.5, max_sequence_length=16, clean_caption=False
    ),
    "skyreels_v2": dict(height=64, width=64, num_frames=5, guidance_scale=6.0, max_sequence_length=16),
    # true CFG: two calls per step (cache_context "cond" / "uncond"); 8 text vs 16 image tokens
    "flux2": dict(height=64, width=64, guidance_scale=4.0, max_sequence_length=8),
    # CFG through the pipeline's guider (two passes, named pred_cond / pred_uncond); 24 text tokens
    # (16 Qwen + 8 ByT5, which runs on quoted text only) vs 64 image tokens
    # (a negative prompt string is not broadcast to a batch of prompts by the pipeline: none given;
    # the guider then runs its unconditional pass on the empty prompt)
    "hunyuan_image": dict(height=64, width=64),
}


def default_call_kwargs(family: str) -> dict[str, Any]:
    """Smallest pipeline call for ``family`` (without ``generator``): 4 steps,
    64x64 px, 5 frames for video (9 for CogVideoX), CFG on where the pipeline supports it,
    ``output_type="latent"``.  Returns a fresh dict each call."""
    if family not in _DEFAULTS:
        raise KeyError(f"unknown family {family!r}; known: {sorted(_DEFAULTS)}")
    kwargs: dict[str, Any] = dict(prompt="a red circle", num_inference_steps=4, output_type="latent")
    kwargs.update(_DEFAULTS[family])
    if "prompt_template" in kwargs:
        kwargs["prompt_template"] = dict(kwargs["prompt_template"])
    return kwargs


def _to_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        if len(out) and all(isinstance(o, torch.Tensor) for o in out):
            return torch.stack(list(out))
        import numpy as np

        if len(out) and all(isinstance(o, np.ndarray) for o in out):
            return torch.from_numpy(np.stack(out))
        if len(out) and not isinstance(out[0], (str, bytes)):
            try:
                import PIL.Image

                if all(isinstance(o, PIL.Image.Image) for o in out):
                    return torch.from_numpy(np.stack([np.asarray(o) for o in out]))
            except ImportError:
                pass
    try:
        import numpy as np

        if isinstance(out, np.ndarray):
            return torch.from_numpy(out)
    except ImportError:
        pass
    raise TypeError(f"cannot convert pipeline output of type {type(out).__name__} to a tensor")


def run(pipe, family: str, seed: int = 0, **overrides) -> torch.Tensor:
    """Call ``pipe`` with ``default_call_kwargs(family)`` updated by
    ``overrides`` and a CPU generator seeded with ``seed``; return the images
    (or latents, or frames) as a tensor."""
    kwargs = default_call_kwargs(family)
    kwargs.update(overrides)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(**kwargs)
    for attr in ("images", "frames"):
        if hasattr(out, attr):
            return _to_tensor(getattr(out, attr))
    if isinstance(out, tuple):
        return _to_tensor(out[0])
    return _to_tensor(out)


#: generation settings of the tiny teacher written by :func:`save_flux_teacher`
TEACHER_SETTINGS = {"height": 32, "width": 32, "steps": 4, "true_cfg_scale": 2.0, "negative_prompt": "",
                    "max_sequence_length": 8}


def save_flux_teacher(folder: Any, seed: int = 0) -> Any:
    """A tiny Flux teacher (true CFG, no guidance embedding) saved as a pipeline folder with its
    ``diffboost.json``, for the distillation tests."""
    import json
    from pathlib import Path

    folder = Path(folder)
    make_flux(seed, guidance_embeds=False).save_pretrained(str(folder), safe_serialization=True)
    (folder / "diffboost.json").write_text(json.dumps(TEACHER_SETTINGS))
    return folder


def distill_tiny(teacher: Any, out: Any, train_steps: int = 6, *, work: Any = None, pairs_dir: Any = None,
                 resume: bool = False, **overrides: Any) -> dict[str, Any]:
    """``diffboost.distill.distill`` on a tiny teacher in about a second (``overrides``: DistillConfig fields)."""
    from diffboost.distill import DistillConfig, distill

    settings = dict(train_steps=train_steps, pairs=16, batch_size=4, shard_size=8, pair_batch=8, save_every=3,
                    warmup=2, lr=1e-3)
    settings.update(overrides)
    return distill(teacher, out, ["a red circle", "a blue square", "a green star"], DistillConfig(**settings),
                   work=work, pairs=pairs_dir, resume=resume, progress=False)


def interrupt_at_call(monkeypatch: Any, owner: Any, name: str, n: int) -> Callable[[], None]:
    """Make ``owner.name`` raise KeyboardInterrupt at its ``n``-th call (a killed run); returns the
    function that puts the original back."""
    real = getattr(owner, name)
    calls = [0]

    def dies(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, dies)
    return lambda: monkeypatch.setattr(owner, name, real)


# ----------------------------------------------------------------------------------------------
# vision-language models (Transformers): a tiny LLaVA-1.5-layout model and its processor
# ----------------------------------------------------------------------------------------------

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def make_llava(seed: int = 0, image_size: int = 32, feature_strategy: str = "default", attn: str = "sdpa"):
    """A random-init ``LlavaForConditionalGeneration`` (CLIP vision 4 layers, Llama 4 layers with grouped
    keys), 32 px images in 4 px patches: 64 visual tokens per image; returns ``(model, processor)``."""
    from diffboost_reference.training import vlm_model

    processor = vlm_model.build_processor(image_size=image_size)
    if feature_strategy == "full":
        processor.vision_feature_select_strategy = "full"
    model = vlm_model.build_model(len(processor.tokenizer), vision=TINY_VISION, text=TINY_TEXT, seed=seed,
                                  image_size=image_size, feature_strategy=feature_strategy, attn_implementation=attn)
    return model.eval(), processor


def llava_inputs(processor: Any, n: int = 3, seed: int = 0, questions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs for ``n`` procedural scenes (prompts of different lengths: left padding)."""
    from diffboost_reference.data import vqa

    examples = [vqa.make_example(seed + i) for i in range(n)]
    size = processor.image_processor.crop_size["height"]
    texts = questions or [f"<image> {e.question}" for e in examples]
    return dict(processor(images=[e.pil(size) for e in examples], text=texts, return_tensors="pt", padding=True))
