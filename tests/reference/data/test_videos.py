"""Procedural clips: captions round-trip, every motion draws what its caption says."""

import random

import numpy as np
import pytest

from diffboost_reference.data import videos
from diffboost_reference.evaluation.videos import track


def test_captions_round_trip_for_every_motion():
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        spec = videos.random_spec(rng)
        seen.add(spec.motion)
        assert videos.parse_caption(spec.caption()) == spec
    assert seen == set(videos.MOTIONS)
    assert videos.parse_caption("a red circle moving from left to right on a white background").motion == "left to right"
    assert videos.parse_caption("a blue star turning green on a gray background").color_to == "green"
    for bad in ("a red circle on a white background", "a pink circle growing on a white background",
                "a red circle moving from left to up on a white background"):
        with pytest.raises(ValueError):
            videos.parse_caption(bad)
    assert set(videos.vocabulary()) >= {"moving", "circle", "growing", "turning", "left", "bottom"}


@pytest.mark.parametrize("motion", videos.MOTIONS)
def test_each_motion_is_drawn_as_captioned(motion):
    spec = videos.ClipSpec("square", "red", "white", motion, "blue" if motion == videos.TURN else None)
    clip = videos.render(spec, seed=1, frames=9)
    assert clip.shape == (9, 64, 64, 3) and clip.dtype == np.uint8
    points = track(clip)
    centres = np.array([p["center"] for p in points])
    areas = np.array([p["area"] for p in points])
    if motion in videos.PATHS:
        (x0, y0), (x1, y1) = videos.PATHS[motion]
        assert np.allclose(centres[-1] - centres[0], (x1 - x0, y1 - y0), atol=2.0)
    elif motion == videos.CIRCLE:
        assert np.linalg.norm(centres - centres.mean(0), axis=1).min() > 10  # it goes round, not through the middle
    elif motion == videos.GROW:
        assert np.all(np.diff(areas) > 0)
    elif motion == videos.SHRINK:
        assert np.all(np.diff(areas) < 0)
    else:
        assert points[0]["color"][0] > 150 and points[-1]["color"][2] > 150  # red to blue
    assert videos.render(spec, seed=1, frames=9).tobytes() == clip.tobytes()  # a function of the seed


def test_held_out_captions_cover_every_motion_and_stay_below_training_seeds():
    specs = videos.held_out(24)
    assert len(specs) == 24 and {s.motion for s in specs} == set(videos.MOTIONS)
    assert videos.make_clip(videos.TRAIN_SEED_BASE).frames.shape == (9, 64, 64, 3)
