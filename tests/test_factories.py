"""Checks for the tiny pipeline factories in tests/factories.py."""

from __future__ import annotations

import pytest
import torch

from factories import FAMILIES, VIDEO_FAMILIES, default_call_kwargs, make_wan, run

FAMILY_NAMES = sorted(FAMILIES)

# How each pipeline applies guidance at the default call:
#   (denoiser forward calls per step, batch size seen by the denoiser for a
#    single prompt)
CFG_LAYOUT = {
    "flux": (1, 1),  # embedded guidance only
    "sd3": (1, 2),  # cond/uncond concatenated along the batch
    "pixart_sigma": (1, 2),
    "sana": (1, 2),
    "wan": (2, 1),  # separate cond and uncond calls
    "cogvideox": (1, 2),
    "hunyuan_video": (1, 1),  # embedded guidance only
    "sd": (1, 2),
    "sdxl": (1, 2),
    "chroma": (2, 1),  # separate cond / uncond calls, no cache_context
    "auraflow": (1, 2),
    "bria": (1, 2),
    "cogview3plus": (1, 2),
    "cogview4": (2, 1),
    "lumina2": (2, 1),  # separate calls, no cache_context
    "z_image": (1, 2),
    "qwen_image": (2, 1),  # true CFG
    "ltx_video": (1, 2),
    "mochi": (1, 2),
    "allegro": (1, 2),
    "skyreels_v2": (2, 1),
    "flux2": (2, 1),  # true CFG
    "hunyuan_image": (2, 1),  # the guider's two passes
}


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


@pytest.fixture(scope="module")
def pipes():
    """One pipeline per family, built lazily and shared within this module."""
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = FAMILIES[family](seed=0)
        return cache[family]

    return get


EXPECTED_FAMILIES = {
    "flux", "sd3", "pixart_sigma", "sana", "wan", "cogvideox", "hunyuan_video", "sd", "sdxl",
    "chroma", "auraflow", "bria", "cogview3plus", "cogview4", "lumina2", "z_image", "qwen_image",
    "ltx_video", "mochi", "allegro", "skyreels_v2", "flux2",
    "hunyuan_image",
}
#: tests of this module that run on a deliberate subset of the families
SUBSET_TESTS = {"test_true_cfg_two_passes", "test_decoded_output"}


def _fixture_params(fixture) -> tuple:
    marker = getattr(fixture, "_fixture_function_marker", None) or getattr(fixture, "_pytestfixturefunction", None)
    assert marker is not None, "cannot read the fixture's params with this pytest version"
    return tuple(marker.params)


def test_registry_complete():
    """A family missing from FAMILIES would silently vanish from every per-family test: the registry is
    exactly the families diffboost supports (and its video families), and every per-family
    parametrisation (here and in tests/plugins/test_families.py) runs on all of them."""
    import importlib.util
    import pathlib

    from diffboost import supported_families
    from diffboost.plugins.adapters import FAMILIES as SPECS

    assert set(FAMILIES) == EXPECTED_FAMILIES
    aliases = {"pixart": "pixart_sigma"}  # adapter family name -> factory name
    assert {aliases.get(f, f) for f in supported_families()} == EXPECTED_FAMILIES
    assert set(VIDEO_FAMILIES) == {aliases.get(s.name, s.name) for s in SPECS if s.video} == {
        "wan", "cogvideox", "hunyuan_video", "ltx_video", "mochi", "allegro", "skyreels_v2"
    }
    assert set(CFG_LAYOUT) == EXPECTED_FAMILIES
    per_family = [
        fn for name, fn in globals().items()
        if name.startswith("test_") and name not in SUBSET_TESTS and getattr(fn, "pytestmark", None)
    ]
    assert len(per_family) == 6
    for fn in per_family:
        (mark,) = [m for m in fn.pytestmark if m.name == "parametrize"]
        assert mark.args[0] == "family" and sorted(mark.args[1]) == sorted(EXPECTED_FAMILIES), fn.__name__
    path = pathlib.Path(__file__).parent / "plugins" / "test_families.py"
    spec = importlib.util.spec_from_file_location("_registry_check_test_families", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(_fixture_params(module.family_pipe)) == sorted(EXPECTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_default_kwargs_shape(family):
    kw = default_call_kwargs(family)
    assert "generator" not in kw
    assert kw["output_type"] == "latent"
    assert kw["num_inference_steps"] == 4
    assert isinstance(kw["prompt"], str)
    if family in VIDEO_FAMILIES:
        assert kw["num_frames"] <= 9
    # fresh dict every call
    kw["prompt"] = "changed"
    assert default_call_kwargs(family)["prompt"] != "changed"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_factory_fresh_and_deterministic(family):
    a = FAMILIES[family](seed=0)
    b = FAMILIES[family](seed=0)
    c = FAMILIES[family](seed=1)
    assert a is not b
    da, db, dc = _denoiser(a), _denoiser(b), _denoiser(c)
    assert da is not db
    assert not da.training
    sa, sb, sc = da.state_dict(), db.state_dict(), dc.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for module in a.components.values():
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                assert p.dtype == torch.float32 and p.device.type == "cpu"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_runs_finite_and_seeded(family, pipes):
    pipe = pipes(family)
    out = run(pipe, family, seed=0)
    assert isinstance(out, torch.Tensor)
    assert out.shape[0] == 1
    assert torch.isfinite(out).all()
    again = run(pipe, family, seed=0)
    assert torch.equal(out, again)
    other = run(pipe, family, seed=1)
    assert other.shape == out.shape
    assert not torch.equal(out, other)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batch_of_two_prompts(family, pipes):
    pipe = pipes(family)
    single = run(pipe, family, seed=0)
    out = run(pipe, family, seed=0, prompt=["a red circle", "a blue square"])
    assert out.shape == (2, *single.shape[1:])
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_other_step_count(family, pipes):
    pipe = pipes(family)
    four = run(pipe, family, seed=0)
    two = run(pipe, family, seed=0, num_inference_steps=2)
    assert two.shape == four.shape
    assert torch.isfinite(two).all()
    assert not torch.equal(two, four)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_guidance_layout(family, pipes):
    """CFG is on at the default call, in the way the pipeline implements it."""
    pipe = pipes(family)
    batches: list[int] = []

    def batch_of(mod, args, kwargs):
        latents = next((kwargs[k] for k in ("hidden_states", "sample", "x") if k in kwargs), args[0] if args else None)
        # Z-Image passes a list of per-image latents
        batches.append(len(latents) if isinstance(latents, list) else latents.shape[0])

    handle = _denoiser(pipe).register_forward_pre_hook(batch_of, with_kwargs=True)
    try:
        run(pipe, family, seed=0)
    finally:
        handle.remove()
    calls_per_step, batch = CFG_LAYOUT[family]
    steps = default_call_kwargs(family)["num_inference_steps"]
    assert len(batches) == calls_per_step * steps
    assert set(batches) == {batch}


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_true_cfg_two_passes(family, pipes):
    pipe = pipes(family)
    calls: list[int] = []
    handle = _denoiser(pipe).register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        out = run(pipe, family, seed=0, true_cfg_scale=2.0, negative_prompt="blurry")
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert len(calls) == 2 * default_call_kwargs(family)["num_inference_steps"]


def test_wan_two_experts():
    pipe = make_wan(two_experts=True)
    seen = {"transformer": 0, "transformer_2": 0}
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(lambda mod, args, _n=name: seen.__setitem__(_n, seen[_n] + 1))
        for name in seen
    ]
    try:
        out = run(pipe, "wan", seed=0)
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(out).all()
    assert seen["transformer"] > 0 and seen["transformer_2"] > 0


@pytest.mark.parametrize("family", ["flux", "sd", "wan", "cogvideox"])
def test_decoded_output(family, pipes):
    kw = default_call_kwargs(family)
    out = run(pipes(family), family, seed=0, output_type="pt")
    assert torch.isfinite(out).all()
    assert out.shape[-2:] == (kw["height"], kw["width"])
    if family in VIDEO_FAMILIES:
        assert out.shape[1] == kw["num_frames"]  # (B, F, C, H, W)
