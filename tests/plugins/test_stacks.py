"""Stacks as files: diffboost.save / diffboost.load, presets as stack files, --plugins FILE."""

import dataclasses
import json
import os

import pytest
import torch

import diffboost
from diffboost import (
    SADA,
    SparseAttention,
    AdaptiveBlockCache,
    BottleneckSampling,
    EasyCache,
    ErrorControlledCache,
    OneStep,
    QuantizedAttention,
    StackFileError,
    TaylorSeer,
    TokenDownsampling,
    TokenMerging,
)
from diffboost.plugins.presets import PRESET_DIR, PRESETS
from diffboost.plugins.stacks import plugin_classes, to_data
from factories import make_flux, run

#: every plugin at its defaults and with every field changed from its default
EXAMPLES = [
    TaylorSeer(),
    TaylorSeer(interval=4, order=2, warmup=2, final_full_steps=1, lite=True, check_finite=False),
    TaylorSeer(granularity="block"),
    AdaptiveBlockCache(),
    AdaptiveBlockCache(threshold=0.12, front_blocks=2, back_blocks=1, warmup=2, max_consecutive_skips=5, taylor_order=1,
                       final_full_steps=2, check_finite=False),
    ErrorControlledCache(),
    ErrorControlledCache(tolerance=0.1, order=2, probe_blocks=2, warmup=1, max_consecutive_skips=3, final_full_steps=0,
                         check_finite=False),
    EasyCache(),
    EasyCache(threshold=0.1, warmup=3, final_full_steps=2, max_consecutive_skips=2, order=0, check_finite=False),
    BottleneckSampling(),
    BottleneckSampling(stages=((1.0, 0.05), (0.5, 0.8), (1.0, 0.15)), shift=3.0, renoise=0.2, seed=7),
    SADA(),
    SADA(acc_range=(3, 27), max_consecutive_skips=6, lagrange_int=3, lagrange_term=0, lagrange_step=14, token_sparsity=True,
         sx=2, sy=4, token_max_downsample=2, criterion="curvature", tolerance=0.2),
    TokenDownsampling(),
    TokenDownsampling(factor=3, max_downsample=2, mode="avg"),
    TokenMerging(),
    TokenMerging(ratio=0.3, sx=3, sy=1, max_downsample=2, seed=5, random_dst=False, merge_attn=False,
                 merge_crossattn=True, merge_mlp=True),
    QuantizedAttention(),
    QuantizedAttention(qk_format="fp8_e4m3", pv_format="fp8_e4m3", block_q=64, block_k=32, smooth_k=False,
                       dense_first_layers=1, dense_last_layers=2, dense_steps=3, cross_attention=True, backend="sage"),
    SparseAttention(),
    SparseAttention(cdf_threshold=0.9, topk=0.5, sim_threshold=0.3, block_q=64, block_k=128, impl="gather",
                    dense_first_layers=2, dense_last_layers=1, dense_steps=1, cross_attention=True, backend="flash"),
    OneStep("students/flux-1step", steps=3),  # no defaults: a path is required
]


def test_examples_cover_every_plugin_and_field():
    classes = plugin_classes()
    assert {type(p).__name__ for p in EXAMPLES} == set(classes)
    for name, cls in classes.items():
        changed = {f.name for p in EXAMPLES if type(p) is cls for f in dataclasses.fields(p)
                   if f.init and getattr(p, f.name) != f.default}
        fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"schedule"}  # SADA: schedule xor acc_range
        assert changed == fields, (name, fields - changed)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("plugin", EXAMPLES, ids=repr)
def test_round_trip_of_every_plugin(tmp_path, suffix, plugin):
    path = diffboost.save(plugin, tmp_path / f"stack{suffix}")
    (back,) = diffboost.load(path)
    assert back == plugin and type(back) is type(plugin)
    for f in dataclasses.fields(plugin):  # tuples stay tuples (frozen configs, equal to the defaults' types)
        assert type(getattr(back, f.name)) is type(getattr(plugin, f.name)), f.name


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_round_trip_of_a_stack_and_a_preset(tmp_path, suffix):
    stack = [BottleneckSampling(), SADA(acc_range=(3, 25)), TaylorSeer(interval=2, warmup=1)]
    assert diffboost.load(diffboost.save(stack, tmp_path / f"s{suffix}")) == stack
    assert diffboost.load(diffboost.save("fast", tmp_path / f"p{suffix}")) == PRESETS["fast"]()
    assert diffboost.load(diffboost.save(SADA(schedule=(4, 6, 9)), tmp_path / f"x{suffix}")) == [SADA(schedule=(4, 6, 9))]


def test_presets_are_stack_files():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.toml")) == sorted(PRESETS) == ["fast", "safe", "turbo"]
    expected = {"safe": (0.04, 1, 4), "fast": (0.1, 0, 8), "turbo": (0.4, 0, 8)}
    for name, (threshold, order, cap) in expected.items():
        assert PRESETS[name]() == [EasyCache(threshold=threshold, order=order, max_consecutive_skips=cap)]
    # each file is exactly what save() writes for it (copy one, edit it, pass it back as --plugins)
    for path in PRESET_DIR.glob("*.toml"):
        assert path.read_text() == _saved_text(diffboost.load(path))


def _saved_text(stack):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return diffboost.save(stack, Path(tmp) / "s.toml").read_text()


def test_a_loaded_stack_runs_like_the_objects(tmp_path):
    pipe = make_flux()
    stack = [TaylorSeer(interval=3, warmup=1)]
    with diffboost.accelerated(pipe, stack):
        direct = run(pipe, "flux", num_inference_steps=6)
    with diffboost.accelerated(pipe, diffboost.load(diffboost.save(stack, tmp_path / "s.toml"))):
        loaded = run(pipe, "flux", num_inference_steps=6)
    assert torch.equal(direct, loaded)


def test_the_file_is_written_atomically_with_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = diffboost.save(TaylorSeer(), tmp_path / "s.toml")
        diffboost.save(TaylorSeer(interval=2), path)  # replaces it
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert diffboost.load(path) == [TaylorSeer(interval=2)]
    assert [p.name for p in tmp_path.iterdir()] == ["s.toml"]


def _write(tmp_path, text, suffix=".toml"):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    return path


HEADER = 'format = "diffboost-stack"\nversion = 1\n'


@pytest.mark.parametrize("text, needle", [
    (HEADER + '[[plugins]]\nplugin = "TurboCache"\n', "plugins[0]: unknown plugin 'TurboCache'; known plugins: ["),
    (HEADER + '[[plugins]]\nplugin = "TaylorSeer"\nintervall = 3\n',
     "plugins[0] (TaylorSeer): unknown fields ['intervall']; TaylorSeer accepts ['interval', 'order'"),
    (HEADER + '[[plugins]]\nplugin = "TaylorSeer"\ninterval = 0\n', "plugins[0] (TaylorSeer): TaylorSeer.interval=0 is out of range"),
    (HEADER + '[[plugins]]\nplugin = "TaylorSeer"\nlite = "yes"\n', "TaylorSeer.lite must be True or False"),
    (HEADER + '[[plugins]]\nplugin = "TaylorSeer"\n[[plugins]]\nplugin = "SADA"\nacc_range = [3]\n', "plugins[1] (SADA)"),
    ('format = "diffboost-stack"\nversion = 2\n[[plugins]]\nplugin = "SADA"\n', "stack format version 2 is not supported"),
    ('version = 1\n[[plugins]]\nplugin = "SADA"\n', "'format' must be 'diffboost-stack', got None"),
    (HEADER + 'plugins = []\n', "'plugins' must be a non-empty list"),
    (HEADER + 'extra = 1\n[[plugins]]\nplugin = "SADA"\n', "unknown keys ['extra']"),
    (HEADER + '[[plugins]]\ninterval = 3\n', "each plugin is a table with a 'plugin' key"),
    ("format = [oops", "is not valid TOML"),
])
def test_bad_files_name_the_file_and_the_entry(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(StackFileError) as err:
        diffboost.load(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_other_file_problems(tmp_path):
    with pytest.raises(StackFileError, match="is not valid JSON"):
        diffboost.load(_write(tmp_path, "{oops", ".json"))
    with pytest.raises(StackFileError, match=r"unsupported type '.yaml'; use .toml or .json"):
        diffboost.load(_write(tmp_path, "x", ".yaml"))
    with pytest.raises(StackFileError, match=r"unsupported type '.txt'"):
        diffboost.save(TaylorSeer(), tmp_path / "s.txt")
    with pytest.raises(FileNotFoundError, match="stack file .* does not exist"):
        diffboost.load(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'format = "\xe9"\n')
    with pytest.raises(StackFileError, match="is not UTF-8 text"):
        diffboost.load(bad)
    with pytest.raises(TypeError, match="a stack holds plugin configs"):
        diffboost.save([42], tmp_path / "s.toml")


def test_to_data_is_json_and_lists_every_field():
    data = to_data([TaylorSeer(interval=4)])
    assert json.loads(json.dumps(data)) == data
    assert data == {"format": "diffboost-stack", "version": 1, "plugins": [{
        "plugin": "TaylorSeer", "interval": 4, "order": 1, "warmup": 3, "final_full_steps": 0, "lite": False,
        "granularity": "module", "check_finite": True}]}


def test_toml_values_and_the_files_layout():
    from diffboost.plugins.stacks import _toml_value

    assert [_toml_value(v, "x") for v in (True, False, 3, 0.5, 1e-07, "a \"q\"", [[1.0, 2], []])] == [
        "true", "false", "3", "0.5", "1e-07", '"a \\"q\\""', "[[1.0, 2], []]"]
    assert [_toml_value(v, "x") for v in (float("inf"), float("-inf"), float("nan"))] == ["inf", "-inf", "nan"]
    with pytest.raises(StackFileError, match=r"x: \{\} \(dict\) cannot be written as TOML; save as .json"):
        _toml_value({}, "x")


def test_json_files_are_indented_and_toml_files_list_one_table_per_plugin(tmp_path):
    path = diffboost.save([TaylorSeer(interval=4), SADA()], tmp_path / "s.json")
    assert path.read_text().startswith('{\n  "format": "diffboost-stack",\n  "version": 1,\n  "plugins": [\n    {\n')
    text = diffboost.save([TaylorSeer(interval=4), SADA()], tmp_path / "s.toml").read_text()
    assert text.startswith('format = "diffboost-stack"\nversion = 1\n\n[[plugins]]\nplugin = "TaylorSeer"\ninterval = 4\n')
    assert text.count("[[plugins]]") == 2 and "schedule" not in text  # None fields are left out


def test_an_unknown_preset_name_lists_the_presets(tmp_path):
    with pytest.raises(ValueError, match=r"unknown preset 'warp'; available presets: \['fast', 'safe', 'turbo'\]"):
        diffboost.save("warp", tmp_path / "s.toml")


def test_none_is_refused_in_toml_only_where_it_is_not_the_default(tmp_path, monkeypatch):
    import diffboost.plugins.stacks as stacks
    from diffboost.plugins.base import Plugin

    @dataclasses.dataclass(frozen=True)
    class Odd(Plugin):
        level: object = 3

    monkeypatch.setattr(stacks, "plugin_classes", lambda: {"Odd": Odd})
    with pytest.raises(StackFileError, match=r"Odd.level=None cannot be written as TOML; save as .json"):
        diffboost.save(Odd(level=None), tmp_path / "o.toml")
    assert not (tmp_path / "o.toml").exists()
    diffboost.save(Odd(level=None), tmp_path / "o.json")  # JSON has null
    assert json.loads((tmp_path / "o.json").read_text())["plugins"][0]["level"] is None


@pytest.mark.parametrize("cls, former", [(AdaptiveBlockCache, "max_cached_steps"),
                                         (ErrorControlledCache, "max_forecast_steps"), (SADA, "max_interval")])
def test_renamed_fields_still_work_once_with_a_warning(tmp_path, caplog, cls, former):
    # max_cached_steps / max_forecast_steps / max_interval are one idea: max_consecutive_skips
    assert cls.renamed == {former: "max_consecutive_skips"}
    with pytest.warns(DeprecationWarning, match=f"{former}=.*renamed max_consecutive_skips="):
        plugin = cls(**{former: 2})
    assert plugin == cls(max_consecutive_skips=2)
    with pytest.raises(TypeError, match=f"give max_consecutive_skips= only .{former}= is its former name"):
        cls(**{former: 2, "max_consecutive_skips": 3})
    # a stack file written before the rename loads, says so, and re-saves with the new name
    old = tmp_path / "old.json"
    entry = {"plugin": cls.__name__, former: 2}
    old.write_text(json.dumps({"format": "diffboost-stack", "version": 1, "plugins": [entry]}))
    with caplog.at_level("WARNING", logger="diffboost.plugins.stacks"):
        assert diffboost.load(old) == [cls(max_consecutive_skips=2)]
    assert f"field '{former}' is now called 'max_consecutive_skips'" in caplog.text
    assert former not in json.dumps(to_data(diffboost.load(old)))
