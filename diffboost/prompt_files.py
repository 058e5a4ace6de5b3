"""Prompt files for ``diffboost batch``: ``.txt``, ``.jsonl`` and ``.csv``, with per-row settings.

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
- ``.jsonl``: one JSON object per line with a ``prompt`` key and any of the row keys below.
- ``.csv``: a header row naming the columns (``prompt`` required); empty cells mean "not set". A
  cell of an extra pipeline argument is read as JSON where it parses (``0.5``, ``true``, ``[1, 2]``)
  and as text otherwise.

Row keys: ``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``size`` (height and width),
``height``, ``width``, ``guidance``, and any other argument the pipeline's ``__call__`` accepts
(``max_sequence_length``, ``num_frames``, ...) with a JSON scalar or list value; the arguments
diffboost sets itself (``generator``, ``latents``, ``output_type``, embeddings, callbacks...) are
refused. A row that is wrong (empty prompt, unknown key, a seed that is not an integer, a size the
pipeline does not take, a line that is not UTF-8) becomes a :class:`Row` with an ``error`` naming the
file, the row number, what is wrong and what is allowed: the batch records it in its manifest and
goes on with the other rows.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .limits import InputError, check_frames, check_guidance, check_seed, check_size, check_steps

#: keys every pipeline gets, whatever its arguments (diffboost maps them onto the call)
ROW_KEYS = ("prompt", "negative_prompt", "seed", "steps", "size", "height", "width", "guidance")
#: pipeline arguments a row may not set: diffboost sets them, or they change what one job makes
RESERVED = frozenset({
    "generator", "latents", "output_type", "return_dict", "num_images_per_prompt", "prompt_embeds",
    "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds", "prompt_embeds_mask",
    "negative_prompt_embeds_mask", "callback", "callback_steps", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs", "joint_attention_kwargs", "attention_kwargs", "cross_attention_kwargs",
    "ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image", "negative_ip_adapter_image_embeds",
    "self", "kwargs",
})
#: pipeline argument -> the row key to use instead
RENAMED = {"num_inference_steps": "steps", "guidance_scale": "guidance", "true_cfg_scale": "guidance"}
SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclass(frozen=True)
class Row:
    """One row of a prompt file: its settings, or why it cannot be made.

    ``number``: the line number (``.txt``, ``.jsonl``) or the record number counting the header as 1
    (``.csv``), as an editor shows it. ``settings`` holds the row keys that are set (``size`` already
    split into ``height``/``width``) and ``extra``: the other pipeline arguments."""

    number: int
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _scalar_or_list(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    return isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value)


def check_row(raw: dict[str, Any], where: str, call_args: Iterable[str] | None = None,
              native: int | None = None) -> dict[str, Any]:
    """A row's settings, checked: raises :class:`InputError` naming ``where`` (``file:row``).

    ``call_args``: the pipeline's call arguments (None: extra keys are not checked here);
    ``native``: the model's own image size (the size limits scale with it)."""
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: the row needs a non-empty 'prompt'")
    out: dict[str, Any] = {"prompt": prompt.strip()}
    if raw.get("negative_prompt") is not None:
        if not isinstance(raw["negative_prompt"], str):
            raise InputError(f"{where}: 'negative_prompt' must be text, got {raw['negative_prompt']!r}")
        out["negative_prompt"] = raw["negative_prompt"]
    if "seed" in raw:
        out["seed"] = check_seed(raw["seed"], what=f"{where}: 'seed'")
    if "steps" in raw:
        out["steps"] = check_steps(raw["steps"], what=f"{where}: 'steps'")
    if "guidance" in raw:
        out["guidance"] = check_guidance(raw["guidance"], what=f"{where}: 'guidance'")
    if "size" in raw and ("height" in raw or "width" in raw):
        raise InputError(f"{where}: give 'size' or 'height'/'width', not both")
    if "size" in raw:
        out["height"] = out["width"] = check_size(raw["size"], native, what=f"{where}: 'size'")
    for key in ("height", "width"):
        if key in raw:
            out[key] = check_size(raw[key], native, what=f"{where}: '{key}'")
    if ("height" in out) != ("width" in out):
        raise InputError(f"{where}: give both 'height' and 'width' (or 'size' for a square image)")
    extra = {k: v for k, v in raw.items() if k not in ROW_KEYS}
    allowed = None if call_args is None else sorted(set(call_args) - RESERVED - set(RENAMED) - set(ROW_KEYS))
    for key, value in sorted(extra.items()):
        if key in RENAMED:
            raise InputError(f"{where}: set '{RENAMED[key]}' instead of '{key}'")
        if key in RESERVED:
            raise InputError(f"{where}: '{key}' is set by diffboost and cannot come from a prompt file")
        if allowed is not None and key not in allowed:
            raise InputError(
                f"{where}: unknown key '{key}'; allowed: {', '.join(ROW_KEYS)}"
                + (f", and this pipeline's arguments {', '.join(allowed)}" if allowed else "")
            )
        if not _scalar_or_list(value):
            raise InputError(f"{where}: '{key}' must be a number, text, true/false or a list of them, got {value!r}")
        if key == "num_frames":  # as --frames: an absurd clip length is refused before any work
            check_frames(value, what=f"{where}: 'num_frames'")
    if extra:
        out["extra"] = dict(sorted(extra.items()))
    return out


def _decode_lines(path: Path) -> list[tuple[int, str | None, str | None]]:
    """``(line number, text or None, error or None)`` per line; a line that is not UTF-8 is an error."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"prompt file {path}: cannot read it ({err.strerror or err})") from None
    lines: list[tuple[int, str | None, str | None]] = []
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            lines.append((number, None, f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                        f"{err.start + 1}); save the prompt file as UTF-8"))
            continue
        text = text.rstrip("\r")
        lines.append((number, text.lstrip("\ufeff") if number == 1 else text, None))
    return lines


def _csv_value(key: str, cell: str) -> Any:
    """A CSV cell as the row key wants it (numbers for seed/steps/size/guidance; JSON where it parses
    for extra arguments; text otherwise)."""
    text = cell.strip()
    if key in ("prompt", "negative_prompt"):
        return cell
    if key in ("seed", "steps", "size", "height", "width"):
        try:
            return int(text)
        except ValueError:
            return text  # check_row names it: "must be an integer"
    if key == "guidance":
        try:
            return float(text)
        except ValueError:
            return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return cell


def _raw_rows(path: Path) -> list[tuple[int, dict[str, Any] | None, str | None]]:
    """``(row number, raw settings or None, error or None)`` for every non-blank row."""
    rows: list[tuple[int, dict[str, Any] | None, str | None]] = []
    suffix = path.suffix.lower()
    lines = _decode_lines(path)
    if suffix == ".csv":
        good = [(n, t) for n, t, e in lines if e is None]
        for n, _, e in lines:
            if e is not None:
                rows.append((n, None, e))
        if not good:
            return rows
        header_number, header_text = good[0]
        header = [h.strip() for h in next(csv.reader([header_text]))]
        if "prompt" not in header:
            raise InputError(f"{path}:{header_number}: the first row must name the columns, one of them 'prompt' "
                             f"(got {', '.join(header) or 'nothing'})")
        if len(set(header)) != len(header) or "" in header:
            raise InputError(f"{path}:{header_number}: column names must be unique and not empty")
        for number, text in good[1:]:
            if not text.strip():
                continue
            try:
                cells = next(csv.reader(io.StringIO(text)))
            except csv.Error as err:
                rows.append((number, None, f"{path}:{number}: not a CSV row ({err})"))
                continue
            if len(cells) > len(header):
                rows.append((number, None, f"{path}:{number}: {len(cells)} cells but {len(header)} columns "
                                           "(quote cells that contain commas)"))
                continue
            raw = {k: _csv_value(k, c) for k, c in zip(header, cells) if c.strip() != ""}
            rows.append((number, raw, None))
        rows.sort(key=lambda r: r[0])
        return rows
    for number, text, error in lines:
        if error is not None:
            rows.append((number, None, error))
            continue
        assert text is not None
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if suffix == ".jsonl":
            try:
                entry = json.loads(stripped)
            except json.JSONDecodeError as err:
                rows.append((number, None, f"{path}:{number}: not valid JSON ({err.msg})"))
                continue
            if not isinstance(entry, dict):
                rows.append((number, None, f"{path}:{number}: each JSON line must be an object with a 'prompt' key"))
                continue
            rows.append((number, entry, None))
        else:
            rows.append((number, {"prompt": stripped}, None))
    return rows


def read_rows(path: str | Path, call_args: Iterable[str] | None = None, native: int | None = None) -> list[Row]:
    """Every row of a prompt file, each checked (:func:`check_row`); bad rows carry their error.

    Raises :class:`InputError` only for problems with the whole file: missing, a folder, an unknown
    suffix, unreadable, a CSV without a ``prompt`` column, or no row at all."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"prompt file {path} is a folder; give a .txt, .jsonl or .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix.lower() not in SUFFIXES and path.suffix:
        raise InputError(f"prompt file {path}: unknown type {path.suffix!r}; use .txt (one prompt per line), .jsonl "
                         "or .csv")
    rows: list[Row] = []
    call_args = None if call_args is None else set(call_args)
    for number, raw, error in _raw_rows(path):
        if error is None:
            assert raw is not None
            try:
                rows.append(Row(number, check_row(raw, f"{path}:{number}", call_args, native)))
            except InputError as err:
                rows.append(Row(number, error=str(err)))
        else:
            rows.append(Row(number, error=error))
    if not rows:
        raise InputError(f"prompt file {path} holds no prompts (one per line, JSON Lines with a 'prompt' key, or a CSV "
                         "with a 'prompt' column)")
    return rows


def pipeline_call_args(model: Path) -> set[str] | None:
    """The call arguments of a pipeline folder's class (from ``model_index.json``, without loading
    weights); None when the class is unknown to the installed diffusers."""
    import inspect

    try:
        name = json.loads((Path(model) / "model_index.json").read_text())["_class_name"]
        import diffusers

        cls = getattr(diffusers, name)
    except (OSError, KeyError, ValueError, AttributeError, ImportError):
        return None
    return set(inspect.signature(cls.__call__).parameters)
