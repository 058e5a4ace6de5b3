"""SADA (step-wise): exactness when the criterion cannot fire, real skipping inside the acceleration
range, scheduler state, CFG layouts, per-call statistics, stacking with TaylorSeer, validation."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

import diffboost
from diffboost import SADA, TaylorSeer, UnsupportedPipelineError
from diffboost.samplers.sada import Coords, lagrange
from factories import FAMILIES, run

STEPS = 8
SKIPPING = SADA(acc_range=(3, STEPS), max_interval=2, lagrange_step=1000)


def _scheduler(pipe, name):
    flow = type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    if name == "euler" and not flow:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    elif name == "dpm":
        if flow:
            pipe.scheduler = DPMSolverMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            )
        else:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    elif name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


# flux's pipeline passes custom sigmas, which DPMSolverMultistepScheduler does not accept
CASES = [
    ("flux", "euler"),
    ("sd3", "euler"),
    ("sd3", "dpm"),
    ("sd", "euler"),
    ("sd", "dpm"),
    ("sd", "ddim"),
    ("sdxl", "euler"),
    ("sdxl", "dpm"),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    family, sched = request.param
    pipe = _scheduler(FAMILIES[family](), sched)
    return family, pipe, run(pipe, family, num_inference_steps=STEPS)


def _skipping(pipe):
    """The criterion-driven config; on the random-init SD/SDXL UNets with DPM++ 2M the criterion never
    fires (mean(m) stays > 0 at 8-20 steps), so there the skipping machinery is driven by a schedule."""
    if type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.prediction_type != "flow_prediction":
        return SADA(schedule=(3, 4, 6), max_interval=2)
    return SKIPPING


def _sada_stats(pipe):
    return [s for s in diffboost.describe(pipe)["last_call"] if "skipped" in s][0]


def test_never_firing_is_bit_identical(case):
    family, pipe, base = case
    for plugin in (SADA(acc_range=(0, 0)), SADA(acc_range=(5, 5), lagrange_step=0), SADA(schedule=())):
        assert plugin.never_skips()
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, family, num_inference_steps=STEPS)
            stats = _sada_stats(pipe)
        assert torch.equal(out, base), f"{family}: {plugin} changed the output"
        assert stats["skipped"] == 0 and stats["steps"] == STEPS and stats["denoiser_calls_saved"] == 0


def test_skipping_in_range_and_remove_restores(case):
    family, pipe, base = case
    scheduler = pipe.scheduler
    handle = diffboost.apply(pipe, _skipping(pipe))
    out = run(pipe, family, num_inference_steps=STEPS)
    stats = _sada_stats(pipe)
    step_index = getattr(pipe.scheduler, "step_index", None)
    handle.remove()
    assert stats["skipped"] > 0, f"{family}: nothing skipped: {stats}"
    assert all(3 <= k < STEPS for k in stats["skipped_steps"])
    assert stats["denoiser_calls_saved"] == stats["skipped"]  # one denoiser call per step (batched CFG)
    # never more than max_interval skips in a row
    runs, prev = 0, None
    for k in stats["skipped_steps"]:
        runs = runs + 1 if prev == k - 1 else 1
        assert runs <= 2
        prev = k
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.isfinite(out.float()).all() and not torch.equal(out, base)
    # the scheduler ran every step itself
    if step_index is not None:
        assert step_index == STEPS
    # remove() restores the exact pipeline
    assert pipe.scheduler is scheduler and "step" not in vars(scheduler)
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)


def test_curvature_criterion(case):
    """criterion="curvature": a tolerance no step meets is bit-identical; a tolerance every step meets
    skips in runs of exactly max_interval inside acc_range; in between, skips are bounded by kappa."""
    family, pipe, base = case
    with diffboost.accelerated(pipe, SADA(acc_range=(3, STEPS), criterion="curvature", tolerance=1e-9)):
        assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)
        assert _sada_stats(pipe)["skipped"] == 0
    with diffboost.accelerated(pipe, SADA(acc_range=(3, STEPS), max_interval=2, lagrange_term=0,
                                          criterion="curvature", tolerance=10.0)):
        out = run(pipe, family, num_inference_steps=STEPS)
        stats = _sada_stats(pipe)
    # steps 0-2 build the trajectory; then two skipped, one real, ...
    assert stats["skipped_steps"] == [3, 4, 6, 7], stats
    assert torch.isfinite(out.float()).all() and not torch.equal(out, base)


@pytest.mark.parametrize("flow", [True, False])
def test_curvature_kappa_is_the_worst_sample(flow):
    from diffboost.samplers.sada import Point, _kappa, extrapolated_x0

    g = torch.Generator().manual_seed(0)
    pts = [Point(i, torch.randn(2, 4, generator=g), 3.0 - i, torch.randn(2, 4, generator=g)) for i in range(3)]
    if flow:  # kappa is the relative second difference
        err = pts[2].f - 2 * pts[1].f + pts[0].f
    else:  # the drift implied by the skip approximation, back-tested on the newest step
        err = (pts[2].y - extrapolated_x0(pts[0], pts[1], pts[2].y, pts[2].s, False)) / pts[2].s - pts[2].f
    x0 = pts[2].y - pts[2].s * pts[2].f
    expect = max(float(1.0 * err[b].norm() / x0[b].norm()) for b in range(2))  # |s_2 - s_1| = 1
    assert abs(_kappa(pts, flow) - expect) < 1e-5
    # an exactly linear drift is predicted exactly by the flow extrapolation
    lin = [Point(i, torch.zeros(1, 3), 1.0, torch.full((1, 3), float(i + 1))) for i in range(3)]
    assert _kappa(lin, True) == 0.0


def test_fixed_schedule_and_lagrange_mode(case):
    family, pipe, base = case
    with diffboost.accelerated(pipe, SADA(schedule=(4, 6))):
        fixed = run(pipe, family, num_inference_steps=STEPS)
        assert _sada_stats(pipe)["skipped_steps"] == [4, 6]
    with diffboost.accelerated(pipe, SADA(schedule=(4, 6), lagrange_int=1, lagrange_term=3, lagrange_step=0)):
        lag = run(pipe, family, num_inference_steps=STEPS)
        stats = _sada_stats(pipe)
    assert stats["lagrange_steps"] == [4, 6]
    for out in (fixed, lag):
        assert torch.isfinite(out.float()).all() and not torch.equal(out, base)
    assert not torch.equal(fixed, lag)


def test_calls_steps_batch_and_callbacks(case):
    """Changing step counts, batch 2 and a step-end callback on one patched pipeline; state resets."""
    family, pipe, base = case
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(i)
        return {}

    with diffboost.accelerated(pipe, _skipping(pipe)):
        first = run(pipe, family, num_inference_steps=STEPS)
        first_stats = _sada_stats(pipe)
        run(pipe, family, num_inference_steps=5)
        assert _sada_stats(pipe)["steps"] == 5
        batch = run(pipe, family, num_inference_steps=STEPS, prompt=["a red circle", "a blue square"])
        cb = run(pipe, family, num_inference_steps=STEPS, callback_on_step_end=callback)
        again = run(pipe, family, num_inference_steps=STEPS)
        stats = _sada_stats(pipe)
    assert torch.equal(first, again) and torch.equal(first, cb), "state leaked between calls"
    assert stats == first_stats
    assert batch.shape[0] == 2 * first.shape[0] and torch.isfinite(batch.float()).all()
    assert seen == list(range(STEPS))  # callbacks run on skipped steps too


def test_stacks_with_taylorseer_without_double_counting(case):
    family, pipe, base = case
    with diffboost.accelerated(pipe, TaylorSeer(interval=2, warmup=2), _skipping(pipe)) as handle:
        out = run(pipe, family, num_inference_steps=STEPS)
        stats = diffboost.describe(pipe)["last_call"]
        kinds = [type(p).__name__ for p in handle.plugins]
    assert kinds == ["TaylorSeer", "SADA"]
    sada = [s for s in stats if "skipped" in s][0]
    cache = [s for s in stats if "branches" in s][0]
    assert sada["skipped"] > 0
    for branch in cache["branches"].values():
        # the cache sees only the denoiser calls SADA let through
        assert branch["steps"] + sada["skipped"] == STEPS
        assert branch["full"] + branch["forecast"] == branch["steps"]
        assert branch["forecast"] > 0
    assert torch.isfinite(out.float()).all()
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)


def test_flux_true_cfg_skips_both_branches():
    pipe = FAMILIES["flux"]()
    kw = dict(num_inference_steps=STEPS, true_cfg_scale=2.0, negative_prompt="blurry")
    base = run(pipe, "flux", **kw)
    with diffboost.accelerated(pipe, SADA(schedule=(3, 5))):
        out = run(pipe, "flux", **kw)
        stats = _sada_stats(pipe)
    assert stats["skipped_steps"] == [3, 5]
    assert stats["denoiser_calls_saved"] == 4  # cond and uncond of both skipped steps
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_scheduler_swapped_after_apply_is_followed():
    pipe = FAMILIES["sd"]()
    with diffboost.accelerated(pipe, SADA(schedule=(4,))):
        old = pipe.scheduler
        pipe.scheduler = EulerDiscreteScheduler.from_config(old.config)
        run(pipe, "sd", num_inference_steps=STEPS)
        stats = _sada_stats(pipe)
        assert "step" not in vars(old)
    assert stats["scheduler"] == "EulerDiscreteScheduler" and stats["skipped_steps"] == [4]
    assert "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(acc_range=(5, 3)), ValueError),
        (dict(acc_range=(-1, 3)), ValueError),
        (dict(acc_range=(1, 2, 3)), TypeError),
        (dict(acc_range="10-47"), TypeError),
        (dict(acc_range=(1.5, 3)), TypeError),
        (dict(max_interval=0), ValueError),
        (dict(max_interval=2.0), TypeError),
        (dict(lagrange_int=0), ValueError),
        (dict(lagrange_term=1), ValueError),
        (dict(lagrange_term=9), ValueError),
        (dict(lagrange_step=-1), ValueError),
        (dict(schedule=(3, -1)), ValueError),
        (dict(criterion="magnitude"), ValueError),
        (dict(criterion="curvature", tolerance=0.0), ValueError),
        (dict(criterion="curvature", tolerance=float("nan")), ValueError),
        (dict(tolerance="0.1"), TypeError),
    ],
)
def test_invalid_hyperparameters(kwargs, error):
    with pytest.raises(error, match="SADA"):
        SADA(**kwargs)


def test_unsupported_scheduler_is_a_clear_error():
    pipe = FAMILIES["sd"]()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(UnsupportedPipelineError, match="PNDMScheduler"):
        diffboost.apply(pipe, SADA())
    assert not hasattr(pipe, "_diffboost_handle") and "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize("kind", ["flow", "ve", "vp"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_coordinates_round_trip(kind, prediction):
    torch.manual_seed(0)
    s = 0.7
    alpha = 1 / (1 + s * s) ** 0.5
    c = Coords(kind, s, alpha, s * alpha, prediction)
    sample, m = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x0 = c.x0(m, sample)
    assert torch.allclose(c.model_output(x0, sample), m, atol=1e-5)
    # y = x0 + s * eps in normalised coordinates
    f = (c.y(sample) - x0) / s
    assert torch.allclose(x0 + s * f, c.y(sample), atol=1e-5)


def test_lagrange_is_exact_on_polynomials():
    anchors = [(n, torch.full((2,), float(n**2 - 3 * n + 1))) for n in (0, 4, 8)]
    for k in (2, 9, 11):
        assert torch.allclose(lagrange(anchors, k), torch.full((2,), float(k**2 - 3 * k + 1)))


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm"])
def test_zero_terminal_snr_schedulers(name):
    """v-prediction with zero terminal SNR (alpha_bar = 0 at the first step): SADA reads it without a
    division by zero, is exact when it never skips and finite when it skips."""
    pipe = FAMILIES["sd"]()
    cfg = dict(pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
               timestep_spacing="trailing")
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    pipe.scheduler = cls.from_config(cfg)
    base = run(pipe, "sd", num_inference_steps=STEPS)
    with diffboost.accelerated(pipe, SADA(acc_range=(0, 0))):
        assert torch.equal(run(pipe, "sd", num_inference_steps=STEPS), base)
    with diffboost.accelerated(pipe, SADA(schedule=(3, 5), criterion="curvature")):
        out = run(pipe, "sd", num_inference_steps=STEPS)
        assert _sada_stats(pipe)["skipped_steps"] == [3, 5]
    assert torch.isfinite(out.float()).all() and not torch.equal(out, base)
