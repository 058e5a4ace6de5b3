"""Recognising vision-language models, and the refusals of ``apply`` on them (before any work)."""

import pytest
import torch

import diffboost
from diffboost.vlm import Downsample, FastV, HiPrune, HiRED, VisionZip
from diffboost.vlm.adapter import VlmAdapter
from factories import make_llava


def test_adapter_reads_the_layout():
    model, _ = make_llava()
    a = VlmAdapter.of(model)
    assert a.grid == (8, 8) and a.tokens_per_image == 64 and not a.keeps_cls
    assert a.feature_layer == 3  # vision_feature_layer=-2 of 4 layers: the output of layer 2
    assert a.describe()["visual_tokens_per_image"] == 64
    full, _ = make_llava(feature_strategy="full")
    assert VlmAdapter.of(full).tokens_per_image == 65


def test_unsupported_models_are_refused_with_the_supported_list():
    class LlavaNextForConditionalGeneration(torch.nn.Module):
        def get_image_features(self, *a):
            pass

    with pytest.raises(diffboost.UnsupportedPipelineError, match="LLaVA-NeXT tiles .*support LlavaForConditionalGeneration"):
        diffboost.apply(LlavaNextForConditionalGeneration(), HiPrune())

    class OtherVlm(torch.nn.Module):
        def get_image_features(self, *a):
            pass

    with pytest.raises(diffboost.UnsupportedPipelineError, match="OtherVlm is not a vision-language model diffboost knows"):
        diffboost.apply(OtherVlm(), HiPrune())


def test_stack_rules():
    model, _ = make_llava()
    with pytest.raises(diffboost.IncompatiblePluginsError, match="TaylorSeer is a cache plugin for Diffusers pipelines"):
        diffboost.apply(model, diffboost.TaylorSeer())
    with pytest.raises(diffboost.IncompatiblePluginsError, match="HiPrune and VisionZip both prune"):
        diffboost.apply(model, HiPrune(), VisionZip())
    with pytest.raises(diffboost.IncompatiblePluginsError, match="FastV and FastV"):
        diffboost.apply(model, FastV(), FastV(keep=0.5))
    assert "generate" not in vars(model)
    diffboost.apply(model, HiRED(keep=0.5))
    with pytest.raises(ValueError, match="already accelerated"):
        diffboost.apply(model, Downsample())
    diffboost.remove(model)


@pytest.mark.parametrize("plugin, message", [
    (HiPrune(object_layer=7), r"HiPrune.object_layer=7 is outside the vision tower's 4 layers"),
    (HiRED(partition_rows=9), r"a 9 x 2 split does not fit the 8 x 8 patch grid"),
    (VisionZip(layer=-5), r"VisionZip.layer=-5 is outside"),
])
def test_layer_and_grid_settings_are_checked_against_the_model(plugin, message):
    model, _ = make_llava()
    with pytest.raises(ValueError, match=message):
        diffboost.apply(model, plugin)
    assert "generate" not in vars(model) and "get_image_features" not in vars(model.model)


@pytest.mark.parametrize("keep, error", [(0, ValueError), (1.5, ValueError), (0.0, ValueError), (True, TypeError),
                                         ("0.25", TypeError), (float("nan"), ValueError)])
def test_keep_is_a_share_or_a_count(keep, error):
    with pytest.raises(error, match="keep"):
        HiPrune(keep=keep)


def test_a_prompt_without_matching_placeholders_gets_a_clear_error():
    model, processor = make_llava()
    from factories import llava_inputs

    inputs = llava_inputs(processor, n=1)
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # one placeholder short
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    diffboost.apply(model, HiPrune())
    try:
        with pytest.raises(ValueError, match="63 image placeholder tokens, not a multiple of the 64"):
            model.generate(**inputs, max_new_tokens=1)
    finally:
        diffboost.remove(model)


def test_cls_methods_refuse_a_tower_without_cls():
    model, _ = make_llava()
    del model.model.vision_tower.embeddings.class_embedding  # a SigLIP-like tower
    for plugin in (HiRED(), VisionZip()):
        with pytest.raises(ValueError, match="reads the CLS token's attention; the vision tower CLIPVisionModel has none"):
            diffboost.apply(model, plugin)
    assert "generate" not in vars(model)
