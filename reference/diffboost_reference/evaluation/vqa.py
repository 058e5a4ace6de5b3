"""Accuracy of a vision-language model on the procedural questions (:mod:`diffboost_reference.data.vqa`).

An answer is right when the first generated word equals the expected one-word answer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch

from diffboost_reference.data import vqa


def batches(examples: list[vqa.Example], size: int) -> Iterable[list[vqa.Example]]:
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def inputs(processor: Any, examples: list[vqa.Example]) -> dict[str, torch.Tensor]:
    """The processor's tensors for a list of examples (left-padded prompts)."""
    return processor(
        images=[e.pil() for e in examples], text=[f"<image> {e.question}" for e in examples],
        return_tensors="pt", padding=True,
    )


@torch.no_grad()
def answers(model: Any, processor: Any, examples: list[vqa.Example], batch_size: int = 64,
            **generate_kwargs: Any) -> list[str]:
    """Greedy answers (the first generated word) of ``model`` to ``examples``."""
    out: list[str] = []
    tok = processor.tokenizer
    kwargs = {"max_new_tokens": 2, "do_sample": False, **generate_kwargs}
    for chunk in batches(examples, batch_size):
        enc = inputs(processor, chunk)
        ids = model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1] :]
        for row in new.tolist():
            words = tok.convert_ids_to_tokens(row[:1])
            out.append(words[0] if words else "")
    return out


def accuracy(predicted: list[str], examples: list[vqa.Example]) -> dict[str, float]:
    """Share of right answers, overall (``"all"``) and per question type."""
    if len(predicted) != len(examples):
        raise ValueError(f"{len(predicted)} answers for {len(examples)} examples")
    right: dict[str, list[int]] = defaultdict(list)
    for p, e in zip(predicted, examples):
        ok = int(p == e.answer)
        right["all"].append(ok)
        right[e.qtype].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(right.items())}
