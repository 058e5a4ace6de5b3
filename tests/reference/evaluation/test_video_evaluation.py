"""The video evaluator: right on drawn clips, wrong when the clip contradicts its caption."""

import numpy as np
import pytest

from diffboost_reference.data import videos
from diffboost_reference.evaluation import videos as ev
from diffboost_reference.evaluation.classifier import evaluator_available

needs_evaluator = pytest.mark.skipif(not evaluator_available(), reason="the shipped evaluator is missing")


@needs_evaluator
def test_drawn_clips_score_high_and_contradictions_score_low():
    specs = videos.held_out(48)
    clips = [videos.render(s, seed=i) for i, s in enumerate(specs)]
    captions = [s.caption() for s in specs]
    acc = ev.video_accuracy(clips, captions)
    assert acc["motion"] == 1.0 and acc["color"] >= 0.95 and acc["all"] >= 0.9
    # time reversed: every path goes the other way, growing becomes shrinking, turning ends in the start colour
    reversed_acc = ev.video_accuracy([c[::-1] for c in clips], captions)
    assert reversed_acc["motion"] <= 0.2
    # a caption of another colour or shape is not matched
    wrong = [c.replace(s.color, "orange" if s.color != "orange" else "blue", 1) for c, s in zip(captions, specs)]
    assert ev.video_accuracy(clips, wrong)["color"] <= 0.1
    # a static clip (the first frame repeated) has no motion
    static = [np.repeat(c[:1], 9, axis=0) for c in clips]
    assert ev.video_accuracy(static, captions)["motion"] == 0.0
    with pytest.raises(ValueError, match="one caption per clip"):
        ev.video_accuracy(clips, captions[:-1])


def test_counter_clockwise_circles_and_noise_are_not_motions():
    spec = videos.ClipSpec("circle", "red", "black", videos.CIRCLE)
    clip = videos.render(spec, seed=0)
    assert ev.classify_motion(ev.track(clip)) == videos.CIRCLE
    mirrored = clip[:, :, ::-1]  # a mirror image turns the other way
    assert ev.classify_motion(ev.track(mirrored)) == "other"
    empty = np.full((9, 64, 64, 3), 128, np.uint8)
    assert ev.classify_motion(ev.track(empty)) == "other"


def test_framewise_fidelity_and_formats():
    clip = videos.render(videos.ClipSpec("star", "blue", "white", "left to right"), seed=2)
    same = ev.framewise_fidelity([clip], [clip.astype(np.float32) / 255.0])
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    noisy = np.clip(clip.astype(int) + np.random.default_rng(0).integers(-20, 20, clip.shape), 0, 255).astype(np.uint8)
    worse = ev.framewise_fidelity([noisy], [clip])
    assert 15 < worse["psnr"] < 40 and worse["ssim"] < 1.0
    import torch

    as_tensor = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0  # (F, C, H, W) in [0, 1]
    assert np.array_equal(ev.as_frames(as_tensor), clip)
    with pytest.raises(ValueError, match="clip shapes differ"):
        ev.framewise_fidelity([clip], [clip[:5]])
    with pytest.raises(ValueError, match=r"a clip is \(frames, H, W, 3\)"):
        ev.as_frames(clip[0])
