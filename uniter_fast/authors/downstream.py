"""The authors' VQA, SNLI-VE and NLVR2 models and collates, re-implemented for comparison.

The reference's `model/vqa.py`, `model/ve.py`, `model/nlvr2.py` and `data/vqa.py`,
`data/nlvr2.py`: padded batches through `gather_index`, the heads under the reference's names,
losses unreduced as the reference returns them (`reduce_loss` applies the training scripts'
reduction). Written apart from `uniter_fast.model.downstream`, sharing only the authors' encoder
(`uniter_fast.authors.model.UniterModel`), so that tests comparing the two mean something.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .collate import padded_inputs
from .model import GELU, UniterForPretraining, UniterModel


def _ids(ex):
    return torch.as_tensor(np.asarray(ex["input_ids"]), dtype=torch.long)


def _f32(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


def collate(examples, task):
    """The authors' padded batch for "vqa", "ve", "nlvr2" (paired) or "nlvr2-triplet"."""
    if task in ("vqa", "ve"):
        batch = padded_inputs(
            [_ids(ex) for ex in examples],
            [_f32(ex["img_feat"]) for ex in examples],
            [_f32(ex["img_loc"]) for ex in examples],
        )
        if "targets" in examples[0]:
            batch["targets"] = torch.stack([_f32(ex["targets"]) for ex in examples])
        return batch
    if task == "nlvr2":
        # nlvr2_paired_collate: the pairs flattened, left then right, img_type_ids 1 and 2.
        ids, feats, locs, types = [], [], [], []
        for ex in examples:
            for side in (0, 1):
                ids.append(_ids(ex))
                feats.append(_f32(ex["img_feat"][side]))
                locs.append(_f32(ex["img_loc"][side]))
                types.append(torch.full((feats[-1].size(0),), side + 1, dtype=torch.long))
    elif task == "nlvr2-triplet":
        ids, feats, locs, types = [], [], [], []
        for ex in examples:
            left, right = _f32(ex["img_feat"][0]), _f32(ex["img_feat"][1])
            ids.append(_ids(ex))
            feats.append(torch.cat([left, right]))
            locs.append(torch.cat([_f32(ex["img_loc"][0]), _f32(ex["img_loc"][1])]))
            types.append(torch.tensor([1] * left.size(0) + [2] * right.size(0), dtype=torch.long))
    else:
        raise ValueError(f"invalid task {task}")
    batch = padded_inputs(ids, feats, locs)
    batch["img_type_ids"] = pad_sequence(types, batch_first=True, padding_value=0)
    if "target" in examples[0]:
        batch["targets"] = torch.tensor([int(ex["target"]) for ex in examples], dtype=torch.long)
    return batch


class _Finetuned(nn.Module):
    def __init__(self, config, img_dim):
        super().__init__()
        self.config = config
        self.uniter = UniterModel(config, img_dim)

    init_weights = UniterForPretraining.init_weights  # the reference's one scheme

    def _encode(self, batch):
        return self.uniter(
            batch["input_ids"],
            batch["position_ids"],
            batch["img_feat"],
            batch["img_pos_feat"],
            batch["attn_masks"],
            batch["gather_index"],
            img_type_ids=batch.get("img_type_ids"),
        )

    def _pooled(self, batch):
        # BertPooler on the first position of every padded sequence ([CLS]).
        return self.uniter.pooler(self._encode(batch))

    def init_type_embedding(self):
        """NLVR2: three token types, row 2 a copy of row 1 (call after loading weights)."""
        old = self.uniter.embeddings.token_type_embeddings
        new_emb = nn.Embedding(3, self.config.hidden_size)
        new_emb.apply(self.init_weights)
        for i in (0, 1):
            new_emb.weight.data[i, :].copy_(old.weight.data[i, :])
        new_emb.weight.data[2, :].copy_(old.weight.data[1, :])
        self.uniter.embeddings.token_type_embeddings = new_emb


class UniterForVisualQuestionAnswering(_Finetuned):
    def __init__(self, config, img_dim, num_answer):
        super().__init__(config, img_dim)
        h = config.hidden_size
        self.vqa_output = nn.Sequential(
            nn.Linear(h, h * 2),
            GELU(),
            nn.LayerNorm(h * 2, eps=1e-12),
            nn.Linear(h * 2, num_answer),
        )
        self.apply(self.init_weights)

    def forward(self, batch, compute_loss=True):
        answer_scores = self.vqa_output(self._pooled(batch))
        if compute_loss:
            return F.binary_cross_entropy_with_logits(
                answer_scores, batch["targets"], reduction="none"
            )
        return answer_scores


class UniterForVisualEntailment(UniterForVisualQuestionAnswering):
    def __init__(self, config, img_dim):
        super().__init__(config, img_dim, 3)


class UniterForNlvr2Triplet(_Finetuned):
    def __init__(self, config, img_dim):
        super().__init__(config, img_dim)
        self.nlvr2_output = nn.Linear(config.hidden_size, 2)
        self.apply(self.init_weights)

    def forward(self, batch, compute_loss=True):
        answer_scores = self.nlvr2_output(self._pooled(batch))
        if compute_loss:
            return F.cross_entropy(answer_scores, batch["targets"], reduction="none")
        return answer_scores


class UniterForNlvr2Paired(_Finetuned):
    def __init__(self, config, img_dim):
        super().__init__(config, img_dim)
        self.nlvr2_output = nn.Linear(config.hidden_size * 2, 2)
        self.apply(self.init_weights)

    def forward(self, batch, compute_loss=True):
        pooled = self._pooled(batch)
        answer_scores = self.nlvr2_output(pooled.contiguous().view(pooled.size(0) // 2, -1))
        if compute_loss:
            return F.cross_entropy(answer_scores, batch["targets"], reduction="none")
        return answer_scores


class AttentionPool(nn.Module):
    def __init__(self, hidden_size, drop=0.0):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(drop)

    def forward(self, input_, mask=None):
        score = self.fc(input_).squeeze(-1)
        if mask is not None:
            score = score + mask.to(dtype=input_.dtype) * -1e4
        norm_score = self.dropout(F.softmax(score, dim=1))
        return norm_score.unsqueeze(1).matmul(input_).squeeze(1)


class UniterForNlvr2PairedAttn(_Finetuned):
    def __init__(self, config, img_dim):
        super().__init__(config, img_dim)
        h, heads = config.hidden_size, config.num_attention_heads
        p = config.attention_probs_dropout_prob
        self.attn1 = nn.MultiheadAttention(h, heads, dropout=p)
        self.attn2 = nn.MultiheadAttention(h, heads, dropout=p)
        self.fc = nn.Sequential(
            nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob)
        )
        self.attn_pool = AttentionPool(h, p)
        self.nlvr2_output = nn.Linear(2 * h, 2)
        self.apply(self.init_weights)

    def forward(self, batch, compute_loss=True):
        sequence_output = self._encode(batch)
        bs, tl, d = sequence_output.size()
        left_out, right_out = sequence_output.contiguous().view(bs // 2, tl * 2, d).chunk(2, dim=1)
        mask = batch["attn_masks"] == 0
        left_mask, right_mask = mask.contiguous().view(bs // 2, tl * 2).chunk(2, dim=1)
        left_out = left_out.transpose(0, 1)
        right_out = right_out.transpose(0, 1)
        l2r_attn, _ = self.attn1(left_out, right_out, right_out, key_padding_mask=right_mask)
        r2l_attn, _ = self.attn2(right_out, left_out, left_out, key_padding_mask=left_mask)
        left_out = self.fc(torch.cat([l2r_attn, left_out], dim=-1)).transpose(0, 1)
        right_out = self.fc(torch.cat([r2l_attn, right_out], dim=-1)).transpose(0, 1)
        left_out = self.attn_pool(left_out, left_mask)
        right_out = self.attn_pool(right_out, right_mask)
        answer_scores = self.nlvr2_output(torch.cat([left_out, right_out], dim=-1))
        if compute_loss:
            return F.cross_entropy(answer_scores, batch["targets"], reduction="none")
        return answer_scores


NLVR2 = {
    "paired-attn": UniterForNlvr2PairedAttn,
    "paired": UniterForNlvr2Paired,
    "triplet": UniterForNlvr2Triplet,
}


def reduce_loss(task, loss, batch):
    """The training scripts' reduction: VQA/VE `loss.mean() * targets.size(1)`; NLVR2 mean."""
    if task in ("vqa", "ve"):
        return loss.mean() * batch["targets"].size(1)
    return loss.mean()
