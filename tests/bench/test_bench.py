"""``diffboost bench`` on the tiny random-init Flux: rows, baselines, FLOPs, config files, rivals."""

from __future__ import annotations

import argparse
import csv
import math
import sys

import pytest
import torch

from diffboost.bench import (BenchConfig, BenchSettings, ConfigError, PluginSpec, load_configs, markdown, run_bench,
                             write_all)
from diffboost.bench.cli import add_arguments, run_from_args
from diffboost_reference.evaluation.classifier import AttributeClassifier
from factories import make_flux

torch.set_num_threads(1)

TS = "TaylorSeer"
CONFIGS = [
    BenchConfig("baseline"),
    BenchConfig("ts-never-skips", "diffboost", plugins=(PluginSpec(TS, {"interval": 1}),)),
    BenchConfig("ts-skips", "diffboost", plugins=(PluginSpec(TS, {"interval": 2, "warmup": 1}),)),
    BenchConfig("preset-fast", "diffboost", preset="fast"),
    BenchConfig("diffusers-fbc", "diffusers", cache="FirstBlockCache", options={"threshold": 0.1}),
]


def quick_settings(**over) -> BenchSettings:
    kw = dict(prompts=2, seeds=1, steps=6, repeats=1, height=64, width=64, progress=False,
              call_kwargs={"max_sequence_length": 8}, evaluator=None)
    kw.update(over)
    return BenchSettings(**kw)


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("evaluator")
    AttributeClassifier().save(path)  # random weights: enough to exercise the feature metrics
    return path


@pytest.fixture(scope="module")
def report(evaluator_dir):
    return run_bench(make_flux(), CONFIGS, quick_settings(evaluator=evaluator_dir))


def by_name(report):
    return {r.name: r for r in report.results}


def test_writes_one_row_per_config(report, tmp_path):
    files = write_all(report, tmp_path)
    rows = list(csv.DictReader(files["csv"].open()))
    assert [r["name"] for r in rows] == [c.name for c in CONFIGS]
    assert all(r["status"] == "ok" for r in rows), rows
    md = files["md"].read_text()
    for c in CONFIGS:
        assert f"`{c.name}`" in md


def test_baseline_is_reference(report):
    base = by_name(report)["baseline"]
    assert base.speedup == 1.0
    assert math.isinf(base.psnr) and base.ssim == pytest.approx(1.0)
    assert base.feature_distance == pytest.approx(0.0, abs=1e-6)
    assert base.frechet == pytest.approx(0.0, abs=1e-6)
    assert base.denoiser_flops > 0 and base.call_flops > base.denoiser_flops


def test_never_skipping_config_is_identical_and_costs_the_same(report):
    base, same = by_name(report)["baseline"], by_name(report)["ts-never-skips"]
    assert math.isinf(same.psnr)
    assert same.denoiser_flops == base.denoiser_flops
    assert same.flops_reduction == 1.0


def test_skipping_config_saves_flops_and_changes_output(report):
    base, skip = by_name(report)["baseline"], by_name(report)["ts-skips"]
    assert skip.denoiser_flops < base.denoiser_flops
    assert skip.flops_reduction > 1.2
    assert math.isfinite(skip.psnr) and skip.psnr > 20
    assert skip.feature_distance >= 0 and math.isfinite(skip.frechet)


def test_rival_not_installed_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # makes `import cache_dit` raise ImportError
    configs = [BenchConfig("baseline"), BenchConfig("cache-dit", "cache-dit", options={"Fn_compute_blocks": 1})]
    report = run_bench(make_flux(), configs, quick_settings(prompts=1, steps=3))
    rival = by_name(report)["cache-dit"]
    assert rival.status.startswith("skipped") and "not installed" in rival.status
    assert math.isnan(rival.speedup)
    assert by_name(report)["baseline"].ok


CONFIG_TOML = """
[[config]]
name = "baseline"
kind = "baseline"

[[config]]
name = "ts"
kind = "diffboost"
plugins = [{ plugin = "TaylorSeer", interval = 3, order = 2 }]

[[config]]
name = "turbo"
kind = "diffboost"
preset = "turbo"

[[config]]
name = "fbc"
kind = "diffusers"
cache = "FirstBlockCache"
options = { threshold = 0.08 }

[[config]]
name = "dbcache-taylor"
kind = "cache-dit"
options = { Fn_compute_blocks = 1, residual_diff_threshold = 0.1 }
calibrator = { taylorseer_order = 1 }
"""


def test_toml_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG_TOML)
    configs = load_configs(path)
    assert [c.name for c in configs] == ["baseline", "ts", "turbo", "fbc", "dbcache-taylor"]
    assert configs[1].plugins == (PluginSpec("TaylorSeer", {"interval": 3, "order": 2}),)
    assert configs[2].preset == "turbo" and configs[3].options == {"threshold": 0.08}
    assert configs[4].calibrator == {"taylorseer_order": 1}


@pytest.mark.parametrize(
    "entry, message",
    [
        ('name = "x"\nkind = "diffboost"\nplugins = [{ plugin = "WarpDrive" }]', "unknown plugin 'WarpDrive'"),
        ('name = "x"\nkind = "diffboost"\npreset = "ludicrous"', "unknown preset 'ludicrous'"),
        ('name = "x"\nkind = "magic"', "unknown kind 'magic'"),
        ('name = "x"\nkind = "diffusers"\ncache = "TeaCache"', "unknown diffusers cache 'TeaCache'"),
        ('name = "x"\nkind = "diffboost"\nplugins = [{ plugin = "TaylorSeer", speed = 9 }]', "TaylorSeer accepts"),
        ('name = "x"\nkind = "diffboost"\nplugins = [{ plugin = "TaylorSeer", interval = 0 }]', "interval"),
    ],
)
def test_config_errors_are_clear(tmp_path, entry, message):
    path = tmp_path / "bad.toml"
    path.write_text("[[config]]\n" + entry + "\n")
    with pytest.raises(ConfigError, match=message):
        load_configs(path)


def test_unknown_plugin_error_lists_supported(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[config]]\nname = "x"\nkind = "diffboost"\nplugins = [{ plugin = "Nope" }]\n')
    with pytest.raises(ConfigError) as info:
        load_configs(path)
    assert "TaylorSeer" in str(info.value) and "AdaptiveBlockCache" in str(info.value)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_missing_model_is_a_clear_error(tmp_path, caplog):
    assert run_from_args(_args("--model", str(tmp_path / "nowhere"), "--quick", "--out", str(tmp_path))) == 2
    assert "does not exist" in caplog.text


def test_cli_bad_config_file_returns_2(tmp_path, caplog):
    path = tmp_path / "bad.toml"
    path.write_text('[[config]]\nname = "x"\nkind = "diffboost"\nplugins = [{ plugin = "Nope" }]\n')
    assert run_from_args(_args("--configs", str(path), "--list-configs")) == 2
    assert "unknown plugin 'Nope'" in caplog.text


def test_cli_quick_on_saved_pipeline(tmp_path):
    model = tmp_path / "flux"
    make_flux().save_pretrained(model)
    configs = tmp_path / "c.toml"
    configs.write_text(CONFIG_TOML.split("[[config]]\nname = \"turbo\"")[0])  # baseline + TaylorSeer
    out = tmp_path / "out"
    code = run_from_args(_args("--model", str(model), "--configs", str(configs), "--quick", "--out", str(out),
                               "--no-evaluator"))
    assert code == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["baseline", "ts"]
    assert float(rows[0]["speedup"]) == 1.0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "pareto.png").stat().st_size > 0


def test_yaml_config_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(
        "- {name: baseline, kind: baseline}\n"
        "- name: safe\n  kind: diffboost\n  preset: safe\n"
        "- name: ts\n  kind: diffboost\n  plugins: [{plugin: TaylorSeer, interval: 4}]\n"
    )
    configs = load_configs(path)
    assert [c.kind for c in configs] == ["baseline", "diffboost", "diffboost"]
    assert configs[2].plugins[0].kwargs == {"interval": 4}


def test_shipped_config_files_parse():
    """Every config file in benchmarks/configs builds valid plugin stacks."""
    from pathlib import Path

    from diffboost.bench.configs import build_plugins, load_configs

    files = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "configs").glob("*.toml"))
    assert len(files) >= 2
    for path in files:
        configs = load_configs(path)
        assert configs[0].name == "baseline", path
        for config in configs:
            if config.kind == "diffboost":
                assert build_plugins(config), (path, config.name)


def test_tomesd_rival_and_scheduler_swap_on_a_unet_pipeline():
    """tomesd is a rival kind on UNet pipelines; --scheduler swaps the pipeline's scheduler first."""
    pytest.importorskip("tomesd")
    from factories import make_sd

    pipe = make_sd()
    configs = [
        BenchConfig("baseline"),
        BenchConfig("tomesd-0.5", "tomesd", options={"ratio": 0.5}),
        BenchConfig("tome-0.5", "diffboost", plugins=(PluginSpec("TokenMerging", {"ratio": 0.5}),)),
    ]
    settings = quick_settings(call_kwargs={}, scheduler="EulerDiscreteScheduler", count_flops=False)
    report = run_bench(pipe, configs, settings)
    rows = by_name(report)
    assert all(r.ok for r in report.results), [(r.name, r.status) for r in report.results]
    assert rows["tomesd-0.5"].is_rival and not rows["tome-0.5"].is_rival
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    # tomesd's remove_patch ran: no block keeps tomesd's patched class
    assert not any("ToMe" in type(m).__name__ for m in pipe.unet.modules())
    with pytest.raises(ValueError, match="unknown scheduler"):
        run_bench(make_sd(), [BenchConfig("baseline")], quick_settings(call_kwargs={}, scheduler="NoSuchScheduler"))
    cfg = load_configs_from_text("""
[[config]]
name = "t"
kind = "tomesd"
options = { ratio = 0.25 }
""")
    assert cfg[0].describe() == "tomesd apply_patch(ratio=0.25)"


def test_deepcache_rival_on_a_unet_pipeline_and_its_removal():
    pytest.importorskip("DeepCache")
    from factories import make_sd, run

    pipe = make_sd()
    base = run(pipe, "sd", num_inference_steps=6)
    configs = [BenchConfig("baseline"), BenchConfig("deepcache-3", "deepcache", options={"cache_interval": 3})]
    report = run_bench(pipe, configs, quick_settings(call_kwargs={}))
    row = by_name(report)["deepcache-3"]
    assert row.ok and row.is_rival and row.psnr < math.inf, row.status
    assert torch.equal(run(pipe, "sd", num_inference_steps=6), base)  # DeepCache disabled again
    assert configs[1].describe() == "DeepCache set_params(cache_interval=3)"
    flux = run_bench(make_flux(), configs, quick_settings())
    assert by_name(flux)["deepcache-3"].status.startswith("skipped: DeepCache caches UNet pipelines only")


def load_configs_from_text(text: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_text(text)
        return load_configs(path)


def test_workload_replays_the_bench_calls(report):
    """prepare_workload gives scripts the bench's exact jobs and call arguments."""
    import numpy as np

    from diffboost.bench import prepare_workload
    from diffboost.bench.runner import _images_of

    workload = prepare_workload(make_flux(), quick_settings())
    assert workload.jobs == [(p, s) for p in report.prompts for s in report.seeds]
    first = _images_of(workload.call(*workload.jobs[0]))
    np.testing.assert_array_equal(first[0], by_name(report)["baseline"].images[0])
    assert _images_of(workload.call(*workload.jobs[0], num_inference_steps=2)).shape == first.shape


def test_cache_dit_gets_separate_cfg_under_true_cfg(monkeypatch):
    pytest.importorskip("cache_dit")
    from diffboost.bench import accelerators

    probes = []
    real = accelerators.denoiser_calls_per_step
    monkeypatch.setattr(accelerators, "denoiser_calls_per_step", lambda *a: probes.append(1) or real(*a))
    cfg = {"true_cfg_scale": 2.0, "negative_prompt": "", "max_sequence_length": 8}
    options = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08}
    configs = [
        BenchConfig("baseline"),
        BenchConfig("auto", "cache-dit", options=options),
        BenchConfig("auto-2", "cache-dit", options={**options, "residual_diff_threshold": 0.2}),
        BenchConfig("explicit-off", "cache-dit", options={**options, "enable_separate_cfg": False}),
    ]
    report = run_bench(make_flux(), configs, quick_settings(prompts=1, steps=4, call_kwargs=cfg, count_flops=False))
    rows = by_name(report)
    assert rows["auto"].ok and rows["explicit-off"].ok, (rows["auto"].status, rows["explicit-off"].status)
    assert "enable_separate_cfg=True (auto" in rows["auto"].description
    assert "enable_separate_cfg=True (auto" in rows["auto-2"].description
    assert "auto" not in rows["explicit-off"].description
    assert len(probes) == 1  # counted once for the workload, not once per config
    # without CFG the option is left alone
    report = run_bench(make_flux(), configs[:2], quick_settings(prompts=1, steps=4, count_flops=False))
    assert by_name(report)["auto"].ok and "auto" not in by_name(report)["auto"].description


def test_images_per_prompt_batches_each_call(report, evaluator_dir):
    """--images-per-prompt N: N images per call, time per image, adherence prompts repeated N times."""
    import numpy as np

    configs = [BenchConfig("baseline"), CONFIGS[1], BenchConfig(
        "bottleneck", "diffboost", plugins=(PluginSpec("BottleneckSampling", {}),))]
    batched = run_bench(make_flux(), configs, quick_settings(images_per_prompt=2, evaluator=evaluator_dir,
                                                             adherence="on"))
    rows = by_name(batched)
    assert all(r.ok for r in batched.results), [r.status for r in batched.results]
    n_jobs = len(batched.prompts) * len(batched.seeds)
    assert rows["baseline"].images.shape[0] == 2 * n_jobs
    # batch-2 calls run twice the tokens per denoiser pass of the batch-1 bench
    assert rows["baseline"].denoiser_flops == pytest.approx(2 * by_name(report)["baseline"].denoiser_flops)
    assert math.isinf(rows["ts-never-skips"].psnr)  # never skipping stays exact in a batch
    assert rows["bottleneck"].flops_reduction > 1.2
    assert 0.0 <= rows["bottleneck"].adherence <= 1.0
    # the batch's second image is a different sample (its own noise), not a copy of the first
    assert not np.array_equal(rows["baseline"].images[0], rows["baseline"].images[1])
    assert "x 2 images per call" in markdown(batched)


def test_images_per_prompt_errors():
    from diffboost.bench.runner import base_call_kwargs

    class NoBatch:
        def __call__(self, prompt, num_inference_steps=28):
            return None

    with pytest.raises(ValueError, match="num_images_per_prompt"):
        base_call_kwargs(NoBatch(), quick_settings(images_per_prompt=2), (64, 64))
    assert base_call_kwargs(NoBatch(), quick_settings(), (64, 64)) == {"num_inference_steps": 6, "output_type": "np",
                                                                       "max_sequence_length": 8}
    with pytest.raises(ValueError, match="images-per-prompt"):
        from diffboost.bench.cli import settings_from_args

        settings_from_args(_args("--images-per-prompt", "0"))


def test_cache_dit_calibrator_types(tmp_path):
    """calibrator = { type = "dmd" | "foca" } picks cache-dit's DMD / FoCa calibrator (TaylorSeer by default)."""
    path = tmp_path / "c.toml"
    path.write_text(
        'config = [{ name = "d", kind = "cache-dit", options = { residual_diff_threshold = 0.12 }, '
        'calibrator = { type = "dmd", dmd_history = 4 } },\n'
        '  { name = "t", kind = "cache-dit", calibrator = { taylorseer_order = 2 } }]\n'
    )
    d, t = load_configs(path)
    assert d.describe() == "cache-dit DBCache(residual_diff_threshold=0.12) + DMDCalibrator(dmd_history=4)"
    assert t.describe().endswith("+ TaylorSeerCalibrator(taylorseer_order=2)")
    from diffboost.bench.accelerators import CALIBRATORS

    cache_dit = pytest.importorskip("cache_dit")
    assert all(hasattr(cache_dit, name) for name in CALIBRATORS.values()), cache_dit.__version__
