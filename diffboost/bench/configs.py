"""Benchmark configurations: what ``diffboost bench`` compares.

A configuration is a named entry of one of four kinds:

- ``baseline``: the unmodified pipeline (every other entry is compared against it).
- ``diffboost``: a diffboost plugin stack, given as plugin class names with keyword arguments
  and/or preset names (``"safe"``, ``"fast"``, ``"turbo"``).
- ``diffusers``: one of diffusers' built-in caches (``FirstBlockCache``, ``TaylorSeerCache``,
  ``MagCache``), installed with ``pipe.transformer.enable_cache(config)``.
- ``cache-dit``: cache-dit's DBCache, optionally with one of its calibrators (TaylorSeer, DMD, FoCa).
- ``tomesd``: tomesd's token merging for UNet pipelines (``tomesd.apply_patch(pipe, **options)``).
- ``deepcache``: DeepCache for SD/SDXL UNet pipelines (``DeepCacheSDHelper.set_params(**options)``).

Config files (TOML or YAML) hold a list of tables under ``config`` (a YAML file may also be a bare
list). Schema of one entry::

    [[config]]
    name = "taylorseer-n3"            # unique, free text
    kind = "diffboost"                # baseline | diffboost | diffusers | cache-dit
    plugins = [{ plugin = "TaylorSeer", interval = 3 }]   # diffboost: plugin stack ...
    preset = "fast"                   # ... and/or a preset (applied after the plugins)

    [[config]]
    name = "diffusers-fbc-0.08"
    kind = "diffusers"
    cache = "FirstBlockCache"         # FirstBlockCache | TaylorSeerCache | MagCache | SeaCache
    options = { threshold = 0.08 }    # keyword arguments of the diffusers config class

    [[config]]
    name = "cache-dit-dbcache-taylor"
    kind = "cache-dit"
    options = { Fn_compute_blocks = 1, residual_diff_threshold = 0.08 }   # DBCacheConfig kwargs
    calibrator = { taylorseer_order = 1 }   # optional: TaylorSeerCalibratorConfig kwargs; type = "dmd" or
                                            # "foca" picks DMDCalibratorConfig / FoCaCalibratorConfig

    [[config]]
    name = "tomesd-0.5"
    kind = "tomesd"
    options = { ratio = 0.5 }         # keyword arguments of tomesd.apply_patch
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

KINDS = ("baseline", "diffboost", "diffusers", "cache-dit", "tomesd", "deepcache")
#: kinds that run another project's code (drawn as rivals in reports)
RIVAL_KINDS = ("diffusers", "cache-dit", "tomesd", "deepcache")
DIFFUSERS_CACHES = ("FirstBlockCache", "TaylorSeerCache", "MagCache", "SeaCache")
_ENTRY_KEYS = {
    "baseline": {"name", "kind"},
    "diffboost": {"name", "kind", "plugins", "preset"},
    "diffusers": {"name", "kind", "cache", "options"},
    "cache-dit": {"name", "kind", "options", "calibrator"},
    "tomesd": {"name", "kind", "options"},
    "deepcache": {"name", "kind", "options"},
}


class ConfigError(ValueError):
    """A benchmark configuration (or config file) is malformed; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """One diffboost plugin: its class name (as exported by ``diffboost``) and keyword arguments."""

    plugin: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def label(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.plugin}({args})"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One named configuration of the benchmark (see the module docstring for the schema)."""

    name: str
    kind: str = "baseline"
    plugins: tuple[PluginSpec, ...] = ()
    preset: str | None = None
    cache: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibrator: dict[str, Any] | None = None

    @property
    def is_rival(self) -> bool:
        return self.kind in RIVAL_KINDS

    def describe(self) -> str:
        """Short human-readable description for reports."""
        if self.kind == "baseline":
            return "unmodified pipeline"
        if self.kind == "diffboost":
            parts = [p.label() for p in self.plugins] + ([f'preset "{self.preset}"'] if self.preset else [])
            return "diffboost " + " + ".join(parts)
        if self.kind == "diffusers":
            return f"diffusers {self.cache}Config({_kw(self.options)})"
        if self.kind == "tomesd":
            return f"tomesd apply_patch({_kw(self.options)})"
        if self.kind == "deepcache":
            return f"DeepCache set_params({_kw(self.options)})"
        extra = ""
        if self.calibrator is not None:
            kwargs = dict(self.calibrator)
            name = {"dmd": "DMD", "foca": "FoCa"}.get(kwargs.pop("type", "taylorseer"), "TaylorSeer")
            extra = f" + {name}Calibrator({_kw(kwargs)})"
        return f"cache-dit DBCache({_kw(self.options)}){extra}"


def _kw(options: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (options or {}).items())


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def plugin_classes() -> dict[str, type]:
    """Plugin classes a config may name (the registry that stack files use too)."""
    from diffboost.plugins.stacks import plugin_classes as classes

    return classes()


def build_plugins(config: BenchConfig) -> list[Any]:
    """The plugin objects / preset names to pass to ``diffboost.apply`` for a ``diffboost`` config."""
    classes = plugin_classes()
    stack: list[Any] = []
    for spec in config.plugins:
        cls = classes.get(spec.plugin)
        if cls is None:
            raise ConfigError(
                f"config {config.name!r}: unknown plugin {spec.plugin!r}; supported plugins: {sorted(classes)}"
            )
        try:
            stack.append(cls(**spec.kwargs))
        except TypeError as exc:
            fields = [f.name for f in dataclasses.fields(cls) if f.init]
            raise ConfigError(f"config {config.name!r}: {spec.label()}: {exc}; {spec.plugin} accepts {fields}") from None
        except ValueError as exc:
            raise ConfigError(f"config {config.name!r}: {exc}") from None
    if config.preset is not None:
        stack.append(config.preset)
    return stack


def validate(config: BenchConfig) -> BenchConfig:
    """Check one config without touching a pipeline; raise :class:`ConfigError` naming the problem."""
    from diffboost.plugins.presets import PRESETS

    if config.kind not in KINDS:
        raise ConfigError(f"config {config.name!r}: unknown kind {config.kind!r}; supported kinds: {list(KINDS)}")
    if config.kind == "diffboost":
        if not config.plugins and config.preset is None:
            raise ConfigError(f"config {config.name!r}: a diffboost config needs 'plugins' and/or 'preset'")
        if config.preset is not None and config.preset not in PRESETS:
            raise ConfigError(
                f"config {config.name!r}: unknown preset {config.preset!r}; supported presets: {sorted(PRESETS)}"
            )
        build_plugins(config)  # validates plugin names and their arguments
    if config.kind == "diffusers" and config.cache not in DIFFUSERS_CACHES:
        raise ConfigError(
            f"config {config.name!r}: unknown diffusers cache {config.cache!r}; supported: {list(DIFFUSERS_CACHES)}"
        )
    return config


def validate_all(configs: list[BenchConfig]) -> list[BenchConfig]:
    """Validate every config and check that names are unique."""
    seen: set[str] = set()
    for config in configs:
        if config.name in seen:
            raise ConfigError(f"duplicate config name {config.name!r}: names must be unique")
        seen.add(config.name)
        validate(config)
    return configs


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------


def _plugin_spec(raw: Any, where: str) -> PluginSpec:
    if isinstance(raw, str):
        return PluginSpec(raw)
    if not isinstance(raw, dict) or "plugin" not in raw:
        raise ConfigError(f"{where}: each plugin must be a table with a 'plugin' key (class name), got {raw!r}")
    kwargs = {k: v for k, v in raw.items() if k != "plugin"}
    return PluginSpec(str(raw["plugin"]), kwargs)


def config_from_dict(raw: Any, index: int = 0) -> BenchConfig:
    """Build (and validate) one :class:`BenchConfig` from a parsed TOML/YAML table."""
    where = f"config #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    if "name" not in raw:
        raise ConfigError(f"{where}: missing 'name'")
    where = f"config {raw['name']!r}"
    kind = raw.get("kind", "baseline")
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; supported kinds: {list(KINDS)}")
    unknown = set(raw) - _ENTRY_KEYS[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} for kind {kind!r}; allowed: {sorted(_ENTRY_KEYS[kind])}")
    plugins = raw.get("plugins", [])
    if isinstance(plugins, (dict, str)):
        plugins = [plugins]
    config = BenchConfig(
        name=str(raw["name"]),
        kind=kind,
        plugins=tuple(_plugin_spec(p, where) for p in plugins),
        preset=raw.get("preset"),
        cache=raw.get("cache"),
        options=dict(raw.get("options", {})),
        calibrator=dict(raw["calibrator"]) if raw.get("calibrator") is not None else None,
    )
    return validate(config)


def load_configs(path: str | Path) -> list[BenchConfig]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file; JSON (``.json``) also works."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use TOML") from None
        data = yaml.safe_load(text)
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"{path}: unsupported config file type {suffix!r}; use .toml, .yaml/.yml or .json")
    if isinstance(data, dict):
        entries = data.get("config", data.get("configs"))
        if entries is None:
            raise ConfigError(f"{path}: expected a list of tables under 'config' ([[config]] in TOML)")
    else:
        entries = data
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'config' must be a non-empty list of tables")
    return validate_all([config_from_dict(e, i) for i, e in enumerate(entries)])


# ----------------------------------------------------------------------------------------------
# built-in lists
# ----------------------------------------------------------------------------------------------


def _db(name: str, *plugins: PluginSpec, preset: str | None = None) -> BenchConfig:
    return BenchConfig(name=name, kind="diffboost", plugins=tuple(plugins), preset=preset)


def default_configs() -> list[BenchConfig]:
    """Baseline, each diffboost plugin at 2-3 settings, each preset and each rival."""
    ts, abc, ecc = "TaylorSeer", "AdaptiveBlockCache", "ErrorControlledCache"
    return [
        BenchConfig("baseline"),
        _db("taylorseer-n3-o1", PluginSpec(ts, {"interval": 3, "order": 1})),
        _db("taylorseer-n5-o1", PluginSpec(ts, {"interval": 5, "order": 1})),
        _db("taylorseer-n6-o2", PluginSpec(ts, {"interval": 6, "order": 2})),
        _db("abc-t0.05", PluginSpec(abc, {"threshold": 0.05})),
        _db("abc-t0.10", PluginSpec(abc, {"threshold": 0.10})),
        _db("abc-t0.10-taylor", PluginSpec(abc, {"threshold": 0.10, "taylor_order": 1})),
        _db("ecc-tol0.02", PluginSpec(ecc, {"tolerance": 0.02})),
        _db("ecc-tol0.05", PluginSpec(ecc, {"tolerance": 0.05})),
        _db("ecc-tol0.10", PluginSpec(ecc, {"tolerance": 0.10})),
        _db("easy-t0.03-o1", PluginSpec("EasyCache", {"threshold": 0.03, "order": 1})),
        _db("easy-t0.2-o0-m6", PluginSpec("EasyCache", {"threshold": 0.2, "order": 0, "max_consecutive_skips": 6})),
        _db("preset-safe", preset="safe"),
        _db("preset-fast", preset="fast"),
        _db("preset-turbo", preset="turbo"),
        BenchConfig("diffusers-fbc-0.05", "diffusers", cache="FirstBlockCache", options={"threshold": 0.05}),
        BenchConfig("diffusers-fbc-0.10", "diffusers", cache="FirstBlockCache", options={"threshold": 0.10}),
        BenchConfig(
            "diffusers-taylorseer-n5", "diffusers", cache="TaylorSeerCache",
            options={"cache_interval": 5, "max_order": 1, "disable_cache_before_step": 3},
        ),
        BenchConfig("diffusers-magcache-0.06", "diffusers", cache="MagCache", options={"threshold": 0.06}),
        BenchConfig("diffusers-magcache-0.12", "diffusers", cache="MagCache", options={"threshold": 0.12}),
        BenchConfig("diffusers-magcache-0.5-k5", "diffusers", cache="MagCache",
                    options={"threshold": 0.5, "max_skip_steps": 5}),
        BenchConfig("diffusers-seacache-0.25", "diffusers", cache="SeaCache", options={"threshold": 0.25}),
        BenchConfig(
            "cache-dit-dbcache", "cache-dit",
            options={"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                     "max_warmup_steps": 4},
        ),
        BenchConfig(
            "cache-dit-dbcache-taylor", "cache-dit",
            options={"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12,
                     "max_warmup_steps": 4},
            calibrator={"taylorseer_order": 1},
        ),
    ]


def quick_configs() -> list[BenchConfig]:
    """A handful of configs for ``--quick`` (CI smoke run)."""
    return [
        BenchConfig("baseline"),
        _db("taylorseer-n1", PluginSpec("TaylorSeer", {"interval": 1})),
        _db("taylorseer-n2-w1", PluginSpec("TaylorSeer", {"interval": 2, "warmup": 1})),
        _db("preset-fast", preset="fast"),
        BenchConfig("diffusers-fbc-0.10", "diffusers", cache="FirstBlockCache", options={"threshold": 0.10}),
        BenchConfig(
            "cache-dit-dbcache", "cache-dit",
            options={"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                     "max_warmup_steps": 1},
        ),
    ]
