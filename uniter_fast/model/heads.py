"""Pretraining heads with the reference's names and weight ties.

The MLM decoder reads the word-embedding matrix and the MRFR regression reads the transpose of
`img_linear.weight`; both are held as references to those parameters (one tensor each), and the
reference layout's tied keys are written back on export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UniterConfig


def _transform(config: UniterConfig) -> list[nn.Module]:
    return [
        nn.Linear(config.hidden_size, config.hidden_size),
        nn.GELU(),
        nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
    ]


class PredictionHeadTransform(nn.Module):
    """dense, gelu, LayerNorm (the reference's `cls.predictions.transform`)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """transform -> decoder (tied to word embeddings, no bias of its own) + vocab bias."""

    def __init__(self, config: UniterConfig, word_embeddings: nn.Parameter):
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class MLMHead(nn.Module):
    def __init__(self, config: UniterConfig, word_embeddings: nn.Parameter):
        super().__init__()
        self.predictions = LMPredictionHead(config, word_embeddings)


class RegionFeatureRegression(nn.Module):
    """net (dense, gelu, LayerNorm), then `x @ img_linear.weight + bias` (tied weight)."""

    def __init__(self, config: UniterConfig, img_dim: int, img_linear_weight: nn.Parameter):
        super().__init__()
        self.net = nn.Sequential(*_transform(config))
        self.weight = img_linear_weight
        self.bias = nn.Parameter(torch.zeros(img_dim))


class RegionClassification(nn.Module):
    """net: dense, gelu, LayerNorm, dense(hidden, label_dim) -> logits."""

    def __init__(self, config: UniterConfig, label_dim: int):
        super().__init__()
        self.net = nn.Sequential(*_transform(config), nn.Linear(config.hidden_size, label_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
