"""diffboost.media: settings inside PNGs, videos written and read back in every format."""

import numpy as np
import pytest
from PIL import Image

from diffboost import media


def test_png_settings_round_trip(tmp_path):
    settings = {"prompt": "a red circle", "seed": 3, "steps": 4, "guidance": None, "plugin_stack": {"plugins": []}}
    path = tmp_path / "a.png"
    media.save_image(Image.new("RGB", (8, 8), "red"), path, settings)
    assert media.read_settings(path) == settings
    text = Image.open(path).text
    assert text["prompt"] == "a red circle" and text["seed"] == "3" and "guidance" not in text
    media.save_image(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    with pytest.raises(ValueError, match="carries no diffboost settings"):
        media.read_settings(tmp_path / "b.png")


@pytest.mark.parametrize("suffix", [".mp4", ".webp", ".gif"])
def test_videos_are_written_and_read_back(tmp_path, suffix):
    if suffix == ".mp4" and not media.ffmpeg_available():
        pytest.skip("imageio-ffmpeg is not installed")
    frames = np.zeros((5, 17, 24, 3), dtype=np.float32)  # odd height: MP4 pads one row
    for i in range(5):
        frames[i, :, : 4 * (i + 1)] = 1.0
    path = tmp_path / f"clip{suffix}"
    media.save_video(frames, path, {"prompt": "p", "num_frames": 5})
    back = media.read_video(path)
    assert len(back) == 5 and back[0].shape[1] == 24 and back[0].shape[0] in (17, 18)
    bright = [float(f[:17].mean()) for f in back]
    assert bright == sorted(bright) and bright[-1] > bright[0] + 50  # the frames are in order
    assert media.read_settings(path) == {"prompt": "p", "num_frames": 5}
    assert not list(tmp_path.glob(".*.tmp"))


def test_video_helpers():
    with pytest.raises(ValueError, match="at least one frame"):
        media.video_frames([])
    with pytest.raises(ValueError, match="unsupported type '.avi'"):
        media.write_video(np.zeros((2, 4, 4, 3)), "x.avi")
