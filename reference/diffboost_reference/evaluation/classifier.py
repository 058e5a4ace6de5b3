"""Attribute classifier ("evaluator") for procedural scenes: one head per attribute + an embedding."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffboost_reference.data.scenes import ATTRIBUTES
from diffboost_reference.evaluation.images import to_tensor01

logger = logging.getLogger(__name__)

DEFAULT_EVALUATOR_DIR = Path(__file__).resolve().parents[3] / "assets" / "evaluator"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """Small CNN on 64x64 RGB: a head per attribute plus a normalised embedding."""

    def __init__(
        self,
        attributes: dict[str, list[str]] | None = None,
        channels: tuple[int, ...] = (32, 64, 96, 128),
        embed_dim: int = 128,
        image_size: int = 64,
    ) -> None:
        super().__init__()
        self.attributes = {k: list(v) for k, v in (attributes or ATTRIBUTES).items()}
        self.channels = tuple(channels)
        self.embed_dim = embed_dim
        self.image_size = image_size
        layers = [_block(3, channels[0], 2)]
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers.append(_block(cin, cout, 2))
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, embed_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim, len(v)) for k, v in self.attributes.items()})

    def config(self) -> dict[str, Any]:
        return {
            "attributes": self.attributes,
            "channels": list(self.channels),
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
        }

    def prepare(self, images: Any) -> torch.Tensor:
        """Any supported image format -> normalised model input."""
        x = to_tensor01(images)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return x * 2 - 1

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``x`` in [-1, 1] -> (logits per attribute, embedding)."""
        emb = self.embed(self.features(x))
        return {k: head(emb) for k, head in self.heads.items()}, emb

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 256) -> list[dict[str, str]]:
        """Predicted attribute values for each image."""
        self.eval()
        x = self.prepare(images)
        out: list[dict[str, str]] = []
        for i in range(0, len(x), batch_size):
            logits, _ = self(x[i : i + batch_size])
            idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
            for j in range(len(x[i : i + batch_size])):
                out.append({k: self.attributes[k][idx[k][j]] for k in self.attributes})
        return out

    @torch.no_grad()
    def embed_images(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Embedding vectors (N, embed_dim)."""
        self.eval()
        x = self.prepare(images)
        return torch.cat([self(x[i : i + batch_size])[1] for i in range(0, len(x), batch_size)])

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps({**self.config(), **(extra or {})}, indent=2))


def evaluator_available(path: str | Path = DEFAULT_EVALUATOR_DIR) -> bool:
    """Whether trained evaluator weights exist at ``path``."""
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


@lru_cache(maxsize=4)
def _load(path: str) -> AttributeClassifier:
    cfg = json.loads((Path(path) / CONFIG).read_text())
    model = AttributeClassifier(cfg["attributes"], tuple(cfg["channels"]), cfg["embed_dim"], cfg["image_size"])
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
    return model.eval().requires_grad_(False)


def load_evaluator(path: str | Path = DEFAULT_EVALUATOR_DIR) -> AttributeClassifier:
    """Load the shipped evaluator (safetensors only); cached per path."""
    if not evaluator_available(path):
        raise FileNotFoundError(f"no evaluator at {path}; train it with python -m diffboost_reference.training.train_evaluator")
    return _load(str(Path(path).resolve()))
