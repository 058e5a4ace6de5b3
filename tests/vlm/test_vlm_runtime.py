"""The vision-side pruning runtime on a stock ``LlavaForConditionalGeneration``: exactness at full
budget, ``remove()``, the pruned call equal to the model fed the kept features by hand, batches,
decoding modes, state."""

import pytest
import torch

import diffboost
from diffboost.vlm import Downsample, FastV, HiPrune, HiRED, VisionZip
from diffboost.vlm.base import VisionContext
from diffboost.vlm.runtime import shrink_placeholders
from factories import llava_inputs, make_llava

VISION_METHODS = [HiPrune, HiRED, VisionZip, Downsample]
ALL_METHODS = VISION_METHODS + [FastV]


@pytest.fixture(scope="module")
def llava():
    return make_llava(seed=0)


def generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, **{"max_new_tokens": 4, "do_sample": False, "output_scores": True,
                                           "return_dict_in_generate": True, **kw})


def test_shrink_placeholders_keeps_the_first_k_of_every_image_run():
    ids = torch.tensor([[0, 9, 9, 9, 9, 5, 6], [9, 9, 9, 9, 7, 8, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    new, m, _ = shrink_placeholders(ids, 9, 4, 2, pad_token_id=0, attention_mask=mask)
    assert new.tolist() == [[0, 9, 9, 5, 6], [9, 9, 7, 8, 6]]
    assert m.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # two images in one row, one in the other: rows lose different counts, re-padded on the left
    ids2 = torch.tensor([[9, 9, 9, 9, 9, 9, 9, 9, 5], [0, 0, 0, 0, 9, 9, 9, 9, 5]])
    mask2 = (ids2 != 0).long()
    new2, m2, lab = shrink_placeholders(ids2, 9, 4, 1, pad_token_id=0, attention_mask=mask2, labels=ids2.clone())
    assert new2.tolist() == [[0, 0, 0, 9, 9, 5], [0, 0, 0, 0, 9, 5]]
    assert m2.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert lab.tolist() == [[-100, -100, -100, 9, 9, 5], [0, 0, 0, 0, 9, 5]]
    with pytest.raises(ValueError, match="not a multiple of the 4"):
        shrink_placeholders(torch.tensor([[9, 9, 9, 5]]), 9, 4, 2, pad_token_id=0)


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.__name__)
def test_full_budget_is_bit_identical_and_remove_restores(llava, method):
    model, processor = llava
    inputs = llava_inputs(processor, n=3)
    base = generate(model, inputs)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    for keep in (1.0, 10_000):
        diffboost.apply(model, method(keep=keep))
        out = generate(model, inputs)
        assert torch.equal(out.sequences, base.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.scores, base.scores))
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, base_logits)
        diffboost.remove(model)
    diffboost.apply(model, method(keep=0.25))
    pruned = generate(model, inputs)
    assert not all(torch.equal(a, b) for a, b in zip(pruned.scores, base.scores))  # it did prune
    diffboost.remove(model)
    after = generate(model, inputs)
    assert torch.equal(after.sequences, base.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.scores, base.scores))
    assert "generate" not in vars(model) and "forward" not in vars(model)
    assert "get_image_features" not in vars(model.model)


@pytest.mark.parametrize("method", VISION_METHODS, ids=lambda m: m.__name__)
def test_pruned_call_equals_the_model_fed_the_kept_features(llava, method):
    """Independent of the runtime's plumbing: select with the plugin's own function on the vision
    tower's hidden states, build inputs_embeds by hand, run the unpatched model."""
    model, processor = llava
    inputs = llava_inputs(processor, n=3, seed=5)
    plugin = method(keep=0.2)
    handle = diffboost.apply(model, plugin)
    with torch.no_grad():
        got = model(**inputs).logits
    adapter = handle.adapter
    diffboost.remove(model)
    k = plugin.kept_tokens(adapter)
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(plugin.select(VisionContext(adapter, hs, k)))
        ids, mask, _ = shrink_placeholders(inputs["input_ids"], adapter.image_token_id, adapter.tokens_per_image, k,
                                           pad_token_id=0, attention_mask=inputs["attention_mask"])
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == adapter.image_token_id)[..., None], feats.reshape(-1, feats.shape[-1]))
        want = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert got.shape == want.shape == (3, ids.shape[1], model.config.text_config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.__name__)
def test_a_batch_answers_like_its_rows_alone(llava, method):
    """Left-padded prompts of different lengths, KV cache on: every row generates what it
    generates alone (masks, positions and padding stay right)."""
    model, processor = llava
    inputs = llava_inputs(processor, n=3, seed=1)
    diffboost.apply(model, method(keep=0.25))
    try:
        batch = generate(model, inputs)
        prompt_len = inputs["input_ids"].shape[1]
        assert torch.equal(batch.sequences[:, :prompt_len], inputs["input_ids"])  # the caller's prompt comes back
        for row in range(3):
            pad = int((inputs["attention_mask"][row] == 0).sum())
            alone = {k: v[row : row + 1, pad:] if k != "pixel_values" else v[row : row + 1] for k, v in inputs.items()}
            single = generate(model, alone)
            assert torch.equal(single.sequences[0, -4:], batch.sequences[row, -4:])
            for a, b in zip(single.scores, batch.scores):
                torch.testing.assert_close(a[0], b[row], rtol=1e-4, atol=1e-4)
    finally:
        diffboost.remove(model)


@pytest.mark.parametrize("method", [HiPrune, FastV], ids=lambda m: m.__name__)
def test_sampling_without_cache_and_state_across_calls(llava, method):
    model, processor = llava
    diffboost.apply(model, method(keep=16))
    try:
        a3, a1 = llava_inputs(processor, n=3, seed=2), llava_inputs(processor, n=1, seed=7)
        torch.manual_seed(0)
        s1 = generate(model, a3, do_sample=True, top_k=5)
        torch.manual_seed(0)
        s2 = generate(model, a3, do_sample=True, top_k=5)
        assert torch.equal(s1.sequences, s2.sequences)
        nocache = generate(model, a1, use_cache=False)
        cached = generate(model, a1)
        assert torch.equal(nocache.sequences, cached.sequences) or method is FastV  # FastV re-ranks per step without cache
        stats = diffboost.describe(model)["last_call"][0]
        assert stats.get("kept_per_image", stats.get("kept_image_tokens")) == 16
        assert diffboost.describe(model)["calls"] >= 4
    finally:
        diffboost.remove(model)


def test_two_patched_models_in_one_process():
    m1, p1 = make_llava(seed=1)
    m2, p2 = make_llava(seed=2)
    inputs = llava_inputs(p1, n=2)
    ref1, ref2 = generate(m1, inputs), generate(m2, inputs)
    diffboost.apply(m1, HiPrune(keep=0.25))
    diffboost.apply(m2, VisionZip(keep=0.5))
    o1, o2 = generate(m1, inputs), generate(m2, inputs)
    assert diffboost.describe(m1)["last_call"][0]["kept_per_image"] == 16
    assert diffboost.describe(m2)["last_call"][0]["kept_per_image"] == 32
    diffboost.remove(m1)
    assert torch.equal(generate(m1, inputs).sequences, ref1.sequences)
    assert o2.sequences.shape[0] == 2
    diffboost.remove(m2)
    assert torch.equal(generate(m2, inputs).sequences, ref2.sequences)


def test_full_strategy_keeps_the_cls_token():
    model, processor = make_llava(feature_strategy="full")
    inputs = llava_inputs(processor, n=2)
    base = generate(model, inputs)
    diffboost.apply(model, HiPrune(keep=1.0))
    assert torch.equal(generate(model, inputs).sequences, base.sequences)
    diffboost.remove(model)
    diffboost.apply(model, HiPrune(keep=8))
    out = generate(model, inputs)
    stats = diffboost.describe(model)["last_call"][0]
    assert stats["visual_tokens_per_image"] == 65 and stats["kept_per_image"] == 9
    assert out.sequences.shape == base.sequences.shape
    diffboost.remove(model)


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.__name__)
def test_bfloat16_model(method):
    model, processor = make_llava(seed=0)
    model = model.to(torch.bfloat16)
    inputs = llava_inputs(processor, n=2)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    base = generate(model, inputs)
    diffboost.apply(model, method(keep=0.25))
    out = generate(model, inputs)
    assert out.sequences.shape == base.sequences.shape and out.scores[0].dtype == base.scores[0].dtype
    assert all(torch.isfinite(s).all() for s in out.scores)
    diffboost.remove(model)
    assert torch.equal(generate(model, inputs).sequences, base.sequences)
