"""Text and region embedders, as in the reference (names kept so checkpoints map one to one)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import UniterConfig


class TextEmbeddings(nn.Module):
    """word + position + token type (0, or per token: VCR's question 0, answer 2, rationale 3),
    then LayerNorm and dropout.

    input_ids, txt_pos, txt_type_ids (or None: all type 0): (Nt,) -> (Nt, hidden).
    """

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        txt_pos: torch.Tensor,
        txt_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        types = (
            self.token_type_embeddings.weight[0]
            if txt_type_ids is None
            else self.token_type_embeddings(txt_type_ids)
        )
        emb = self.word_embeddings(input_ids) + self.position_embeddings(txt_pos) + types
        return self.dropout(self.LayerNorm(emb))


class ImageEmbeddings(nn.Module):
    """Region features and 7-d locations to hidden states.

    `LN(img_layer_norm(img_linear(feat)) + pos_layer_norm(pos_linear(loc)) + type_1)`, where for
    region-masking tasks `feat` has the learned mask vector added on masked rows. The reference
    keeps the mask vector in row 1 of `mask_embedding` and holds row 0 at zero; only row 1 is read
    here, so row 0 stays whatever a checkpoint holds and gets no gradient (as there).
    """

    def __init__(self, config: UniterConfig, img_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        img_feat: torch.Tensor,
        img_loc: torch.Tensor,
        type_embedding: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """img_feat: (Ni, D) any float dtype; img_loc: (Ni, 7); type_embedding: (hidden,);
        img_masked: (Ni,) bool or None (no masking) -> (Ni, hidden)."""
        feat = img_feat.to(self.img_linear.weight.dtype)
        if img_masked is not None:
            mask_vec = self.mask_embedding.weight[1]
            feat = feat + img_masked[:, None].to(feat.dtype) * mask_vec
        img = self.img_layer_norm(self.img_linear(feat))
        pos = self.pos_layer_norm(self.pos_linear(img_loc.to(self.pos_linear.weight.dtype)))
        return self.dropout(self.LayerNorm(img + pos + type_embedding))
