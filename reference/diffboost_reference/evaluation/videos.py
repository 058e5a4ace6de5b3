"""A GenEval-like score for the procedural clips (:mod:`diffboost_reference.data.videos`).

For each generated clip and its caption:

- **attributes per frame**: the shipped image evaluator (:mod:`.classifier`) names the shape in every
  frame (the clip's shape is the majority) and the colour in the first frame (and, for "turning",
  the last frame);
- **motion**: the object is found in every frame as the pixels far from the background colour (the
  median of the border), and its track decides: a straight path and its direction, a clockwise
  circle, growing, shrinking, or a colour change (:func:`classify_motion`);
- **temporal consistency**: the share of frames whose shape (and colour, unless the caption says the
  colour changes) equals the clip's majority: 1.0 is one stable object, lower is flicker or morphing.

:func:`video_accuracy` gives the share of clips right per attribute (``shape``, ``color``,
``motion``) and ``all`` (everything right, the adherence number); :func:`framewise_fidelity` gives
per-frame PSNR and SSIM against reference clips (the plain pipeline's).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

from diffboost_reference.data import videos
from diffboost_reference.data.scenes import COLORS

#: a pixel belongs to the object when its colour is this far (RGB, 0-255) from the background
FOREGROUND_DISTANCE = 60.0
#: net displacement (pixels at 64 px) above which a clip moves along a path
MIN_TRAVEL = 15.0


def as_frames(video: Any) -> np.ndarray:
    """A clip as uint8 ``(frames, H, W, 3)``: from uint8 or [0, 1] float arrays, tensors ``(F, C, H, W)``
    or ``(F, H, W, C)``, or a list of PIL images."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in video])
    arr = np.asarray(video)
    if arr.ndim != 4:
        raise ValueError(f"a clip is (frames, H, W, 3); got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


def track(video: Any) -> list[dict[str, Any]]:
    """Per frame: the object's centre (x, y in pixels of a 64 px frame), area (share of the frame) and
    mean colour; ``None`` centre when no pixel stands out from the background."""
    frames = as_frames(video).astype(np.float32)
    scale = 64.0 / frames.shape[2]
    out = []
    for frame in frames:
        border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
        bg = np.median(border, axis=0)
        mask = np.linalg.norm(frame - bg, axis=-1) > FOREGROUND_DISTANCE
        if mask.sum() < 3:
            out.append({"center": None, "area": 0.0, "color": None})
            continue
        ys, xs = np.nonzero(mask)
        out.append({"center": ((xs.mean() + 0.5) * scale, (ys.mean() + 0.5) * scale), "area": float(mask.mean()),
                    "color": frame[mask].mean(axis=0)})
    return out


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    dist = [np.linalg.norm(np.asarray(COLORS[n], dtype=np.float32) - rgb) for n in names]
    return names[int(np.argmin(dist))]


def classify_motion(points: list[dict[str, Any]]) -> str:
    """The motion class of a track: a :data:`videos.PATHS` direction, ``in a circle`` (clockwise),
    ``growing``, ``shrinking``, ``turning <colour>``, or ``static`` / ``other`` (never right)."""
    seen = [p for p in points if p["center"] is not None]
    if len(seen) < max(2, len(points) // 2):
        return "other"
    centres = np.array([p["center"] for p in seen])
    k = max(1, len(seen) // 4)
    start, end = centres[:k].mean(0), centres[-k:].mean(0)
    net = end - start
    path = float(np.linalg.norm(np.diff(centres, axis=0), axis=1).sum())
    travel = float(np.linalg.norm(net))
    if travel > MIN_TRAVEL and path < 1.6 * travel:
        if abs(net[0]) > 2 * abs(net[1]):
            return "left to right" if net[0] > 0 else "right to left"
        if abs(net[1]) > 2 * abs(net[0]):
            return "top to bottom" if net[1] > 0 else "bottom to top"
        return "other"
    if path > 2.5 * MIN_TRAVEL and travel < MIN_TRAVEL * 1.5:
        rel = centres - centres.mean(0)
        # on screen (y down) a clockwise turn has a positive cross product of consecutive positions
        cross = float(np.sum(rel[:-1, 0] * rel[1:, 1] - rel[:-1, 1] * rel[1:, 0]))
        spread = float(np.linalg.norm(rel, axis=1).mean())
        if spread > 6.0:
            return videos.CIRCLE if cross > 0 else "other"
    areas = np.array([p["area"] for p in seen])
    ratio = areas[-k:].mean() / max(areas[:k].mean(), 1e-6)
    if ratio > 1.8:
        return videos.GROW
    if ratio < 1 / 1.8:
        return videos.SHRINK
    first, last = seen[0]["color"], seen[-1]["color"]
    if np.linalg.norm(last - first) > 60.0 and nearest_color(last) != nearest_color(first):
        return f"{videos.TURN} {nearest_color(last)}"
    return "static"


def clip_attributes(videos_: Sequence[Any], evaluator: Any = None) -> list[dict[str, Any]]:
    """Predicted ``shape``, ``color``, ``motion`` (with the colour for turning) and ``consistency``
    for each clip."""
    from .classifier import load_evaluator

    evaluator = evaluator or load_evaluator()
    out = []
    for video in videos_:
        frames = as_frames(video)
        preds = evaluator.predict(frames)
        shapes = [p["shape"] for p in preds]
        shape = Counter(shapes).most_common(1)[0][0]
        motion = classify_motion(track(frames))
        color = preds[0]["color"]
        stable = [s == shape and (motion.startswith(videos.TURN) or p["color"] == color)
                  for s, p in zip(shapes, preds)]
        out.append({"shape": shape, "color": color, "motion": motion, "consistency": float(np.mean(stable))})
    return out


def video_accuracy(videos_: Sequence[Any], captions: Sequence[str], evaluator: Any = None) -> dict[str, float]:
    """Share of clips whose predicted shape, colour and motion match the caption (``all``: every one),
    and the mean temporal ``consistency``."""
    if len(videos_) != len(captions):
        raise ValueError(f"need one caption per clip, got {len(captions)} for {len(videos_)}")
    specs = [videos.parse_caption(c) for c in captions]
    preds = clip_attributes(videos_, evaluator)
    right = {"shape": [], "color": [], "motion": []}
    for spec, pred in zip(specs, preds):
        want = spec.motion if spec.motion != videos.TURN else f"{videos.TURN} {spec.color_to}"
        right["shape"].append(pred["shape"] == spec.shape)
        right["color"].append(pred["color"] == spec.color)
        right["motion"].append(pred["motion"] == want)
    out = {k: float(np.mean(v)) for k, v in right.items()}
    out["all"] = float(np.mean([all(v[i] for v in right.values()) for i in range(len(specs))]))
    out["consistency"] = float(np.mean([p["consistency"] for p in preds]))
    return out


def framewise_fidelity(videos_: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """Mean per-frame PSNR (dB) and SSIM of clips against reference clips of the same shape."""
    import torch

    from diffboost.fidelity import psnr, ssim

    ps, ss = [], []
    for video, ref in zip(videos_, references, strict=True):
        a = torch.from_numpy(as_frames(video)).permute(0, 3, 1, 2).float() / 255.0
        b = torch.from_numpy(as_frames(ref)).permute(0, 3, 1, 2).float() / 255.0
        if a.shape != b.shape:
            raise ValueError(f"clip shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        ps.append(float(psnr(a, b)))
        ss.append(float(ssim(a, b)))
    finite = [p for p in ps if math.isfinite(p)]
    return {"psnr": float(np.mean(finite)) if finite else math.inf, "ssim": float(np.mean(ss))}
