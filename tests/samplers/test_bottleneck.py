"""BottleneckSampling on the tiny flow-matching pipelines: exactness of a one-stage plan, shapes and
dtypes of multi-stage runs, batches and CFG, errors, stacking with TaylorSeer, remove()."""

import pytest
import torch

import diffboost
from diffboost import BottleneckSampling, TaylorSeer
from diffboost.plugins.runtime import StageSwitched
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
        info = diffboost.describe(pipe)
    stats = info["last_call"]
    assert kinds == ["TaylorSeer", "BottleneckSampling"]
    assert out.shape == base.shape and torch.isfinite(out).all()
    # the cache resets at each resolution switch (the sampler's StageSwitched event): the handle keeps
    # the finished stages' statistics
    per_stage = info["per_stage"] + [stats[:-1]]
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


def _sada_stats(info: dict) -> list:
    """SADA's statistics of every stage (the handle keeps the finished stages', SADA the last)."""
    finished = [item for stage in info["per_stage"] for item in stage]
    return [item for item in finished + info["last_call"] if item["plugin"].startswith("SADA(")]


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
        info = diffboost.describe(pipe)
    assert kinds == ["SADA", "BottleneckSampling"]
    sada = _sada_stats(info)
    assert sorted(n for item in sada for n in item["skipped_steps"]) == [6, 7], sada
    calls_per_step = 2 if family == "wan" else 1  # the tiny Wan pipeline runs CFG as two calls
    assert sum(item["denoiser_calls_saved"] for item in sada) == 2 * calls_per_step
    assert out.shape == base.shape and out.dtype == base.dtype and torch.isfinite(out).all()
    assert not torch.equal(out, alone)
    # the stability criterion itself, on every stage, with a cache as well
    with diffboost.accelerated(pipe, TaylorSeer(interval=2, warmup=2), diffboost.SADA(acc_range=(0, 12)), plugin):
        mixed = run(pipe, family, num_inference_steps=12)
    assert mixed.shape == base.shape and torch.isfinite(mixed).all()
    # remove() restores the pipeline: bit-identical to the run the fixture made before any apply()
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base), "remove() did not restore"
    assert not hasattr(pipe, "_diffboost_handle") and "step" not in vars(pipe.scheduler)


# ----------------------------------------------------------------------------------------------
# the plan and the stage-switch math on known tensors (issue #19): hand-computed answers
# ----------------------------------------------------------------------------------------------

import re
from types import SimpleNamespace

import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from diffboost.plugins.base import PluginKind
from diffboost.samplers.bottleneck import _Bottleneck, _seed_from, resize_latents, stage_side


def test_step_counts_round_by_largest_remainder():
    # exact shares
    assert BottleneckSampling().step_counts(10) == [2, 6, 2]
    # 1, 7.5, 1.5 -> floors 1, 7, 1 and one step left: the largest remainder (0.5) wins, the earlier
    # stage on a tie (stage 1 before stage 2), never the stage without remainder
    assert BottleneckSampling(stages=[(1.0, 0.1), (0.5, 0.75), (1.0, 0.15)]).step_counts(10) == [1, 8, 1]
    # 4 x 1.5 -> floors 1 and two steps left: the first two stages on the tie
    quarters = BottleneckSampling(stages=[(1.0, 0.25), (0.5, 0.25), (0.75, 0.25), (1.0, 0.25)])
    assert quarters.step_counts(6) == [2, 2, 1, 1]
    assert quarters.step_counts(4) == [1, 1, 1, 1]
    # 0.2, 3.6, 0.2 -> 0, 4, 0: each empty stage takes one step from the longest
    assert BottleneckSampling(stages=[(1.0, 0.05), (0.5, 0.9), (1.0, 0.05)]).step_counts(4) == [1, 2, 1]
    assert BottleneckSampling(stages=[(1.0, 0.05), (0.5, 0.9), (1.0, 0.05)]).step_counts(20) == [1, 18, 1]
    assert BottleneckSampling(stages=[(1.0, 1.0)]).step_counts(1) == [1]
    with pytest.raises(ValueError, match=r"^BottleneckSampling with 4 stages needs num_inference_steps >= 4, got 3$"):
        quarters.step_counts(3)


def test_stage_side_rounds_to_the_patch():
    assert stage_side(7, 1.0) == 7  # the full-size stage keeps the exact size, odd or not
    assert stage_side(8, 0.5) == 4
    assert stage_side(10, 0.5) == 4  # 2.5 patches -> round half to even: 2 patches
    assert stage_side(6, 0.5) == 4  # 1.5 patches -> 2
    assert stage_side(20, 0.35) == 8  # 3.5 patches -> 4
    assert stage_side(12, 0.75) == 8  # 4.5 patches -> 4 (half to even)
    assert stage_side(14, 0.75) == 10  # 5.25 patches -> 5
    assert stage_side(3, 0.5) == 2 and stage_side(2, 0.25) == 2  # at least one patch


def test_stage_sigmas_exact_values():
    # u' = s u / (1 + (s - 1) u) on u = 1, 1/2, 0 and u = 1, 3/4, 1/2, 1/4, 0
    assert stage_sigmas(0.55, 0.0, 2, 3.0) == pytest.approx([0.55, 0.55 * 0.75, 0.0])
    assert stage_sigmas(0.8, 0.2, 4, 3.0) == pytest.approx([0.8, 0.74, 0.65, 0.5, 0.2])
    assert stage_sigmas(0.8, 0.25, 4, 2.0) == pytest.approx([0.8, 0.25 + 0.55 * 6 / 7, 0.25 + 0.55 * 2 / 3, 0.25 + 0.55 * 0.4, 0.25])
    assert stage_sigmas(0.9, 0.3, 1, 5.0) == pytest.approx([0.9, 0.3])
    assert stage_sigmas(0.8, 0.2, 4, 0.5) == pytest.approx([0.8, 0.2 + 0.6 * 0.6, 0.2 + 0.6 / 3, 0.2 + 0.6 / 7, 0.2])


def test_resize_latents_known_values():
    ramp = torch.arange(4.0).expand(1, 1, 4, 4)  # x[h, w] = w
    # down: antialiased bilinear, a tent of half-width 2 input pixels: weights 0.75 / 0.25 at distances
    # 0.5 / 1.5, renormalised at the border: (0.75*0 + 0.75*1 + 0.25*2) / 1.75 = 5/7, (0.25*1 + 0.75*2 + 0.75*3) / 1.75 = 16/7
    down = resize_latents(ramp, (2, 2))
    torch.testing.assert_close(down, torch.tensor([[5 / 7, 16 / 7]]).expand(1, 1, 2, 2), rtol=0, atol=1e-6)
    # up: bicubic (not bilinear), half-pixel centres
    small = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    up = resize_latents(small, (4, 4))
    assert torch.equal(up, F.interpolate(small, size=(4, 4), mode="bicubic", align_corners=False))
    assert not torch.equal(up, F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False))
    # a wide-but-shorter target is a downsize by area (6 < 16 pixels): antialiased bilinear
    wide = resize_latents(ramp, (1, 6))
    assert torch.equal(wide, F.interpolate(ramp, size=(1, 6), mode="bilinear", align_corners=False, antialias=True))
    # 2 x 8 -> 3 x 3 is taller but has fewer pixels (9 < 16): a downsize
    flat = torch.arange(16.0).reshape(1, 1, 2, 8)
    assert torch.equal(resize_latents(flat, (3, 3)), F.interpolate(flat, size=(3, 3), mode="bilinear", align_corners=False, antialias=True))
    # same size: the tensor itself (video too); half precision is resized in float32
    assert resize_latents(ramp, (4, 4)) is ramp
    assert resize_latents(ramp[None], (4, 4)) is not None and resize_latents(ramp.unsqueeze(2), (4, 4)).shape == (1, 1, 1, 4, 4)
    assert resize_latents(ramp.half(), (2, 2)).dtype == torch.float32
    # video (B, C, F, H, W): every frame resized on its own, frames and channels in place
    video = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    assert resize_latents(video, (6, 6)) is video
    out = resize_latents(video, (2, 4))
    assert out.shape == (2, 3, 4, 2, 4) and out.is_contiguous()
    for f in range(4):
        assert torch.equal(out[:, :, f], resize_latents(video[:, :, f], (2, 4)))


def test_seed_from_latents():
    assert _seed_from(torch.zeros(2)) == 1786884285633530058
    assert _seed_from(torch.arange(6.0).reshape(2, 3)) == 5597700074881237875
    assert _seed_from(torch.arange(6.0).reshape(2, 3).half()) == 5597700074881237875  # read as float32
    assert _seed_from(torch.ones(2)) == 6908547400798947957  # its 64-bit hash is >= 2**63: reduced mod 2**63


def test_config_fields_and_messages():
    plugin = BottleneckSampling(stages=[[1.0, 0.25], [0.5, 0.5], [1.0, 0.25]], shift=[1.0, 2.0, 3.0], renoise=[0.2, 0.4])
    assert plugin.stages == ((1.0, 0.25), (0.5, 0.5), (1.0, 0.25)) and plugin.shift == (1.0, 2.0, 3.0)
    assert plugin._per_stage("shift", 3) == (1.0, 2.0, 3.0) and plugin._per_stage("renoise", 3) == (0.0, 0.2, 0.4)
    default = BottleneckSampling()
    assert (default.stages, default.shift, default.renoise, default.seed) == (((1.0, 0.2), (0.5, 0.6), (1.0, 0.2)), 2.0, 0.1, None)
    assert default._per_stage("shift", 3) == (1.0, 2.0, 2.0) and default._per_stage("renoise", 3) == (0.0, 0.1, 0.1)
    assert not default.never_skips() and BottleneckSampling(stages=[(1.0, 1.0)]).never_skips()
    assert default.kind is PluginKind.SAMPLER
    # boundaries that are allowed
    BottleneckSampling(renoise=0.0, shift=1e-9, seed=2**63 - 1)
    BottleneckSampling(stages=[(1.0, 0.5), (1e-9, 0.2), (1.0, 0.3)], renoise=(0.999, 0.0))
    messages = [
        (dict(renoise=1.0), ValueError, "BottleneckSampling.renoise[0]=1.0 is out of range; allowed: >= 0.0 and < 1.0"),
        (dict(renoise=(0.1, -0.1)), ValueError, "BottleneckSampling.renoise[1]=-0.1 is out of range; allowed: >= 0.0 and < 1.0"),
        (dict(stages=[(1.0, 0.5), (0.0, 0.2), (1.0, 0.3)]), ValueError,
         "BottleneckSampling.stages[1] scale=0.0 is out of range; allowed: > 0.0 and <= 1.0"),
        (dict(shift=(1.0, 2.0, -1.0)), ValueError, "BottleneckSampling.shift[2]=-1.0 is out of range; allowed: > 0.0"),
        (dict(shift=float("inf")), ValueError, "BottleneckSampling.shift=inf is out of range; allowed: finite"),
        (dict(renoise=float("nan")), ValueError, "BottleneckSampling.renoise=nan is out of range; allowed: finite"),
        (dict(shift=True), TypeError, "BottleneckSampling.shift must be a number, got bool (True)"),
        (dict(renoise="a"), TypeError, "BottleneckSampling.renoise must be a number, got str ('a')"),
        (dict(shift=(1.0, 2.0)), ValueError, "BottleneckSampling.shift has 2 values; the plan needs 3"),
        (dict(renoise=(0.1, 0.1, 0.1)), ValueError, "BottleneckSampling.renoise has 3 values; the plan needs 2"),
        (dict(shift=(2.0, 3.0, 3.0)), ValueError,
         "BottleneckSampling.shift[0]=2.0 must be 1.0: the first stage keeps the pipeline's own schedule"),
        (dict(stages=[(1.0, 1.5)]), ValueError, "BottleneckSampling.stages[0] share=1.5 is out of range; allowed: > 0.0 and <= 1.0"),
        (dict(stages=[(1.0, 0.5), (1.0, 0.4)]), ValueError, "BottleneckSampling.stages shares must sum to 1, got 0.9 ([0.5, 0.4])"),
        (dict(seed=2**63), ValueError, None),
    ]
    for kwargs, error, message in messages:
        with pytest.raises(error, match=None if message is None else f"^{re.escape(message)}$"):
            BottleneckSampling(**kwargs)


class _Scheduler:
    """A flow-matching scheduler stand-in: given sigmas; its own step returns sample + model_output / 2
    + 100 (a marker) and records the timestep."""

    def __init__(self, sigmas, step_index=0, config=None):
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self.config = {"num_train_timesteps": 1000} if config is None else config
        self._step_index = step_index
        self.own_steps = []

    def step(self, model_output, timestep, sample, return_dict=True):
        self.own_steps.append(float(timestep))
        if getattr(self, "_step_index", None) is not None:
            self._step_index += 1
        out = sample + 0.5 * model_output + 100.0
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)


class _Adapter:
    def __init__(self, family, scheduler, flow=True, **pipe_config):
        self.family, self.is_flow_matching = family, flow
        self.scheduler = scheduler
        self.pipe = SimpleNamespace(scheduler=scheduler)
        if pipe_config:
            self.pipe.config = SimpleNamespace(**pipe_config)

    def __iter__(self):
        return iter(())  # no denoiser: the tests call stage_inputs() themselves


class _Stacked:
    """A stacked plugin as the sampler sees it: statistics, reset, optionally SADA's solve_flow_step."""

    def __init__(self, solve=False):
        self.resets, self.calls, self.samples = 0, [], []
        if solve:
            self.solve_flow_step = self._solve

    def stats(self):
        return {"resets_before": self.resets}

    def reset(self):
        self.resets += 1

    def _solve(self, step, sigma, model_output, sample, integrate):
        self.calls.append((step, sigma))
        self.samples.append(sample)
        return integrate(0.5 * model_output)


def _install(cfg, family, sigmas, *stacked, step_index=0, config=None):
    sched = _Scheduler(sigmas, step_index, config)
    tracker = SimpleNamespace(steps_done=[], events=[], per_stage=[])
    tracker.step_done = lambda: tracker.steps_done.append(len(tracker.steps_done))

    def emit(event):  # what the handle does with the sampler's StageSwitched event
        tracker.events.append(event)
        tracker.per_stage.append([p.stats() for p in stacked])
        for p in stacked:
            p.reset()

    tracker.emit = emit
    (b,) = cfg.install(_Adapter(family, sched), tracker)
    # what SADA does at install: the runtime knows it as the step solver
    tracker.step_solver = next((p for p in stacked if hasattr(p, "solve_flow_step")), None)
    return b, sched


def _velocity(i, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))


LINEAR8 = [1 - k / 8 for k in range(9)]  # S_k = 1 - k/8
PLAN8 = BottleneckSampling(stages=[(1.0, 0.25), (0.5, 0.5), (1.0, 0.25)], shift=(1.0, 2.0, 3.0), renoise=(0.2, 0.4), seed=5)
# stage 1: steps 2-5, from S_2 + 0.2 (1 - S_2) = 0.8 to S_6 = 0.25 with shift 2 (u' = 1, 6/7, 2/3, 0.4, 0)
STAGE1 = [0.8, 0.25 + 0.55 * 6 / 7, 0.25 + 0.55 * 2 / 3, 0.25 + 0.55 * 0.4, 0.25]
# stage 2: steps 6-7, from S_6 + 0.4 (1 - S_6) = 0.55 to S_8 = 0 with shift 3 (u' = 1, 3/4, 0)
STAGE2 = [0.55, 0.55 * 0.75, 0.0]


def test_plan_sigmas_sizes_and_steps():
    b, sched = _install(PLAN8, "sd3", LINEAR8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"hidden_states": x, "timestep": torch.tensor([1000.0])}
    assert b.stage_inputs(kwargs) is kwargs  # stage 0: the pipeline's own inputs
    stages = b.stats()["stages"]
    assert [s["steps"] for s in stages] == [2, 4, 2]
    assert [s["latent_size"] for s in stages] == [[8, 8], [4, 4], [8, 8]]
    assert [s.begin for s in b.plan] == [0, 2, 6]
    assert b.plan[0].sigmas == pytest.approx([1.0, 0.875, 0.75])
    assert b.plan[1].sigmas == pytest.approx(STAGE1)
    assert b.plan[2].sigmas == pytest.approx(STAGE2)
    assert stages[1]["sigmas"] == [round(s, 4) for s in b.plan[1].sigmas]
    # odd full sizes: only the low-resolution stage is rounded
    b2, _ = _install(BottleneckSampling(), "sd3", [1 - k / 5 for k in range(6)])
    b2.stage_inputs({"hidden_states": torch.zeros(1, 4, 7, 10), "timestep": torch.tensor([1.0])})
    assert [s.size for s in b2.plan] == [(7, 10), (4, 4), (7, 10)] and [s.steps for s in b2.plan] == [1, 3, 1]


def test_stage_switch_math_image_latents():
    """Every step of an 8-step, 3-stage plan on a stand-in scheduler, against the formulas."""
    b, sched = _install(PLAN8, "sd3", LINEAR8)
    assert b.stats() == {}  # no call yet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = []
    for i in range(8):
        kwargs = b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1000.0 * LINEAR8[i]])})
        timesteps.append(float(kwargs["timestep"]))
        v = _velocity(i, x.shape)
        out = sched.step(v, torch.tensor(1000.0 * LINEAR8[i]), x).prev_sample
        if i == 0:  # stage 0, not its last step: the scheduler's own step
            expected = x + 0.5 * v + 100.0
        elif i == 1:  # switch 0 -> 1 at sigma S_1 = 0.875: x0, down to 4 x 4, re-noised to 0.8
            x0 = resize_latents(x - 0.875 * v, (4, 4))
            noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5 + 7919))
            expected = (1 - 0.8) * x0 + 0.8 * noise
        elif i < 5:  # Euler steps on stage 1's own sigmas
            expected = x + (STAGE1[i - 1] - STAGE1[i - 2]) * v
        elif i == 5:  # switch 1 -> 2 at stage 1's last sigma: x0, up to 8 x 8, re-noised to 0.55
            x0 = resize_latents(x - STAGE1[3] * v, (8, 8))
            noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5 + 2 * 7919))
            expected = (1 - 0.55) * x0 + 0.55 * noise
        else:  # the last stage ends at S_8 = 0 without a switch
            expected = x + (STAGE2[i - 5] - STAGE2[i - 6]) * v
        assert out.shape == expected.shape and out.dtype == torch.float32, i
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, msg=f"step {i}")
        x = out
    # the denoiser's timestep: the pipeline's in stage 0, the stage's own sigma x 1000 after
    expected_t = [1000.0, 875.0] + [1000 * s for s in STAGE1[:4]] + [1000 * s for s in STAGE2[:2]]
    assert timesteps == pytest.approx(expected_t, rel=1e-6)
    assert sched.own_steps == [1000.0] and sched._step_index == 8
    # the 7 steps it integrated itself are reported to the runtime as steps (the scheduler's own step
    # reports itself through the runtime's wrapper)
    assert len(b.tracker.steps_done) == 7
    stats = b.stats()
    assert (stats["steps_taken"], stats["denoiser_calls"]) == (8, 8)
    # two resolution switches, announced to the runtime as events (to stage 1 at 4 x 4, stage 2 at 8 x 8)
    assert b.tracker.events == [StageSwitched(1, (4, 4)), StageSwitched(2, (8, 8))]
    assert all(e.source is b for e in b.tracker.events)
    assert stats["plugin"] == repr(PLAN8)
    with pytest.raises(RuntimeError, match="pipeline step 8 is past the plan of 8 steps"):
        b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([0.0])})
    final = b.stats()
    b.reset()  # a new call: the last call's statistics stay readable
    assert b.plan is None and b.i == 0 and b.stats() == final and final["steps_taken"] == 8
    assert b.noise_seed is None


def test_stage_switch_derives_the_noise_seed_and_keeps_dtype():
    plan = BottleneckSampling(stages=[(1.0, 0.25), (0.5, 0.5), (1.0, 0.25)], shift=1.0, renoise=0.0)
    b, sched = _install(plan, "sd3", [1 - k / 4 for k in range(5)], step_index=None)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)).half()
    b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0])})
    v = _velocity(0, x.shape).half()
    (out,) = sched.step(v, 1.0, x, return_dict=False)  # stage 0 has one step: it switches at once
    seed = _seed_from(x)
    assert b.noise_seed == seed
    x0 = resize_latents(x.float() - 1.0 * v.float(), (2, 2))
    noise = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed((seed + 7919) % 2**63))
    expected = (1 - 0.75) * x0 + 0.75 * noise  # renoise 0: the next stage starts at S_1 = 0.75
    assert out.dtype == torch.float16 and sched._step_index is None
    torch.testing.assert_close(out, expected.half())


def test_stage_switch_math_flux_tokens():
    plan = BottleneckSampling(seed=3)  # 5 steps: 1 + 3 + 1
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    b, sched = _install(plan, "flux", sigmas)
    # an 8 x 4 latent: 4 x 2 tokens of 4 channels x 2 x 2 (16 features)
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    ids = flux_positions((4, 2), torch.device("cpu"), torch.float64)
    assert ids.dtype == torch.float64
    extra = torch.cat([torch.full((3, 3), 7.0, dtype=torch.float64), ids])  # other tokens first: the image's are the last 8
    b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0]), "img_ids": extra})
    assert b.full_size == (8, 4) and [s.size for s in b.plan] == [(8, 4), (4, 2), (8, 4)]
    # stage 1 from 0.8 + 0.1 * 0.2 = 0.82 to 0.2 with shift 2; stage 2 from 0.2 + 0.1 * 0.8 = 0.28 to 0
    assert b.plan[1].sigmas == pytest.approx([0.82, 0.2 + 0.62 * 0.8, 0.2 + 0.62 * 0.5, 0.2])
    assert b.plan[2].sigmas == pytest.approx([0.28, 0.0])
    v = _velocity(0, x.shape)
    out = sched.step(v, 1.0, x).prev_sample  # stage 0 is one step: switch at sigma 1.0
    x0 = pack_flux(resize_latents(unpack_flux(x - 1.0 * v, (4, 2)), (4, 2)))
    noise = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(3 + 7919))
    assert out.shape == (1, 2, 16)
    torch.testing.assert_close(out, 0.18 * x0 + 0.82 * noise, rtol=1e-6, atol=1e-6)
    # stage 1: Flux takes sigma itself as the timestep, and the positions of a 2 x 1 token grid
    kwargs = b.stage_inputs({"hidden_states": out, "timestep": torch.tensor([0.8]), "img_ids": ids})
    assert float(kwargs["timestep"]) == pytest.approx(0.82)
    assert torch.equal(kwargs["img_ids"], torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    assert kwargs["img_ids"].dtype == torch.float64
    # the switch back up: unpacked on the 2 x 1 token grid, resized to 8 x 4, packed
    for j in range(3):
        v = _velocity(j + 1, out.shape)
        last = out
        out = sched.step(v, 1.0, out).prev_sample
    x0 = pack_flux(resize_latents(unpack_flux(last - b.plan[1].sigmas[2] * v, (2, 1)), (8, 4)))
    noise = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(3 + 2 * 7919))
    torch.testing.assert_close(out, 0.72 * x0 + 0.28 * noise, rtol=1e-6, atol=1e-6)
    # batched (3-D) img_ids are read from the first element
    b.reset()
    batched = torch.stack([ids, torch.zeros_like(ids)])
    b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0]), "img_ids": batched})
    assert b.full_size == (8, 4)
    wrong = flux_positions((2, 5), torch.device("cpu"), torch.float32)[-8:]  # 5 columns, 2 rows: 10 positions
    for bad, match in (
        (None, r"^BottleneckSampling: Flux denoiser called without img_ids$"),
        (wrong, r"^BottleneckSampling: Flux img_ids describe a \(2, 5\) grid but there are 8 image tokens "
                r"\(extra conditioning tokens are not supported\)$"),
    ):
        b.reset()
        with pytest.raises(ValueError, match=match):
            b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0]), "img_ids": bad})
    with pytest.raises(ValueError, match=r"^BottleneckSampling: the denoiser must be called with hidden_states= and timestep=$"):
        b.stage_inputs({"hidden_states": x})


def test_pipeline_step_paths_and_scheduler_bookkeeping():
    # before the first denoiser call (no plan) and with a one-stage plan: the scheduler's own step,
    # with every argument passed on (positional return_dict included)
    b, sched = _install(BottleneckSampling(stages=[(1.0, 1.0)]), "sd3", [1.0, 0.5, 0.0])
    x, v = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    (out,) = sched.step(v, 7.0, x, False)
    assert torch.equal(out, x + 101.0) and sched.own_steps == [7.0]
    b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0])})
    (out,) = sched.step(v, 8.0, x, False)
    assert torch.equal(out, x + 101.0) and sched.own_steps == [7.0, 8.0]
    (out,) = sched.step(v, 9.0, x, return_dict=False)  # the plan's last step too
    assert torch.equal(out, x + 101.0) and sched.own_steps == [7.0, 8.0, 9.0]
    # stage 0 with three steps: its first two are the scheduler's, and the step counter advances
    plan = BottleneckSampling(stages=[(1.0, 0.5), (0.5, 0.25), (1.0, 0.25)], seed=1)
    b, sched = _install(plan, "sd3", [1 - k / 6 for k in range(7)], config={"num_train_timesteps": 500})
    del sched._step_index  # a scheduler without a step index
    x = torch.zeros(1, 1, 4, 4)
    b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0])})
    (out,) = sched.step(v[:, :, :1, :1].expand(1, 1, 4, 4), 1.0, x, return_dict=False)
    assert b.i == 1 and torch.equal(out, x + 101.0)
    sched.step(v.new_zeros(1, 1, 4, 4), 1.0, x)
    assert b.i == 2 and len(sched.own_steps) == 2
    sched.step(v.new_zeros(1, 1, 4, 4), 1.0, x)  # the switch: our own step
    assert b.i == 3 and len(sched.own_steps) == 2 and not hasattr(sched, "_step_index")
    # the timestep follows the scheduler's num_train_timesteps (1000 when it has none)
    kwargs = b.stage_inputs({"hidden_states": torch.zeros(1, 1, 2, 2), "timestep": torch.tensor([1.0])})
    assert float(kwargs["timestep"]) == pytest.approx(500 * b.plan[1].sigmas[0])
    b2, _ = _install(plan, "sd3", [1 - k / 6 for k in range(7)], config={})
    b2.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0])})
    b2.i = 3
    kwargs = b2.stage_inputs({"hidden_states": torch.zeros(1, 1, 2, 2), "timestep": torch.tensor([1.0])})
    assert float(kwargs["timestep"]) == pytest.approx(1000 * b2.plan[1].sigmas[0])


def test_noise_seed_wraps_modulo_2_63():
    plan = BottleneckSampling(stages=[(1.0, 0.5), (0.5, 0.25), (1.0, 0.25)], seed=2**63 - 1)  # 2 + 1 + 1 steps
    b, sched = _install(plan, "sd3", [1 - k / 4 for k in range(5)])
    x = torch.zeros(1, 1, 4, 4)
    b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0])})
    sched.step(x, 1.0, x)
    out = sched.step(x, 1.0, x).prev_sample  # x0 = 0: only the noise remains, at the next stage's start
    start = b.plan[1].sigmas[0]
    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(7918))  # (2**63 - 1 + 7919) mod 2**63
    torch.testing.assert_close(out, start * noise)


def test_reset_follows_a_swapped_scheduler():
    b, old = _install(PLAN8, "sd3", LINEAR8)
    assert "step" in vars(old)
    new = _Scheduler(LINEAR8)
    b.adapter.pipe.scheduler = new
    b.reset()
    assert "step" not in vars(old) and "step" in vars(new) and b.scheduler is new
    b.adapter.pipe.scheduler = None  # no scheduler at all: keep the one we have
    b.reset()
    assert b.scheduler is new and "step" in vars(new)
    b.remove()
    assert "step" not in vars(new) and b.scheduler is None


def test_video_latents_switch_per_frame():
    plan = BottleneckSampling(stages=[(1.0, 0.5), (0.5, 0.25), (1.0, 0.25)], seed=0)
    b, sched = _install(plan, "wan", [1 - k / 4 for k in range(5)])
    x = torch.randn(1, 2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1000.0])})
    assert [s.size for s in b.plan] == [(8, 8), (4, 4), (8, 8)] and [s.steps for s in b.plan] == [2, 1, 1]
    sched.step(_velocity(0, x.shape), 1000.0, x)
    v = _velocity(1, x.shape)
    out = sched.step(v, 750.0, x).prev_sample
    x0 = resize_latents(x - 0.75 * v, (4, 4))
    start = 0.5 + 0.1 * 0.5
    noise = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(7919))
    assert out.shape == (1, 2, 3, 4, 4)
    torch.testing.assert_close(out, (1 - start) * x0 + start * noise, rtol=1e-6, atol=1e-6)


def test_stacked_plugins_reset_at_switches_and_sada_sees_every_stage_step():
    cache, sada = _Stacked(), _Stacked(solve=True)
    b, sched = _install(PLAN8, "sd3", LINEAR8, cache, sada)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(8):
        b.stage_inputs({"hidden_states": x, "timestep": torch.tensor([1.0])})
        v = _velocity(i, x.shape)
        out = sched.step(v, 1.0, x).prev_sample
        assert i == 0 or sada.samples[-1] is x
        if i in (2, 3, 6):  # Euler with the velocity SADA handed back (0.5 v)
            sig = STAGE1 if i < 5 else STAGE2
            j = i - (2 if i < 5 else 6)
            torch.testing.assert_close(out, x + (sig[j + 1] - sig[j]) * 0.5 * v)
        x = out
    # SADA follows every step the sampler integrates itself, in pipeline step indices, with the stage's sigma
    assert [s for s, _ in sada.calls] == [1, 2, 3, 4, 5, 6, 7]
    assert [sig for _, sig in sada.calls] == pytest.approx([0.875, *STAGE1[:4], *STAGE2[:2]])
    # both stacked plugins reset at the two switches; their statistics are kept per finished stage
    assert cache.resets == 2 and sada.resets == 2
    assert b.tracker.per_stage == [[{"resets_before": 0}] * 2, [{"resets_before": 1}] * 2]


def test_install_rules():
    sched = _Scheduler(LINEAR8)
    tracker = SimpleNamespace(installed=[])
    for family in ("flux", "sd3", "wan", "hunyuan_video"):
        assert isinstance(BottleneckSampling().install(_Adapter(family, sched), tracker)[0], _Bottleneck)
    for adapter in (_Adapter("sana", sched), _Adapter("sd3", sched, flow=False), _Adapter("sd", sched, flow=False)):
        with pytest.raises(diffboost.UnsupportedPipelineError, match="BottleneckSampling supports flow-matching"):
            BottleneckSampling().install(adapter, tracker)
    message = "BottleneckSampling supports flow-matching ['flux', 'hunyuan_video', 'sd3', 'wan'] pipelines; got SimpleNamespace (family sana, scheduler _Scheduler)"
    with pytest.raises(diffboost.UnsupportedPipelineError, match=f"^{re.escape(message)}$"):
        BottleneckSampling().install(_Adapter("sana", sched), tracker)
    message = "BottleneckSampling does not support Wan pipelines with expand_timesteps=True (per-token timesteps)"
    with pytest.raises(diffboost.UnsupportedPipelineError, match=f"^{re.escape(message)}$"):
        BottleneckSampling().install(_Adapter("wan", sched, expand_timesteps=True), tracker)
    assert isinstance(BottleneckSampling().install(_Adapter("wan", sched, expand_timesteps=False), tracker)[0], _Bottleneck)
