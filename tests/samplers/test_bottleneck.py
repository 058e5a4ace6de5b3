"""BottleneckSampling on the tiny flow-matching pipelines: exactness of a one-stage plan, shapes and
dtypes of multi-stage runs, batches and CFG, errors, stacking with TaylorSeer, remove()."""

import pytest
import torch

import diffboost
from diffboost import BottleneckSampling, TaylorSeer
from diffboost.samplers.bottleneck import flux_positions, pack_flux, stage_sigmas, unpack_flux
from factories import FAMILIES, make_wan, run

FAMS = ["flux", "sd3", "wan", "hunyuan_video"]
STEPS = 6


@pytest.fixture(scope="module", params=FAMS)
def family_pipe(request):
    family = request.param
    pipe = FAMILIES[family]()
    return family, pipe, run(pipe, family, num_inference_steps=STEPS)


def test_one_full_resolution_stage_is_bit_identical(family_pipe):
    family, pipe, base = family_pipe
    with diffboost.accelerated(pipe, BottleneckSampling(stages=[(1.0, 1.0)])):
        out = run(pipe, family, num_inference_steps=STEPS)
    assert torch.equal(out, base), family
    assert BottleneckSampling(stages=[(1.0, 1.0)]).never_skips()


def test_multi_stage_keeps_shape_dtype_and_remove_restores(family_pipe):
    family, pipe, base = family_pipe
    with diffboost.accelerated(pipe, BottleneckSampling()):
        out = run(pipe, family, num_inference_steps=STEPS)
        again = run(pipe, family, num_inference_steps=STEPS)
        other_seed = run(pipe, family, seed=1, num_inference_steps=STEPS)
        stats = diffboost.describe(pipe)["last_call"][0]
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.isfinite(out).all()
    assert not torch.equal(out, base), "the low-resolution stage changed nothing"
    assert torch.equal(out, again), "a seeded call must be reproducible"
    assert not torch.equal(out, other_seed)
    assert [s["steps"] for s in stats["stages"]] == [1, 4, 1]
    assert [s["latent_size"] for s in stats["stages"]] == [[8, 8], [4, 4], [8, 8]]
    assert stats["steps_taken"] == STEPS
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base), "remove() did not restore"
    assert not hasattr(pipe, "_diffboost_handle")
    assert "step" not in vars(pipe.scheduler)


def test_batch_of_two_matches_single_runs_shape(family_pipe):
    family, pipe, base = family_pipe
    with diffboost.accelerated(pipe, BottleneckSampling(seed=3)):
        single = run(pipe, family, num_inference_steps=STEPS)
        batch = run(pipe, family, num_inference_steps=STEPS, prompt=["a red circle", "a blue square"])
    assert batch.shape == (2, *base.shape[1:]) and batch.dtype == base.dtype
    assert torch.isfinite(batch).all()
    assert single.shape == base.shape


def test_stacks_with_taylorseer(family_pipe):
    family, pipe, base = family_pipe
    plugin = BottleneckSampling(seed=0)
    with diffboost.accelerated(pipe, plugin):
        alone = run(pipe, family, num_inference_steps=8)
    # a cache that never skips must not change the sampler's output (its state resets at each switch)
    with diffboost.accelerated(pipe, TaylorSeer(interval=1), plugin):
        exact = run(pipe, family, num_inference_steps=8)
    assert torch.equal(exact, alone)
    with diffboost.accelerated(pipe, plugin, TaylorSeer(interval=2, warmup=1)) as handle:
        kinds = [type(p).__name__ for p in handle.plugins]
        out = run(pipe, family, num_inference_steps=8)
        stats = diffboost.describe(pipe)["last_call"]
    assert kinds == ["TaylorSeer", "BottleneckSampling"]
    assert out.shape == base.shape and torch.isfinite(out).all()
    # the cache resets at each resolution switch: earlier stages' statistics are kept by the sampler
    per_stage = stats[-1]["stacked_per_stage"] + [stats[:-1]]
    assert len(per_stage) == 3
    forecast = sum(b["forecast"] for stage in per_stage for item in stage for b in item["branches"].values())
    assert forecast > 0, stats
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sizes_not_divisible_by_the_scale_are_rounded(family):
    pipe = FAMILIES[family]()
    size = dict(height=80, width=48, num_inference_steps=STEPS)
    base = run(pipe, family, **size)
    with diffboost.accelerated(pipe, BottleneckSampling(stages=[(1.0, 0.3), (0.5, 0.4), (1.0, 0.3)])):
        out = run(pipe, family, **size)
        stats = diffboost.describe(pipe)["last_call"][0]
    assert out.shape == base.shape and torch.isfinite(out).all()
    # latent 10 x 6 -> half side rounded to a multiple of the patch size (2)
    assert [s["latent_size"] for s in stats["stages"]] == [[10, 6], [4, 4], [10, 6]]


def test_flux_true_cfg_branches():
    pipe = FAMILIES["flux"]()
    kw = dict(num_inference_steps=STEPS, true_cfg_scale=2.0, negative_prompt="a blue square")
    base = run(pipe, "flux", **kw)
    with diffboost.accelerated(pipe, BottleneckSampling()):
        out = run(pipe, "flux", **kw)
        stats = diffboost.describe(pipe)["last_call"][0]
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert stats["denoiser_calls"] == 2 * STEPS


def test_wan_two_experts():
    pipe = make_wan(two_experts=True)
    base = run(pipe, "wan", num_inference_steps=STEPS)
    with diffboost.accelerated(pipe, BottleneckSampling(stages=[(1.0, 1.0)])):
        assert torch.equal(run(pipe, "wan", num_inference_steps=STEPS), base)
    with diffboost.accelerated(pipe, BottleneckSampling()):
        out = run(pipe, "wan", num_inference_steps=STEPS)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert torch.equal(run(pipe, "wan", num_inference_steps=STEPS), base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stages=[]), "non-empty"),
        (dict(stages=[(1.0, 0.5), (0.5, 0.5)]), "start and end at scale 1.0"),
        (dict(stages=[(0.5, 0.5), (1.0, 0.5)]), "start and end at scale 1.0"),
        (dict(stages=[(1.0, 0.5), (0.0, 0.2), (1.0, 0.3)]), r"stages\[1\] scale"),
        (dict(stages=[(1.0, 0.5), (1.5, 0.2), (1.0, 0.3)]), r"stages\[1\] scale"),
        (dict(stages=[(1.0, 0.5), (0.5, 0.2), (1.0, 0.2)]), "sum to 1"),
        (dict(stages=[(1.0, 0.5), (0.5, 0.0), (1.0, 0.5)]), r"stages\[1\] share"),
        (dict(stages=[(1.0, 0.5, 3)]), "pair"),
        (dict(shift=0.0), "shift"),
        (dict(shift=(1.0, 2.0)), "needs 3"),
        (dict(shift=(2.0, 2.0, 2.0)), r"shift\[0\]"),
        (dict(renoise=1.0), "renoise"),
        (dict(renoise=(0.1,)), "needs 2"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_plans_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckSampling(**kwargs)


def test_too_few_steps_and_unsupported_pipelines():
    with pytest.raises(ValueError, match="num_inference_steps >= 3"):
        BottleneckSampling().step_counts(2)
    pipe = FAMILIES["sd3"]()
    with diffboost.accelerated(pipe, BottleneckSampling()):
        with pytest.raises(ValueError, match="num_inference_steps >= 3"):
            run(pipe, "sd3", num_inference_steps=2)
    with pytest.raises(diffboost.UnsupportedPipelineError, match="flow-matching"):
        diffboost.apply(FAMILIES["sd"](), BottleneckSampling())
    with pytest.raises(diffboost.IncompatiblePluginsError):
        diffboost.apply(pipe, BottleneckSampling(), BottleneckSampling(seed=1))


def test_step_counts_and_schedules():
    plugin = BottleneckSampling()
    assert plugin.step_counts(28) == [6, 17, 5]
    assert plugin.step_counts(3) == [1, 1, 1]
    assert BottleneckSampling(stages=[(1.0, 0.05), (0.5, 0.9), (1.0, 0.05)]).step_counts(4) == [1, 2, 1]
    sig = stage_sigmas(0.8, 0.2, 4, 1.0)
    assert sig[0] == pytest.approx(0.8) and sig[-1] == pytest.approx(0.2)
    assert sig == pytest.approx([0.8, 0.65, 0.5, 0.35, 0.2])
    shifted = stage_sigmas(0.8, 0.2, 4, 3.0)
    assert shifted[0] == pytest.approx(0.8) and shifted[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(shifted[1:-1], sig[1:-1])), "shift > 1 keeps more steps at high noise"


def test_flux_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 10, 6)
    packed = FluxPipeline._pack_latents(latents, 2, 4, 10, 6)
    assert torch.equal(pack_flux(latents), packed)
    assert torch.equal(unpack_flux(packed, (5, 3)), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 5, 3, "cpu", torch.float32)
    assert torch.equal(flux_positions((5, 3), torch.device("cpu"), torch.float32), ids)


def _sada_stats(stats: list) -> list:
    """SADA's statistics of every stage (the sampler keeps the finished stages', SADA the last)."""
    finished = [item for stage in stats[-1]["stacked_per_stage"] for item in stage]
    return [item for item in finished + stats[:-1] if "skipped_steps" in item]


def test_stacks_with_sada(family_pipe):
    """SADA follows the stages' own steps: never-skip is exact, forced skips land in the low stage."""
    family, pipe, base = family_pipe
    plugin = BottleneckSampling(stages=[(1.0, 0.25), (0.5, 0.5), (1.0, 0.25)], seed=0)  # 3 + 6 + 3 steps
    with diffboost.accelerated(pipe, plugin):
        alone = run(pipe, family, num_inference_steps=12)
    with diffboost.accelerated(pipe, diffboost.SADA(acc_range=(0, 0)), plugin):
        exact = run(pipe, family, num_inference_steps=12)
    assert torch.equal(exact, alone), "a SADA that never skips changed the bottleneck output"
    # stage 1 runs steps 3..8; SADA's trajectory restarts there and needs steps 3, 4, 5 to skip 6, 7
    with diffboost.accelerated(pipe, plugin, diffboost.SADA(schedule=(1, 6, 7))) as handle:
        kinds = [type(p).__name__ for p in handle.plugins]
        out = run(pipe, family, num_inference_steps=12)
        stats = diffboost.describe(pipe)["last_call"]
    assert kinds == ["SADA", "BottleneckSampling"]
    sada = _sada_stats(stats)
    assert sorted(n for item in sada for n in item["skipped_steps"]) == [6, 7], sada
    calls_per_step = 2 if family == "wan" else 1  # the tiny Wan pipeline runs CFG as two calls
    assert sum(item["denoiser_calls_saved"] for item in sada) == 2 * calls_per_step
    assert out.shape == base.shape and out.dtype == base.dtype and torch.isfinite(out).all()
    assert not torch.equal(out, alone)
    # the stability criterion itself, on every stage, with a cache as well
    with diffboost.accelerated(pipe, TaylorSeer(interval=2, warmup=2), diffboost.SADA(acc_range=(0, 12)), plugin):
        mixed = run(pipe, family, num_inference_steps=12)
    assert mixed.shape == base.shape and torch.isfinite(mixed).all()
    assert torch.equal(run(pipe, family, num_inference_steps=12), run(pipe, family, num_inference_steps=12))
