"""The reference vision-language model: a CLIP-style vision tower, a two-layer projector and a small
Llama, assembled as Transformers' ``LlavaForConditionalGeneration`` with a ``LlavaProcessor``.

64 x 64 images in 4 x 4 patches give 256 visual tokens per image (the CLS token is dropped,
``vision_feature_select_strategy="default"``), as many as the questions' text has words times thirty:
prefill is dominated by image tokens, as in LLaVA-1.5 (576 visual tokens per image).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from diffboost_reference.data import vqa

PAD, EOS, UNK, IMAGE = "<pad>", "</s>", "<unk>", "<image>"

#: default sizes (hidden widths, layers) of the shipped model
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
PATCH = 4


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the questions' and answers' words. Ids: ``<pad>``=0, ``</s>``=1,
    ``<unk>``=2, ``<image>``=3, then the words. Left padding (generation)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {PAD: 0, EOS: 1, UNK: 2, IMAGE: 3}
    for word in vqa.vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left",
        model_max_length=512, extra_special_tokens={"image_token": IMAGE},
    )
    return out


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None, image_size: int = vqa.IMAGE_SIZE) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", image_token=IMAGE, num_additional_image_tokens=1,
    )


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes of a ``grid x grid`` patch grid, ``(grid * grid, dim)`` in
    raster order (MAE's initialisation): a quarter of the channels each for sin/cos of x and of y, at
    geometric frequencies. ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"sin-cos position codes need a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for axis in (xs, ys):
        angle = axis.flatten()[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


def build_model(vocab_size: int, vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None,
                seed: int = 0, image_size: int = vqa.IMAGE_SIZE, feature_strategy: str = "default",
                attn_implementation: str = "sdpa", sincos_positions: bool = True) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-layout model at toy size (random weights, seeded). ``sincos_positions`` starts the
    vision tower's (learned) patch position embeddings at :func:`sincos_2d` codes and the CLS one at zero:
    attention then finds neighbouring patches from the first step, which is what telling shapes apart
    takes (benchmarks/TRAINING.md, "Reference VLM")."""
    torch.manual_seed(seed)
    vision_config = CLIPVisionConfig(
        image_size=image_size, patch_size=PATCH, projection_dim=64, **(vision or VISION)
    )
    text_config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        tie_word_embeddings=True, **(text or TEXT)
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=3,
        vision_feature_layer=-2, vision_feature_select_strategy=feature_strategy, projector_hidden_act="gelu",
        image_seq_length=(image_size // PATCH) ** 2 + int(feature_strategy == "full"), tie_word_embeddings=True,
    )
    config.pad_token_id = 0
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    if sincos_positions:
        tower = model.model.vision_tower
        table = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight
        with torch.no_grad():
            table[0].zero_()
            table[1:] = sincos_2d(image_size // PATCH, table.shape[1])
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.bos_token_id = None
    model.generation_config.max_new_tokens = 2
    model.generation_config.do_sample = False
    return model


def prompt(question: str) -> str:
    """The text a question is asked with (the processor expands ``<image>`` to 256 tokens)."""
    return f"{IMAGE} {question}"
