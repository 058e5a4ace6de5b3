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
SKIPPING = SADA(acc_range=(3, STEPS), max_consecutive_skips=2, lagrange_step=1000)


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
        return SADA(schedule=(3, 4, 6), max_consecutive_skips=2)
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
    # never more than max_consecutive_skips skips in a row
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
    skips in runs of exactly max_consecutive_skips inside acc_range; in between, skips are bounded by kappa."""
    family, pipe, base = case
    with diffboost.accelerated(pipe, SADA(acc_range=(3, STEPS), criterion="curvature", tolerance=1e-9)):
        assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)
        assert _sada_stats(pipe)["skipped"] == 0
    with diffboost.accelerated(pipe, SADA(acc_range=(3, STEPS), max_consecutive_skips=2, lagrange_term=0,
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
        (dict(max_consecutive_skips=0), ValueError),
        (dict(max_consecutive_skips=2.0), TypeError),
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


# ----------------------------------------------------------------------------------------------
# the decision rule and the approximations on constructed trajectories: the scheduler's own step
# runs under SADA's step wrapper, with a stub model output per step instead of a denoiser
# ----------------------------------------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from diffboost.plugins.base import PluginKind  # noqa: E402
from diffboost.plugins.runtime import CallStarted, CallTracker  # noqa: E402
from diffboost.samplers.sada import (  # noqa: E402
    ADAMS,
    CallState,
    Point,
    SADARuntime,
    _kappa,
    _prediction,
    check_scheduler,
    extrapolated_x0,
    read_kind,
    read_step,
)

#: flow sigmas 1, 15/16, ..., 7/16: with small integer velocities every operation of the solver and
#: of SADA (x0 = y - s v, f = (y - x0) / s, 2 f_n - f_{n-1}) is exact in float32, so m after a skip
#: is exactly 0 and the decisions are exact
DYADIC = [1 - i / 16 for i in range(10)]


class _Tokens:
    """Stands in for TokenSparsity so that the runtime plans tokens (``_plan_tokens``)."""

    def reset(self):
        pass

    def remove(self):
        pass

    def stats(self):
        return {}


def _drive(scheduler, plugin, drift, steps=10, sigmas=None, shape=(1, 1, 1, 1), start=1.0, tokens=False, keywords=False):
    """One pipeline call of ``scheduler`` under SADA's step wrapper. At step n the 'denoiser' returns
    ``drift(n)`` (a number or a tensor: the velocity for flow matching, eps otherwise).

    Returns the runtime, the model outputs the scheduler's own ``step`` received, the states x_n it was
    given, and per step (after it) the runtime's ``(skip next, last_m, kappa, token_pruned, token_map)``.
    """
    used, states, log = [], [], []
    original = scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        used.append(model_output.clone())
        states.append(sample.clone())
        return original(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = spy
    pipe = SimpleNamespace(scheduler=scheduler)
    tracker = CallTracker(pipe)
    rt = SADARuntime(plugin, SimpleNamespace(pipe=pipe), tracker)
    tracker.subscribe(CallStarted, lambda event: rt.reset())
    if tokens:
        rt.tokens = _Tokens()
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas)
    else:
        scheduler.set_timesteps(steps)
    x = torch.full(shape, float(start))
    for n, t in enumerate(scheduler.timesteps):
        out = drift(n)
        out = out if isinstance(out, torch.Tensor) else torch.full(shape, float(out))
        if keywords:  # pipelines may pass everything by keyword
            x = scheduler.step(model_output=out, timestep=t, sample=x, return_dict=False)[0]
        else:
            x = scheduler.step(out, t, x, return_dict=False)[0]
        st = rt.state
        token_map = None if st.token_map is None else st.token_map.clone()
        log.append((st.skip_current, st.last_m, st.kappa, st.token_pruned, token_map))
    return rt, used, states, log


def _flow():
    return FlowMatchEulerDiscreteScheduler()


def _vals(tensors):
    return [float(t.flatten()[0]) for t in tensors]


@pytest.mark.parametrize(
    "drift, acc_range, max_consecutive_skips, skipped, velocities, last_m",
    [
        # v = n^2: m = -(second difference) = -2 < 0 -> skip; after a skip the drift is the linear
        # extrapolation (m = 0 exactly, still stable) until max_consecutive_skips; after 8 the real second
        # difference of (40, 55, 64) is -6: m = 6 > 0, step 9 is computed
        (lambda n: n * n, (3, 10), 2, [3, 4, 6, 7],
         [0, 1, 4, 7, 10, 25, 40, 55, 64, 81], [None, None, -2, 0, 0, -12, 0, 0, 6, 6]),
        (lambda n: n * n, (3, 10), 3, [3, 4, 5, 7, 8, 9],
         [0, 1, 4, 7, 10, 13, 36, 59, 82, 105], [None, None, -2, 0, 0, 0, -20, 0, 0, 0]),
        # the end of acc_range is exclusive, its start inclusive
        (lambda n: n * n, (3, 9), 3, [3, 4, 5, 7, 8],
         [0, 1, 4, 7, 10, 13, 36, 59, 82, 81], [None, None, -2, 0, 0, 0, -20, 0, 0, 0]),
        (lambda n: n * n, (4, 10), 2, [4, 5, 7, 8],
         [0, 1, 4, 9, 14, 19, 36, 53, 70, 81], [None, None, None, -2, 0, 0, -12, 0, 0, 0]),
        # m = 0 exactly (a linear drift) is stable: skip (the paper's m <= 0)
        (lambda n: n, (3, 10), 1, [3, 5, 7, 9],
         [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [None, None, 0, 0, 0, 0, 0, 0, 0, 0]),
        # m = +2 > 0 on every step: nothing skipped
        (lambda n: -n * n, (3, 10), 4, [],
         [0, -1, -4, -9, -16, -25, -36, -49, -64, -81], [None, None, 2, 2, 2, 2, 2, 2, 2, 2]),
    ],
    ids=["quadratic", "max_consecutive_skips-3", "acc-end", "acc-start", "boundary-m-0", "unstable"],
)
def test_sign_rule_flow_known_trajectories(drift, acc_range, max_consecutive_skips, skipped, velocities, last_m):
    """Flow matching (Flux, SD3): m = -(f_n - 2 f_{n-1} + f_{n-2}); skip step n+1 when m <= 0, inside
    acc_range, at most max_consecutive_skips in a row; a skipped step gets the velocity 2 f_n - f_{n-1}."""
    plugin = SADA(acc_range=acc_range, max_consecutive_skips=max_consecutive_skips, lagrange_term=0)
    rt, used, _, log = _drive(_flow(), plugin, drift, sigmas=DYADIC)
    stats = rt.stats()
    assert stats["skipped_steps"] == skipped and stats["skipped"] == len(skipped)
    assert stats["steps"] == 10 and stats["mode"] == "flow" and stats["lagrange_steps"] == []
    assert _vals(used) == velocities  # exact: the extrapolated velocity on every skipped step
    assert [entry[1] for entry in log] == last_m
    assert [entry[0] for entry in log] == [k + 1 in skipped for k in range(10)]
    assert log[-1][0] is False  # no step 10 is planned


def test_sign_rule_whole_batch_decides_by_the_mean():
    """m is averaged over all elements of the batch: one element stable, one not; the mean decides."""
    for stable, expect in ((3.0, [3]), (1.0, [])):
        coef = torch.tensor([stable, -2.0]).view(2, 1, 1, 1)  # m per element: -2 * coef
        rt, _, _, log = _drive(_flow(), SADA(acc_range=(3, 4), max_consecutive_skips=1), lambda n: coef * n * n,
                               sigmas=DYADIC, shape=(2, 1, 1, 1))
        assert rt.stats()["skipped_steps"] == expect
        assert log[2][1] == -(stable - 2.0)


def _euler_like_m(f, s):
    """m after step 2 for a solver that is Euler in (y, s) (y_2 = y_1 + (s_2 - s_1) f_1), closed form:
    (y_1 - y_hat_1) (-(f_2 - 2 f_1 + f_0)) with y_1 - y_hat_1 = (s_2 - s_1)(5/8 f_2 - 1/4 f_1 - 3/8 f_0)."""
    return (s[2] - s[1]) * (5 / 8 * f[2] - 1 / 4 * f[1] - 3 / 8 * f[0]) * -(f[2] - 2 * f[1] + f[0])


def _eps_sigmas(name, scheduler):
    if name == "ddim":  # DDIM is Euler in (y = x / alpha, s = sigma / alpha)
        abar = scheduler.alphas_cumprod[scheduler.timesteps.long()].double()
        return (((1 - abar) / abar) ** 0.5).tolist()
    return scheduler.sigmas.double().tolist()


@pytest.mark.parametrize("name", ["euler", "ddim"])
@pytest.mark.parametrize("pattern, fires", [((2, 0, -1), True), ((1, 0, 0), True), ((0, 0, 1), False),
                                            ((0, 1, 0), False)])
def test_sign_rule_eps_solvers_closed_form(name, pattern, fires):
    """Euler and DDIM (eps): m = (y_{n-1} - y_hat_{n-1}) (g_n - 2 g_{n-1} + g_{n-2}), g = -eps, with the
    Adams estimate y_hat; on a skipped step the scheduler gets the eps whose x0 is the multistep
    estimate, which for an Euler-type solver is f_n + (s_k - s_n) / s_k (f_{n-1} - f_n)."""
    scheduler = EulerDiscreteScheduler() if name == "euler" else DDIMScheduler(clip_sample=False)
    drift = lambda n: pattern[n] if n < 3 else 0.5  # noqa: E731
    rt, used, _, log = _drive(scheduler, SADA(acc_range=(3, 4), max_consecutive_skips=1, lagrange_term=0), drift, steps=8)
    s = _eps_sigmas(name, scheduler)
    m = _euler_like_m(pattern, s)
    assert log[2][1] == pytest.approx(m, rel=1e-4, abs=1e-6)
    assert (m <= 0) == fires
    assert rt.stats()["skipped_steps"] == ([3] if fires else [])
    expect = pattern[2] + (s[3] - s[2]) / s[3] * (pattern[1] - pattern[2]) if fires else 0.5
    assert _vals(used)[3] == pytest.approx(expect, rel=1e-4, abs=1e-5)
    assert _vals(used)[4:] == [0.5] * 4


def _dpm_m_and_eps(states, sigmas, f):
    """m after step 2 and the eps handed to the scheduler on a skipped step 3, from the states the
    DPM++ solver produced (y = x sqrt(1 + s^2), s = the VE sigma)."""
    s = [float(v) for v in sigmas]
    y = [float(x.flatten()[0]) * (1 + s[i] ** 2) ** 0.5 for i, x in enumerate(states)]
    y_hat1 = y[2] - (s[2] - s[1]) * (5 / 8 * f[2] + 3 / 4 * f[1] - 3 / 8 * f[0])
    m = (y[1] - y_hat1) * -(f[2] - 2 * f[1] + f[0])
    f_hat = 2 * f[2] - f[1]
    y_hat3 = y[2] + (s[3] - s[2]) * (5 / 8 * f_hat + 3 / 4 * f[2] - 3 / 8 * f[1])
    return m, (y[3] - y_hat3) / s[3] + f[2]


@pytest.mark.parametrize("pattern, fires", [((2, 0, -1), True), ((-2, 0, 1), True), ((1, 0, 0), False),
                                            ((0, 1, 0), False)])
def test_sign_rule_dpm_multistep_fires_on_a_constructed_trajectory(pattern, fires):
    """DPM++ 2M (eps): the sign rule on states from the multistep solver itself; it fires (the test
    models never make it fire) and the skipped step gets the multistep estimate's eps."""
    drift = lambda n: pattern[n] if n < 3 else 0.5  # noqa: E731
    scheduler = DPMSolverMultistepScheduler()
    rt, used, states, log = _drive(scheduler, SADA(acc_range=(3, 4), max_consecutive_skips=1), drift, steps=8)
    m, eps = _dpm_m_and_eps(states, scheduler.sigmas, pattern)
    assert log[2][1] == pytest.approx(m, rel=1e-4)
    assert (m <= 0) == fires
    assert rt.stats()["skipped_steps"] == ([3] if fires else [])
    assert rt.stats()["mode"] == "eps" and rt.stats()["scheduler"] == "DPMSolverMultistepScheduler"
    assert _vals(used)[3] == pytest.approx(eps if fires else 0.5, rel=1e-4)


@pytest.mark.parametrize("sign, skipped", [(1, [3, 5, 7]), (-1, [])])
def test_sign_rule_dpm_flow_sigmas(sign, skipped):
    """DPM-Solver with flow sigmas (SD3 'dpm') is read as flow matching: m = -(second difference)."""
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    rt, _, _, log = _drive(scheduler, SADA(acc_range=(3, 8), max_consecutive_skips=1, lagrange_term=0),
                           lambda n: sign * n * n, steps=8)
    assert rt.stats()["mode"] == "flow"
    assert log[2][1] == pytest.approx(-2.0 * sign, rel=1e-4)
    assert rt.stats()["skipped_steps"] == skipped


def test_decide_boundaries_on_exact_points():
    """_decide on hand-built trajectories (exact values): m = 0 skips, the smallest m > 0 does not;
    the eps m of a constant eps is 0 (skip); steps at or past the call's end are never skipped."""
    rt, *_ = _drive(_flow(), SADA(acc_range=(3, 20), max_consecutive_skips=2), lambda n: 0.0, sigmas=DYADIC)
    z = torch.zeros(1, 2)

    def state(fs, in_a_row=0, ys=(0.0, 0.0, 0.0)):
        st = CallState()
        st.trajectory = [Point(i, z + ys[i], 1.0 - i / 4, torch.tensor([f])) for i, f in enumerate(fs)]
        st.in_a_row = in_a_row
        return st

    tiny = 2.0**-20
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), 3) is True  # m = 0
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0 - tiny]]), 3) is False  # mean m > 0
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0 + tiny]]), 3) is True  # mean m < 0
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], in_a_row=1), 3) is True
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], in_a_row=2), 3) is False
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), 9) is True
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), 10) is False  # num_steps = 10 < acc_range end
    assert rt._decide(state([[0.0, 0.0], [1.0, 1.0]]), 3) is False  # two drifts only
    st = state([[3.0, 3.0], [2.0, 2.0], [0.0, 0.0]])  # m = -(0 - 4 + 3) = 1
    assert rt._decide(st, 3) is False and st.last_m == 1.0
    # eps: constant eps, different states: second difference 0 -> m = 0 (stable)
    eps = _drive(EulerDiscreteScheduler(), SADA(acc_range=(3, 10)), lambda n: 0.0, steps=10)[0]
    st = state([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], ys=(3.0, 2.0, 1.0))
    assert eps._decide(st, 3) is True and st.last_m == 0.0
    # eps m in closed form on exact points: y_hat_1 = y_2 - (s_2 - s_1)(5/8 f_2 + 3/4 f_1 - 3/8 f_0)
    st = state([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], ys=(3.0, 2.0, 1.0))
    y_hat = 1.0 - (0.5 - 0.75) * (-3 / 8)
    assert float(eps._m(st).mean()) == pytest.approx((2.0 - y_hat) * -1.0)


def test_lagrange_mode_on_a_known_trajectory():
    """Lagrange mode: from lagrange_step on, a skipped step's x0 is the Lagrange polynomial (in the step
    index) through the last lagrange_term x0 anchors of real steps at least lagrange_int apart."""
    drift = lambda n: n * n  # noqa: E731

    def run_with(**kw):
        rt, used, states, _ = _drive(_flow(), SADA(acc_range=(3, 10), max_consecutive_skips=1, **kw), drift, sigmas=DYADIC)
        y = [float(x.flatten()[0]) for x in states]
        v = _vals(used)
        x0 = [y[n] - DYADIC[n] * v[n] for n in range(10)]
        kept.append(len(rt.state.anchors))
        return rt.stats(), v, y, x0

    kept = []

    # anchors every step (lagrange_int=1), two terms: linear extrapolation of x0 in the step index
    stats, v, y, x0 = run_with(lagrange_int=1, lagrange_term=2, lagrange_step=3)
    assert stats["skipped_steps"] == [3, 5, 7, 9] and stats["lagrange_steps"] == [3, 5, 7, 9]
    assert v[3] == pytest.approx((y[3] - (2 * x0[2] - x0[1])) / DYADIC[3], rel=1e-5)
    # step 3 was skipped, so it is no anchor: the line through the anchors at steps 2 and 4
    assert v[5] == pytest.approx((y[5] - (x0[4] + (x0[4] - x0[2]) / 2)) / DYADIC[5], rel=1e-5)
    # anchors at least 2 steps apart: 0 and 2, then 4, ...
    stats, v, y, x0 = run_with(lagrange_int=2, lagrange_term=2, lagrange_step=3)
    assert v[3] == pytest.approx((y[3] - (x0[2] + (x0[2] - x0[0]) / 2)) / DYADIC[3], rel=1e-5)
    # three terms: quadratic through anchors 0, 1, 2 at step 3: x0_0 - 3 x0_1 + 3 x0_2
    stats, v, y, x0 = run_with(lagrange_int=1, lagrange_term=3, lagrange_step=3)
    assert v[3] == pytest.approx((y[3] - (x0[0] - 3 * x0[1] + 3 * x0[2])) / DYADIC[3], rel=1e-5)
    # before lagrange_step the extrapolated velocity is used
    stats, v, y, x0 = run_with(lagrange_int=1, lagrange_term=2, lagrange_step=5)
    assert stats["lagrange_steps"] == [5, 7, 9] and v[3] == 2 * v[2] - v[1]
    stats, v, *_ = run_with(lagrange_int=1, lagrange_term=0, lagrange_step=0)
    assert stats["lagrange_steps"] == [] and v[3] == 2 * v[2] - v[1]
    assert kept == [2, 2, 3, 2, 2]  # the anchors kept: lagrange_term of them, at least two


def test_curvature_rule_on_a_known_trajectory():
    """criterion="curvature": kappa = |s_n - s_{n-1}| ||f_n - 2 f_{n-1} + f_{n-2}|| / ||x0_n|| (flow),
    recomputed on real steps only; the i-th skip in a row needs kappa i (i + 1) / 2 <= tolerance.
    Start 25/16, v = n^2: after step 2, kappa = (1/16) * 2 / |x0_2| = (1/16) * 2 / 2 = 1/16 exactly."""
    def run_with(tolerance):
        plugin = SADA(acc_range=(3, 10), max_consecutive_skips=10, lagrange_term=0, criterion="curvature",
                      tolerance=tolerance)
        rt, used, _, log = _drive(_flow(), plugin, lambda n: n * n, sigmas=DYADIC, start=25 / 16)
        return rt.stats()["skipped_steps"], [entry[2] for entry in log]

    skipped, kappas = run_with(3 / 16)  # i = 1: 1/16, i = 2: 3/16 (equal: skip), i = 3: 6/16 > 3/16
    assert kappas[2] == 1 / 16
    # step 5 is real: (7, 10, 25) -> 12 / 17 / 16; step 8: (40, 55, 64) -> 6 / (629 / 16) / 16
    assert kappas[3] == kappas[4] == 1 / 16 and kappas[5] == pytest.approx(12 / 17 / 16, rel=1e-6)
    assert kappas[8] == pytest.approx(6 / 629, rel=1e-6)
    assert skipped == [3, 4, 6, 7, 9]
    skipped, _ = run_with(3 / 16 * (1 - 1e-6))  # the second skip in a row needs 3 kappa <= tolerance
    assert skipped[:2] == [3, 5]
    skipped, _ = run_with(1 / 16 * (1 - 1e-6))  # not even one skip at step 3
    assert skipped[:1] != [3]


def test_token_plan_on_a_known_stability_map():
    """_plan_tokens: per-token m averaged over channels, maximised over the batch; pruned steps inside
    acc_range between full refreshes every max_consecutive_skips steps; never on a skipped step, and after one
    the last map computed from a real drift is used."""
    # per element m = -2 coef; channel means: batch 0 (2, -1), batch 1 (1, -1) -> m (-4, 2), (-2, 2)
    coef = torch.tensor([[[[1.0, -1.0]], [[3.0, -1.0]]], [[[0.0, 1.0]], [[2.0, -3.0]]]])  # (2, 2, 1, 2)
    drift = lambda n: coef * n * n  # noqa: E731
    expect_map = torch.tensor([[-2.0, 2.0]])

    def run_with(**kw):
        plugin = SADA(max_consecutive_skips=3, token_sparsity=True, **kw)
        rt, _, _, log = _drive(_flow(), plugin, drift, sigmas=DYADIC, shape=(2, 2, 1, 2), tokens=True)
        return rt.stats(), log

    stats, log = run_with(acc_range=(3, 10), schedule=())
    assert stats["skipped_steps"] == [] and stats["token_pruned_steps"] == [3, 4, 6, 7, 9]
    assert [entry[3] for entry in log] == [k + 1 in (3, 4, 6, 7, 9) for k in range(10)]
    assert torch.equal(log[2][4], expect_map)
    stats, _ = run_with(acc_range=(4, 10), schedule=())
    assert stats["token_pruned_steps"] == [4, 5, 7, 8]
    # a skipped step 3 is not pruned; step 4 uses the map of the real triple (0, 1, 2), not the
    # zero second difference of the extrapolated drift
    stats, log = run_with(acc_range=(3, 10), schedule=(3,))
    assert stats["skipped_steps"] == [3] and stats["token_pruned_steps"] == [4, 6, 7, 9]
    assert log[2][3] is False and log[2][4] is None and torch.equal(log[3][4], expect_map)
    # packed (3-D) latents have no 2-D map: nothing pruned
    rt, *_ = _drive(_flow(), SADA(acc_range=(3, 10), token_sparsity=True, schedule=()),
                    lambda n: torch.full((1, 4, 2), float(n * n)), sigmas=DYADIC, shape=(1, 4, 2), tokens=True)
    assert rt.stats()["token_pruned_steps"] == [] and rt.state.real_token_map is None


# ----------------------------------------------------------------------------------------------
# pure pieces: coordinates, scheduler reading, the approximations, config validation
# ----------------------------------------------------------------------------------------------


def test_coords_known_values():
    x, m = torch.tensor([2.0]), torch.tensor([0.5])
    flow = Coords("flow", 0.25)
    assert float(flow.x0(m, x)) == 2.0 - 0.25 * 0.5 and float(flow.model_output(torch.tensor([1.0]), x)) == 4.0
    assert float(flow.y(x)) == 2.0
    # alpha = 0.8, sigma_t = 0.6, s = 0.75
    vp = Coords("vp", 0.75, 0.8, 0.6, "epsilon")
    assert float(vp.y(x)) == pytest.approx(2.5)
    assert float(vp.x0(m, x)) == pytest.approx((2.0 - 0.6 * 0.5) / 0.8)
    assert float(vp.model_output(torch.tensor([1.0]), x)) == pytest.approx((2.0 - 0.8) / 0.6)
    ve = Coords("ve", 0.75, 0.8, 0.6, "epsilon")  # Euler: the latent is y already, x_vp = alpha y
    assert float(ve.y(x)) == 2.0
    assert float(ve.x0(m, x)) == pytest.approx((1.6 - 0.3) / 0.8)
    assert float(ve.model_output(torch.tensor([1.0]), x)) == pytest.approx((1.6 - 0.8) / 0.6)
    v = Coords("vp", 0.75, 0.8, 0.6, "v_prediction")
    assert float(v.x0(m, x)) == pytest.approx(0.8 * 2.0 - 0.6 * 0.5)
    assert float(v.model_output(torch.tensor([1.0]), x)) == pytest.approx((0.8 * 2.0 - 1.0) / 0.6)
    s = Coords("vp", 0.75, 0.8, 0.6, "sample")
    assert float(s.x0(m, x)) == 0.5 and float(s.model_output(torch.tensor([1.0]), x)) == 1.0


def test_read_step_known_values():
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    t = int(ddim.timesteps[3])
    abar = float(ddim.alphas_cumprod[t])
    c = read_step(ddim, ddim.timesteps[3])
    assert c == Coords("vp", (1 - abar) ** 0.5 / abar**0.5, abar**0.5, (1 - abar) ** 0.5, "epsilon")
    # zero terminal SNR: alpha_bar = 0 is clamped to 2**-24
    zero = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    zero.set_timesteps(10)
    c = read_step(zero, zero.timesteps[0])
    assert c.alpha == 2.0**-12 and c.sigma_t == (1 - 2.0**-24) ** 0.5 and c.prediction == "v_prediction"
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(10)
    c = read_step(euler, euler.timesteps[3])  # before the first step: read where the timestep is ...
    assert euler.step_index is None  # ... without initialising the scheduler's own index
    sigma = float(euler.sigmas[3])
    assert c == Coords("ve", sigma, 1.0 / (sigma * sigma + 1.0) ** 0.5, sigma / (sigma * sigma + 1.0) ** 0.5, "epsilon")
    euler.set_begin_index(5)  # img2img: the pipeline says where the schedule starts
    assert read_step(euler, euler.timesteps[3]).s == float(euler.sigmas[5])
    euler.step(torch.zeros(1), euler.timesteps[5], torch.zeros(1))
    euler.step(torch.zeros(1), euler.timesteps[6], torch.zeros(1))
    euler.set_begin_index(0)
    assert euler.step_index == 7  # an existing step index is used, not re-derived from the timestep
    c = read_step(euler, euler.timesteps[0])
    sigma = float(euler.sigmas[7])
    alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
    assert c == Coords("ve", sigma, alpha, sigma * alpha, "epsilon")
    dpm = DPMSolverMultistepScheduler()
    dpm.set_timesteps(10)
    c = read_step(dpm, dpm.timesteps[1])
    sigma = float(dpm.sigmas[1])
    assert (c.kind, c.s, c.alpha, c.prediction) == ("vp", sigma, 1.0 / (sigma * sigma + 1.0) ** 0.5, "epsilon")
    assert c.sigma_t == pytest.approx(sigma / (sigma * sigma + 1.0) ** 0.5, rel=1e-15)  # libm rounding differs by host
    flow = _flow()
    flow.set_timesteps(sigmas=DYADIC)
    assert read_step(flow, flow.timesteps[0]) == Coords("flow", 1.0, prediction="epsilon")
    dflow = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    dflow.set_timesteps(10)
    assert read_step(dflow, dflow.timesteps[0]).kind == "flow"
    assert [read_kind(s) for s in (flow, dflow, euler, dpm, ddim)] == ["flow", "flow", "ve", "vp", "vp"]
    assert _prediction(SimpleNamespace(config=SimpleNamespace())) == "epsilon"


def test_extrapolated_x0_closed_forms():
    p1 = Point(1, torch.tensor([3.0]), 0.75, torch.tensor([1.0]))
    p0 = Point(2, torch.tensor([2.0]), 0.5, torch.tensor([2.0]))
    y_k = torch.tensor([1.0])
    # flow: x0 = y_k - s_k (2 f_n - f_{n-1}) = 1 - 0.25 * 3
    assert float(extrapolated_x0(p1, p0, y_k, 0.25, True)) == 0.25
    # eps: y_hat = y_n + (s_k - s_n)(5/8 f_hat + 3/4 f_n - 3/8 f_{n-1}); x0 = y_hat - s_k f_n
    y_hat = 2.0 + (0.25 - 0.5) * (5 / 8 * 3.0 + 3 / 4 * 2.0 - 3 / 8 * 1.0)
    assert float(extrapolated_x0(p1, p0, y_k, 0.25, False)) == pytest.approx(y_hat - 0.25 * 2.0)
    assert ADAMS == (5 / 8, 3 / 4, -3 / 8) and sum(ADAMS) == 1.0


def test_kappa_known_value():
    pts = [Point(i, torch.tensor([[4.0, 0.0]]), 1.0 - i / 4, torch.tensor([[float(i * i), 0.0]])) for i in range(3)]
    # second difference (2, 0); x0_2 = 4 - 0.5 * 4 = 2; |s_2 - s_1| = 1/4
    assert _kappa(pts, True) == 0.25 * 2 / 2


def test_check_scheduler_messages():
    def fake(name, **config):
        return type(name, (), {"config": SimpleNamespace(**config)})()

    with pytest.raises(UnsupportedPipelineError) as err:
        check_scheduler(fake("PNDMScheduler"))
    assert str(err.value) == (
        "SADA does not support the scheduler PNDMScheduler; supported: FlowMatchEulerDiscreteScheduler, "
        "EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler (swap it with pipe.scheduler = "
        "EulerDiscreteScheduler.from_config(pipe.scheduler.config))"
    )
    with pytest.raises(UnsupportedPipelineError, match=r"^SADA does not support DDIMScheduler with prediction_type='x'$"):
        check_scheduler(fake("DDIMScheduler", prediction_type="x"))
    with pytest.raises(UnsupportedPipelineError, match=r"^SADA needs a deterministic Euler scheduler \(s_churn = 0\)$"):
        check_scheduler(fake("EulerDiscreteScheduler", s_churn=0.5))
    with pytest.raises(UnsupportedPipelineError, match=r"^SADA needs a deterministic DDIMScheduler \(stochastic_sampling=False\)$"):
        check_scheduler(fake("DDIMScheduler", stochastic_sampling=True))
    for ok in (fake("EulerDiscreteScheduler"), fake("EulerDiscreteScheduler", s_churn=0.0),
               fake("DDIMScheduler", s_churn=0.5), fake("DDIMScheduler", prediction_type="sample"),
               fake("DDIMScheduler", prediction_type="v_prediction"),
               fake("FlowMatchEulerDiscreteScheduler", prediction_type="x"),
               fake("DPMSolverMultistepScheduler", prediction_type="flow_prediction")):
        check_scheduler(ok)


def test_solve_flow_step_needs_flow_matching():
    rt, *_ = _drive(EulerDiscreteScheduler(), SADA(), lambda n: 0.0, steps=4)
    with pytest.raises(RuntimeError, match=r"^SADA.solve_flow_step needs a flow-matching scheduler$"):
        rt.solve_flow_step(0, 1.0, torch.zeros(1), torch.zeros(1), lambda v: v)


def test_solve_flow_step_counts_in_pipeline_steps():
    rt, *_ = _drive(_flow(), SADA(acc_range=(3, 10), max_consecutive_skips=1, lagrange_term=0), lambda n: 0.0, sigmas=DYADIC)
    rt.reset()
    x = torch.ones(1, 1)
    out = []
    for n in range(5):
        v = rt.solve_flow_step(n + 10, DYADIC[n], torch.full((1, 1), float(n * n)), x, lambda v: v)
        out.append(float(v))
    assert out == [0, 1, 4, 9, 16] and rt.state.skipped == [] and rt.state.step == 15  # outside acc_range
    rt.reset()
    for n in range(5):
        out[n] = float(rt.solve_flow_step(n, DYADIC[n], torch.full((1, 1), float(n * n)), x, lambda v: v))
    assert rt.state.skipped == [3] and out == [0, 1, 4, 7, 16]


def test_stats_reset_and_remove():
    rt, *_ = _drive(_flow(), SADA(acc_range=(3, 10), max_consecutive_skips=2, lagrange_term=0), lambda n: n * n, sigmas=DYADIC)
    scheduler = rt.scheduler
    stats = rt.stats()
    assert stats == {
        "plugin": repr(rt.cfg), "mode": "flow", "scheduler": "FlowMatchEulerDiscreteScheduler", "steps": 10,
        "skipped": 4, "skipped_steps": [3, 4, 6, 7], "lagrange_steps": [], "denoiser_calls_saved": 0,
        "saved_per_pass": {},  # driven without a denoiser: no call was saved
    }
    rt.reset()  # the last call's statistics stay readable
    assert rt.stats() == stats and rt.state.step == 0 and rt.state.trajectory == []
    rt.reset()  # a reset without a step in between keeps them
    assert rt.stats() == stats
    rt.remove()
    assert "step" in vars(scheduler)  # the spy of _drive is back, SADA's wrapper is gone
    assert rt.scheduler is None and scheduler.step.__name__ == "spy"
    rt.remove()  # twice is harmless


def test_config_boundaries():
    assert SADA().kind == PluginKind.STEP
    assert SADA(acc_range=[3, 5]).acc_range == (3, 5) and SADA(acc_range=(0, 0)).acc_range == (0, 0)
    assert SADA(schedule=[6, 4, 4]).schedule == (4, 6) and SADA(schedule=(0,)).schedule == (0,)
    for kw in (dict(max_consecutive_skips=1), dict(max_consecutive_skips=10_000), dict(lagrange_int=1), dict(lagrange_int=10_000),
               dict(lagrange_term=0), dict(lagrange_term=2), dict(lagrange_term=8), dict(lagrange_step=0),
               dict(lagrange_step=100_000), dict(sx=1, sy=2), dict(sx=2, sy=1), dict(sx=64, sy=64),
               dict(token_max_downsample=2), dict(token_max_downsample=4), dict(token_max_downsample=8),
               dict(criterion="curvature", tolerance=10.0), dict(criterion="curvature", tolerance=0.5)):
        SADA(**kw)
    bad = [
        (dict(max_consecutive_skips=10_001), ValueError), (dict(lagrange_int=10_001), ValueError),
        (dict(lagrange_step=100_001), ValueError), (dict(sx=65), ValueError), (dict(sy=0), ValueError),
        (dict(sx=1, sy=1), ValueError), (dict(token_max_downsample=3), ValueError),
        (dict(tolerance=10.5), ValueError), (dict(schedule=(True,)), ValueError), (dict(schedule=(1.5,)), ValueError),
        (dict(token_sparsity=1), TypeError), (dict(acc_range=(True, 3)), TypeError),
    ]
    for kw, error in bad:
        with pytest.raises(error, match="SADA"):
            SADA(**kw)
    with pytest.raises(ValueError, match=r"^SADA.lagrange_term=1 is invalid; allowed: 0 \(off\) or 2-8 anchors$"):
        SADA(lagrange_term=1)
    with pytest.raises(ValueError, match=r"^SADA.sx \* SADA.sy = 1: a token window must hold at least two tokens"):
        SADA(sx=1, sy=1)


@pytest.mark.parametrize(
    "kwargs, never",
    [
        (dict(), False),
        (dict(acc_range=(3, 3)), True),
        (dict(acc_range=(3, 5), schedule=()), True),
        (dict(acc_range=(3, 5), schedule=(4,)), False),
        (dict(acc_range=(3, 3), schedule=(4,)), False),
        # token sparsity prunes inside a non-empty acc_range when max_consecutive_skips > 1, even without step skips
        (dict(token_sparsity=True, acc_range=(3, 5), max_consecutive_skips=2, schedule=()), False),
        (dict(token_sparsity=True, acc_range=(3, 5), max_consecutive_skips=1, schedule=()), True),
        (dict(token_sparsity=True, acc_range=(3, 3), max_consecutive_skips=2, schedule=()), True),
        (dict(token_sparsity=False, acc_range=(3, 5), max_consecutive_skips=2, schedule=()), True),
    ],
)
def test_never_skips(kwargs, never):
    assert SADA(**kwargs).never_skips() is never


def test_step_wrapper_takes_keyword_arguments_too():
    plugin = SADA(acc_range=(3, 10), max_consecutive_skips=2)
    rt_pos, used_pos, _, _ = _drive(_flow(), plugin, lambda n: n * n, sigmas=DYADIC)
    rt_kw, used_kw, _, _ = _drive(_flow(), plugin, lambda n: n * n, sigmas=DYADIC, keywords=True)
    assert rt_kw.stats()["skipped_steps"] == rt_pos.stats()["skipped_steps"] == [3, 4, 6, 7]
    assert _vals(used_kw) == _vals(used_pos)


def test_read_step_carries_the_prediction_type():
    for scheduler, kind in (
        (EulerDiscreteScheduler(prediction_type="v_prediction"), "ve"),
        (DPMSolverMultistepScheduler(prediction_type="v_prediction"), "vp"),
        (DDIMScheduler(prediction_type="sample"), "vp"),
    ):
        scheduler.set_timesteps(10)
        c = read_step(scheduler, scheduler.timesteps[1])
        assert (c.kind, c.prediction) == (kind, scheduler.config.prediction_type)
    dflow = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    dflow.set_timesteps(10)
    assert read_step(dflow, dflow.timesteps[0]).prediction == "flow_prediction"


def test_kappa_eps_known_value():
    # p2, p1, p0 at s = 1, 3/4, 1/2; f_hat = 2 f1 - f2 = 2; y_hat = 2 + (1/2 - 3/4)(5/8 * 2 + 3/4 * 1) = 3/2;
    # x0_hat = y_hat - s0 f1 = 1; f implied = (3 - 1) / (1/2) = 4, f0 = 3: error 1; x0 = 3 - 3/2; |ds| = 1/4
    pts = [
        Point(0, torch.tensor([[1.0]]), 1.0, torch.tensor([[0.0]])),
        Point(1, torch.tensor([[2.0]]), 0.75, torch.tensor([[1.0]])),
        Point(2, torch.tensor([[3.0]]), 0.5, torch.tensor([[3.0]])),
    ]
    assert _kappa(pts, False) == pytest.approx(0.25 * 1 / 1.5)


def test_lagrange_anchors_are_at_least_lagrange_int_steps_apart():
    plugin = SADA(acc_range=(3, 10), max_consecutive_skips=1, lagrange_int=3, lagrange_term=2, lagrange_step=3)
    rt, *_ = _drive(_flow(), plugin, lambda n: n * n, sigmas=DYADIC)
    real = [n for n in range(10) if n not in rt.stats()["skipped_steps"]]
    expected, last = [], None
    for n in real:  # an anchor every real step at least 3 steps after the previous anchor
        if last is None or n - last >= 3:
            expected, last = (expected + [n])[-2:], n
    assert [n for n, _ in rt.state.anchors] == expected and len(expected) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sx=0, sy=4), "SADA.sx=0 is out of range; allowed: >= 1 and <= 64"),
        (dict(sy=0, sx=4), "SADA.sy=0 is out of range; allowed: >= 1 and <= 64"),
        (dict(sy=65), "SADA.sy=65 is out of range; allowed: >= 1 and <= 64"),
        (dict(lagrange_term=-1), "SADA.lagrange_term=-1 is out of range; allowed: >= 0 and <= 8"),
    ],
)
def test_window_and_lagrange_bounds_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        SADA(**kwargs)
    assert str(err.value) == message
