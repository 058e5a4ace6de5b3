"""Plugin stacks as files: ``diffboost.save(stack, path)`` and ``diffboost.load(path)``.

A stack file is TOML or JSON (by its suffix) holding a format name, a version and the plugin
configs in order, each with its class name and every field (so that a saved stack reproduces the
same run when defaults change later)::

    format = "diffboost-stack"
    version = 1

    [[plugins]]
    plugin = "TaylorSeer"
    interval = 4
    order = 1
    warmup = 6
    ...

``load`` validates with the plugin constructors themselves, so a bad value gets the same error as
in Python, prefixed with the file and the entry. Presets are stack files (``diffboost/presets/``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from .base import Plugin

FORMAT = "diffboost-stack"
VERSION = 1
SUFFIXES = (".toml", ".json")

logger = logging.getLogger(__name__)


class StackFileError(ValueError):
    """A stack file that cannot be read or written; the message names the file and the entry."""


def plugin_classes() -> dict[str, type[Plugin]]:
    """Every plugin config class by name (the classes ``diffboost`` exports)."""
    from ..caches.block_cache import AdaptiveBlockCache, ErrorControlledCache
    from ..caches.easycache import EasyCache
    from ..caches.taylorseer import TaylorSeer
    from ..kernels.attention import QuantizedAttention, SparseAttention
    from ..samplers.bottleneck import BottleneckSampling
    from ..samplers.onestep import OneStep
    from ..samplers.sada import SADA
    from ..tokens.merging import TokenDownsampling, TokenMerging

    classes = (AdaptiveBlockCache, ErrorControlledCache, EasyCache, TaylorSeer, BottleneckSampling, SADA, TokenDownsampling,
               TokenMerging, QuantizedAttention, SparseAttention, OneStep)
    return {c.__name__: c for c in classes}


def _plain(value: Any) -> Any:
    """A field value as JSON/TOML data (tuples become lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _frozen(value: Any) -> Any:
    """Data back as a field value (lists become tuples, as the configs' defaults are)."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


#: the folder of the preset files (``diffboost/presets/NAME.toml``)
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


def _plugins_of(item: Any) -> list[Plugin]:
    """Plugin configs, preset names (read from :data:`PRESET_DIR`) and nested lists of them, in order."""
    if isinstance(item, Plugin):
        return [item]
    if isinstance(item, str):
        path = PRESET_DIR / f"{item}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
            raise ValueError(f"unknown preset {item!r}; available presets: {known}")
        return load(path)
    if isinstance(item, (list, tuple)):
        return [p for sub in item for p in _plugins_of(sub)]
    raise TypeError(f"a stack holds plugin configs (e.g. diffboost.TaylorSeer()) or preset names, "
                    f"got {type(item).__name__}: {item!r}")


def to_data(stack: Any) -> dict[str, Any]:
    """The stack (plugin configs, preset names, or a list of them) as a JSON-able dict."""
    plugins = _plugins_of(stack)
    entries = []
    for plugin in plugins:
        entry: dict[str, Any] = {"plugin": type(plugin).__name__}
        for f in dataclasses.fields(plugin):
            if f.init:
                entry[f.name] = _plain(getattr(plugin, f.name))
        entries.append(entry)
    return {"format": FORMAT, "version": VERSION, "plugins": entries}


def from_data(data: Any, where: str = "stack") -> list[Plugin]:
    """Plugin configs from :func:`to_data`'s dict; every problem is a :class:`StackFileError`."""
    if not isinstance(data, dict):
        raise StackFileError(f"{where}: expected a table with 'format', 'version' and 'plugins', got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise StackFileError(f"{where}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if version != VERSION:
        raise StackFileError(f"{where}: stack format version {version!r} is not supported; this diffboost reads version {VERSION}")
    unknown = set(data) - {"format", "version", "plugins"}
    if unknown:
        raise StackFileError(f"{where}: unknown keys {sorted(unknown)}; allowed: format, version, plugins")
    entries = data.get("plugins")
    if not isinstance(entries, list) or not entries:
        raise StackFileError(f"{where}: 'plugins' must be a non-empty list of plugin tables")
    classes = plugin_classes()
    plugins: list[Plugin] = []
    for i, entry in enumerate(entries):
        at = f"{where}: plugins[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("plugin"), str):
            raise StackFileError(f"{at}: each plugin is a table with a 'plugin' key (class name), got {entry!r}")
        name = entry["plugin"]
        cls = classes.get(name)
        if cls is None:
            raise StackFileError(f"{at}: unknown plugin {name!r}; known plugins: {sorted(classes)}")
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        for former, current in cls.renamed.items():  # files written before a rename still load
            if former in entry and current not in entry:
                logger.warning("%s (%s): field %r is now called %r; re-save the file to update it",
                               at, name, former, current)
                entry = {(current if k == former else k): v for k, v in entry.items()}
        extra = sorted(set(entry) - {"plugin"} - set(fields))
        if extra:
            raise StackFileError(f"{at} ({name}): unknown fields {extra}; {name} accepts {fields}")
        try:
            plugins.append(cls(**{k: _frozen(v) for k, v in entry.items() if k != "plugin"}))
        except (TypeError, ValueError) as err:
            raise StackFileError(f"{at} ({name}): {err}") from None
    return plugins


# ----------------------------------------------------------------------------------------------
# TOML: a writer for the few value types a config holds (the standard library only reads TOML)
# ----------------------------------------------------------------------------------------------


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise StackFileError(f"{where}: {value!r} ({type(value).__name__}) cannot be written as TOML; save as .json")


def _to_toml(data: dict[str, Any]) -> str:
    lines = [f"format = {json.dumps(data['format'])}", f"version = {data['version']}"]
    for entry in data["plugins"]:
        lines += ["", "[[plugins]]"]
        for key, value in entry.items():
            if value is None:  # TOML has no null: a missing field takes its default (None)
                continue
            where = f"{entry['plugin']}.{key}"
            lines.append(f"{key} = {_toml_value(value, where)}")
    return "\n".join(lines) + "\n"


def _read_toml(text: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise StackFileError("reading TOML needs Python 3.11 or the tomli package; or save the stack as .json") from None
    return tomllib.loads(text)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StackFileError(f"stack file {path}: unsupported type {suffix or '(no suffix)'!r}; use .toml or .json")
    return suffix


def save(stack: Any, path: str | Path) -> Path:
    """Write ``stack`` (plugin configs and/or preset names) to ``path`` (``.toml`` or ``.json``),
    atomically. Returns the path. ``diffboost.load(path)`` gives back an equal list."""
    from ..files import write_text_atomic

    path = Path(path)
    suffix = _suffix(path)
    data = to_data(stack)
    if not data["plugins"]:
        raise StackFileError("nothing to save: the stack is empty")
    for entry in data["plugins"]:  # None cannot be written to TOML unless it is the field's default
        cls = plugin_classes()[entry["plugin"]]
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        for key, value in entry.items():
            if suffix == ".toml" and value is None and defaults.get(key) is not None:
                raise StackFileError(f"{entry['plugin']}.{key}=None cannot be written as TOML; save as .json")
    text = _to_toml(data) if suffix == ".toml" else json.dumps(data, indent=2) + "\n"
    write_text_atomic(path, text)
    return path


def load(path: str | Path) -> list[Plugin]:
    """The plugin configs of a stack file written by :func:`save` (or by hand), validated."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"stack file {path} does not exist") from None
    except UnicodeDecodeError:
        raise StackFileError(f"stack file {path} is not UTF-8 text") from None
    try:
        data = _read_toml(text) if suffix == ".toml" else json.loads(text)
    except StackFileError:
        raise
    except ValueError as err:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise StackFileError(f"stack file {path} is not valid {suffix[1:].upper()}: {err}") from None
    return from_data(data, where=f"stack file {path}")
