"""Procedural scenes: determinism, caption round trip, coverage."""

import random

import numpy as np
import pytest

from diffboost_reference.data import scenes


def test_same_seed_same_scene() -> None:
    a, b = scenes.make_scene(123), scenes.make_scene(123)
    assert np.array_equal(a.image, b.image)
    assert a.caption == b.caption and a.attributes == b.attributes
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8


def test_different_seeds_differ() -> None:
    images, _ = scenes.make_batch(range(8))
    assert len({im.tobytes() for im in images}) == 8


@pytest.mark.parametrize("two", [False, True])
def test_caption_round_trip(two: bool) -> None:
    for seed in range(200):
        sc = scenes.make_scene(seed, two_objects=two)
        assert scenes.parse_caption(sc.caption) == sc.attributes
        assert scenes.parse_spec(sc.caption) == sc.spec
        assert len(sc.spec.objects) == (2 if two else 1)


def test_caption_example() -> None:
    text = "a large red circle at the left on a white background"
    assert scenes.parse_caption(text) == {
        "shape": "circle", "color": "red", "size": "large", "position": "left", "background": "white"
    }
    with pytest.raises(ValueError):
        scenes.parse_caption("a photo of a cat")


def test_all_attribute_values_reachable() -> None:
    seen = {k: set() for k in scenes.ATTRIBUTES}
    for seed in range(600):
        for k, v in scenes.make_scene(seed).attributes.items():
            seen[k].add(v)
    assert seen == {k: set(v) for k, v in scenes.ATTRIBUTES.items()}


def test_render_uses_colours() -> None:
    spec = scenes.SceneSpec((scenes.ObjectSpec("square", "red", "large", "center"),), "white")
    img = scenes.render(spec, jitter=False)
    assert tuple(img[32, 32]) == scenes.COLORS["red"]
    assert tuple(img[2, 2]) == scenes.BACKGROUNDS["white"]


def test_benchmark_prompts_fixed_and_parseable() -> None:
    a, b = scenes.benchmark_prompts(50, seed=3), scenes.benchmark_prompts(50, seed=3)
    assert a == b and len(a) == 50 and len(set(a)) == 50
    for p in a:
        scenes.parse_caption(p)
    assert scenes.benchmark_prompts(50, seed=4) != a


def test_vocabulary_covers_captions() -> None:
    vocab = set(scenes.vocabulary())
    for seed in range(50):
        assert set(scenes.make_scene(seed, two_objects=True).caption.split()) <= vocab
    rng = random.Random(0)
    assert scenes.random_spec(rng).caption.split()[0] == "a"
