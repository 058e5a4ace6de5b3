"""FastV inside the language model, checked against a hand-run reference built from the eager model's
own attention maps."""

import pytest
import torch

import diffboost
from diffboost.vlm import FastV, HiPrune
from diffboost.vlm.fastv import fastv_keep_positions
from factories import llava_inputs, make_llava


def test_keep_positions_keeps_text_and_the_top_image_tokens_in_order():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.05]])
    is_image = torch.tensor([[False, True, True, True, True, False]])
    assert fastv_keep_positions(scores, is_image, 2).tolist() == [[0, 1, 3, 5]]
    assert fastv_keep_positions(scores, is_image, 4).tolist() == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("layer", [1, 2])
def test_prefill_equals_a_hand_run_of_the_pruned_layers(layer):
    sdpa, processor = make_llava(seed=3)
    eager, _ = make_llava(seed=3, attn="eager")
    inputs = llava_inputs(processor, n=1, seed=4)
    keep = 10
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
        ids = inputs["input_ids"]
        is_image = ids == eager.config.image_token_id
        ranking = out.attentions[layer - 1][:, :, -1, :].mean(1)  # the last token's attention in layer K-1
        kept = fastv_keep_positions(ranking, is_image, keep)[0]
        lm = eager.model.language_model
        h = out.hidden_states[layer][:, kept]
        pos = kept[None]
        emb = lm.rotary_emb(h, position_ids=pos)
        n = kept.numel()
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        for block in lm.layers[layer:]:
            h = block(h, attention_mask=causal, position_embeddings=emb, position_ids=pos)
        want = eager.lm_head(lm.norm(h))[:, -1]
    diffboost.apply(sdpa, FastV(keep=keep, layer=layer))
    with torch.no_grad():
        got = sdpa(**inputs).logits[:, -1]
    stats = diffboost.describe(sdpa)["last_call"][0]
    diffboost.remove(sdpa)
    assert stats["kept_image_tokens"] == keep and stats["tokens_after_layer"] == n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stacks_after_a_vision_pruner():
    model, processor = make_llava(seed=0)
    inputs = llava_inputs(processor, n=2)
    diffboost.apply(model, FastV(keep=0.5), HiPrune(keep=32))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    calls = diffboost.describe(model)["last_call"]
    diffboost.remove(model)
    assert [c["method"] for c in calls] == ["HiPrune", "FastV"]
    assert calls[0]["kept_per_image"] == 32 and calls[1]["image_tokens"] == 32 and calls[1]["kept_image_tokens"] == 16
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_layer_outside_the_language_model_is_refused_at_apply():
    model, _ = make_llava()
    with pytest.raises(ValueError, match=r"FastV.layer=4 leaves no layer to prune in a 4-layer language model"):
        diffboost.apply(model, FastV(layer=4))
    assert "generate" not in vars(model)
    with pytest.raises(ValueError, match="FastV.layer=0"):
        FastV(layer=0)


def test_direct_forward_on_a_batch_matches_rows_alone():
    """A direct forward (positions (1, L) broadcast over the batch) with FastV: each row's last logits
    equal that row's own call."""
    model, processor = make_llava(seed=2)
    inputs = llava_inputs(processor, n=2, seed=8, questions=["<image> what color is the star ?"] * 2)
    diffboost.apply(model, FastV(keep=12))
    try:
        with torch.no_grad():
            both = model(**inputs).logits[:, -1]
            for row in range(2):
                alone = model(**{k: v[row : row + 1] for k, v in inputs.items()}).logits[:, -1]
                torch.testing.assert_close(alone[0], both[row], rtol=1e-5, atol=1e-5)
        stats = diffboost.describe(model)["last_call"][0]
        assert stats["plugin"] == "FastV(keep=12, layer=2)" and stats["layer"] == 2
        assert stats["prompt_tokens"] == inputs["input_ids"].shape[1]
    finally:
        diffboost.remove(model)


def test_rows_with_different_image_counts_are_refused():
    model, processor = make_llava(seed=0)
    from diffboost_reference.data import vqa

    images = [vqa.make_example(i).pil(32) for i in range(3)]
    inputs = processor(images=images, text=["<image> <image> what color is the star ?", "<image> describe ?"],
                       return_tensors="pt", padding=True)
    diffboost.apply(model, FastV(keep=8))
    try:
        with pytest.raises(ValueError, match="FastV needs the same number of images in every row"):
            model.generate(**inputs, max_new_tokens=1)
    finally:
        diffboost.remove(model)


def test_last_query_attention_equals_the_eager_map_with_padding():
    from diffboost.vlm.attention import last_query_attention

    eager, processor = make_llava(seed=3, attn="eager")
    inputs = llava_inputs(processor, n=3, seed=1)  # left-padded rows
    assert bool((inputs["attention_mask"] == 0).any())
    lm = eager.model.language_model
    captured = {}
    hook = lm.layers[1].register_forward_pre_hook(lambda m, a, k: captured.update(h=a[0] if a else k["hidden_states"], **k),
                                                  with_kwargs=True)
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
        hook.remove()
        got = last_query_attention(lm.layers[1], captured["h"], captured["position_embeddings"], captured["attention_mask"])
    torch.testing.assert_close(got, out.attentions[1][:, :, -1, :], rtol=1e-5, atol=1e-6)
