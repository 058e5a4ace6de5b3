"""Procedural visual questions: every answer is true of its scene."""

from collections import Counter

import numpy as np
import pytest

from diffboost_reference.data import vqa


def test_answers_are_true_of_their_scenes():
    for seed in range(400):
        e = vqa.make_example(seed)
        shapes = [o.shape for o in e.objects]
        assert 1 <= len(e.objects) <= vqa.MAX_OBJECTS and len({o.cell for o in e.objects}) == len(e.objects)
        if e.qtype == "color":
            shape = e.question.split()[-2]
            assert shapes.count(shape) == 1
            assert e.answer == next(o.color for o in e.objects if o.shape == shape)
        elif e.qtype == "shape":
            cell = e.question[len("what shape is at the "):-2]
            assert e.answer == next(o.shape for o in e.objects if o.cell == cell)
        elif e.qtype == "count":
            plural = e.question.split()[2]
            assert vqa.NUMBERS.index(e.answer) == shapes.count(plural[:-1])
        else:
            color = e.question.split()[3]
            assert e.answer == ("yes" if color in {o.color for o in e.objects} else "no")
        assert set(e.question.split()) <= set(vqa.vocabulary()) and e.answer in vqa.ANSWERS


def test_balance_determinism_and_disjoint_sets():
    held = vqa.held_out(400)
    assert Counter(e.qtype for e in held) == {t: 100 for t in vqa.QUESTION_TYPES}
    assert Counter(e.answer for e in held if e.qtype == "exists")["yes"] in range(35, 66)
    a, b = vqa.make_example(123), vqa.make_example(123)
    assert a == b and np.array_equal(a.image(), b.image())
    assert max(e.seed for e in held) < vqa.TRAIN_SEED_BASE
    with pytest.raises(ValueError, match="held-out sets have"):
        vqa.held_out(10, offset=vqa.TRAIN_SEED_BASE - 5)
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        vqa.make_example(1, "size")


def test_objects_are_drawn_where_the_scene_says():
    e = vqa.make_example(7, "shape")
    img = e.image().astype(int)
    bg = img[0, 0]
    for cell, (x, y) in vqa.CELLS.items():
        differs = np.abs(img[int(y), int(x)] - bg).sum() > 60
        assert differs == (cell in {o.cell for o in e.objects})


def test_describe_lists_objects_in_raster_order():
    e = vqa.Example((vqa.Obj("star", "red", "bottom"), vqa.Obj("circle", "blue", "top left")), "white", "", "", "shape", 0)
    assert vqa.describe(e) == "blue circle top left and red star bottom"
