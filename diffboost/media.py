"""Writing what a pipeline made, with its settings inside: PNG text chunks for images, MP4 (or an
animated WebP/GIF when ffmpeg is missing) plus a sidecar JSON for videos. Every write is atomic.

The settings of an output (prompt, negative prompt, seed, steps, size, guidance, model folder, the
plugin stack as data, diffboost's version) travel with it: ``PIL.Image.open(path).text["diffboost"]``
holds them as JSON, and the common ones are also plain chunks (``prompt``, ``seed``...), as other
tools write them. :func:`read_settings` reads either kind of output back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .files import write_atomic

logger = logging.getLogger("diffboost")

#: frames per second of written videos (the reference video model's clips are short)
DEFAULT_FPS = 8
#: settings also written as plain PNG text chunks, next to the full JSON under ``diffboost``
PLAIN_CHUNKS = ("prompt", "negative_prompt", "seed", "steps", "height", "width", "guidance", "model")
SIDECAR_SUFFIX = ".json"

_fallback_said: set[str] = set()


def png_info(settings: dict[str, Any]) -> Any:
    """A ``PngInfo`` with ``settings`` as JSON under ``diffboost`` and the common ones as plain text."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("diffboost", json.dumps(settings, sort_keys=True, default=str))
    for key in PLAIN_CHUNKS:
        if settings.get(key) is not None:
            info.add_itxt(key, str(settings[key]))
    return info


def save_image(image: Any, path: str | Path, settings: dict[str, Any] | None = None) -> None:
    """Write ``image`` atomically in the format its suffix names; PNGs carry ``settings``."""
    from .limits import image_format

    path = Path(path)
    fmt = image_format(path)
    kwargs: dict[str, Any] = {}
    if settings is not None and fmt == "PNG":
        kwargs["pnginfo"] = png_info(settings)
    write_atomic(path, lambda tmp: image.save(tmp, format=fmt, **kwargs))


def ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or no binary for this platform
        return False
    return True


def video_suffix() -> str:
    """The file type videos are written as here: ``.mp4`` with ffmpeg (``pip install diffboost[video]``),
    else animated ``.webp`` (or ``.gif`` where Pillow has no WebP)."""
    if ffmpeg_available():
        return ".mp4"
    from PIL import features

    return ".webp" if features.check("webp") else ".gif"


def _say_fallback(suffix: str) -> None:
    if suffix not in _fallback_said:
        _fallback_said.add(suffix)
        logger.warning("imageio-ffmpeg is not installed: videos are written as animated %s instead of MP4 "
                       "(pip install 'diffboost[video]' for MP4)", suffix.lstrip(".").upper())


def video_frames(video: Any) -> list[Any]:
    """A pipeline's video (a list of PIL images, or an array ``(frames, H, W, C)`` in [0, 1] or uint8)
    as RGB uint8 arrays."""
    import numpy as np

    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    frames = []
    for frame in video:
        if hasattr(frame, "convert"):
            frames.append(np.asarray(frame.convert("RGB"), dtype=np.uint8))
            continue
        arr = np.asarray(frame)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        frames.append(arr[..., :3])
    if not frames:
        raise ValueError("a video needs at least one frame")
    return frames


def write_video(video: Any, path: str | Path, fps: int = DEFAULT_FPS) -> None:
    """Write a video atomically: H.264 MP4 for ``.mp4`` (imageio-ffmpeg), animated WebP/GIF through
    Pillow for ``.webp``/``.gif`` (an ``.mp4`` path without ffmpeg is an error: ask
    :func:`video_suffix` for the type this machine writes)."""
    import numpy as np

    path = Path(path)
    frames = video_frames(video)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        import imageio_ffmpeg

        h, w = frames[0].shape[:2]

        def write(tmp: str) -> None:
            # yuv420p (what every player reads) needs even sides: pad by one pixel where needed
            pad_h, pad_w = h % 2, w % 2
            writer = imageio_ffmpeg.write_frames(
                tmp, (w + pad_w, h + pad_h), fps=fps, codec="libx264", quality=9, macro_block_size=1,
                pix_fmt_out="yuv420p", output_params=["-f", "mp4"], ffmpeg_log_level="error",
            )
            writer.send(None)
            for frame in frames:
                if pad_h or pad_w:
                    frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                writer.send(np.ascontiguousarray(frame).tobytes())
            writer.close()

        write_atomic(path, write)
        return
    if suffix not in (".webp", ".gif"):
        raise ValueError(f"video file {path}: unsupported type {suffix or '(none)'!r}; use .mp4, .webp or .gif")
    _say_fallback(suffix)
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    fmt = "WEBP" if suffix == ".webp" else "GIF"
    extra: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    write_atomic(path, lambda tmp: images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:],
                                                  duration=round(1000 / fps), loop=0, **extra))


def read_video(path: str | Path) -> list[Any]:
    """The frames of a video written by :func:`write_video`, as RGB uint8 arrays."""
    import numpy as np

    path = Path(path)
    if path.suffix.lower() == ".mp4":
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        return [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]


def sidecar(path: str | Path) -> Path:
    """The settings file next to a video: ``clip.mp4`` -> ``clip.mp4.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_video(video: Any, path: str | Path, settings: dict[str, Any] | None = None, fps: int = DEFAULT_FPS) -> None:
    """Write the video, then (atomically) its sidecar JSON with ``settings``."""
    write_video(video, path, fps)
    if settings is not None:
        text = json.dumps(settings, sort_keys=True, indent=1, default=str) + "\n"
        write_atomic(sidecar(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings an output was made with: a PNG's ``diffboost`` chunk or a video's sidecar JSON."""
    path = Path(path)
    if sidecar(path).is_file():
        return json.loads(sidecar(path).read_text(encoding="utf-8"))
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", {}) or {}
        if "diffboost" not in text:
            raise ValueError(f"{path} carries no diffboost settings")
        return json.loads(text["diffboost"])
