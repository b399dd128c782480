"""The authors' downstream models and collates, re-implemented for comparison.

The reference's `model/vqa.py`, `model/ve.py`, `model/nlvr2.py`, `model/itm.py`, `model/re.py`
and `data/vqa.py`, `data/nlvr2.py`, `data/itm.py`, `data/re.py`: padded batches through
`gather_index`, the heads under the reference's names, losses unreduced as the reference returns
them (`reduce_loss` applies the training scripts' reduction). Written apart from
`uniter_fast.model.downstream`, sharing only the authors' encoder
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
    """The authors' padded batch for "vqa", "ve", "nlvr2" (paired), "nlvr2-triplet",
    "retrieval" (itm_rank_collate: `sample_size` when the examples have targets, every group
    then the same size) or "re" (re_collate: `txt_lens`, `num_bbs`, `obj_masks`, `targets`)."""
    if task == "vcr":
        # vcr_collate: txt_type_ids padded with 0 beside input_ids.
        ids = [_ids(ex) for ex in examples]
        batch = padded_inputs(
            ids,
            [_f32(ex["img_feat"]) for ex in examples],
            [_f32(ex["img_loc"]) for ex in examples],
        )
        types = [
            torch.as_tensor(np.asarray(ex["txt_type_ids"]), dtype=torch.long) for ex in examples
        ]
        batch["txt_type_ids"] = pad_sequence(types, batch_first=True, padding_value=0)
        if "target" in examples[0]:
            batch["targets"] = torch.tensor([[int(ex["target"])] for ex in examples])
        return batch
    if task in ("retrieval", "re"):
        ids = [_ids(ex) for ex in examples]
        feats = [_f32(ex["img_feat"]) for ex in examples]
        batch = padded_inputs(ids, feats, [_f32(ex["img_loc"]) for ex in examples])
        has_target = "target" in examples[0]
        if task == "retrieval":
            if has_target:
                starts = [i for i, ex in enumerate(examples) if int(ex["target"]) == 1]
                batch["sample_size"] = starts[1] if len(starts) > 1 else len(examples)
            return batch
        batch["txt_lens"] = [t.size(0) for t in ids]
        batch["num_bbs"] = [f.size(0) for f in feats]
        obj_masks = [torch.tensor([0] * f.size(0), dtype=torch.uint8) for f in feats]
        batch["obj_masks"] = pad_sequence(obj_masks, batch_first=True, padding_value=1).bool()
        if has_target:
            batch["targets"] = torch.tensor([[int(ex["target"])] for ex in examples])
        return batch
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
            txt_type_ids=batch.get("txt_type_ids"),
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


class UniterForImageTextRetrieval(_Finetuned):
    def __init__(self, config, img_dim, margin=0.2):
        super().__init__(config, img_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.margin = margin
        self.apply(self.init_weights)

    def init_output(self):
        """need to be called after from pretrained"""
        self.rank_output.weight.data = self.itm_output.weight.data[1:, :]
        self.rank_output.bias.data = self.itm_output.bias.data[1:]

    def forward(self, batch, compute_loss=True):
        rank_scores = self.rank_output(self._pooled(batch))
        if compute_loss:
            # triplet loss
            rank_scores_sigmoid = torch.sigmoid(rank_scores)
            sample_size = batch["sample_size"]
            scores = rank_scores_sigmoid.contiguous().view(-1, sample_size)
            pos = scores[:, :1]
            neg = scores[:, 1:]
            return torch.clamp(self.margin + neg - pos, 0)
        return rank_scores


class UniterForReferringExpressionComprehension(_Finetuned):
    def __init__(self, config, img_dim, loss="cls", margin=0.2, hard_ratio=0.3, mlp=1):
        super().__init__(config, img_dim)
        h = config.hidden_size
        if mlp == 1:
            self.re_output = nn.Linear(h, 1)
        elif mlp == 2:
            self.re_output = nn.Sequential(
                nn.Linear(h, h), GELU(), nn.LayerNorm(h, eps=1e-12), nn.Linear(h, 1)
            )
        else:
            raise ValueError("MLP restricted to be 1 or 2 layers.")
        self.loss = loss
        assert self.loss in ["cls", "rank"]
        if self.loss == "rank":
            self.margin = margin
            self.hard_ratio = hard_ratio
        else:
            self.crit = nn.CrossEntropyLoss(reduction="none")
        self.apply(self.init_weights)

    def forward(self, batch, compute_loss=True):
        sequence_output = self._encode(batch)
        # get only the region part
        sequence_output = self._get_image_hidden(
            sequence_output, batch["txt_lens"], batch["num_bbs"]
        )
        scores = self.re_output(sequence_output).squeeze(2)
        scores = scores.masked_fill(batch["obj_masks"], -1e4)  # mask out non-objects
        if compute_loss:
            targets = batch["targets"]
            if self.loss == "cls":
                return self.crit(scores, targets.squeeze(-1))  # (n, ) as no reduction
            raise NotImplementedError("the rank loss samples at random: compared by its parts")
        return scores

    def _get_image_hidden(self, sequence_output, txt_lens, num_bbs):
        outputs = []
        max_bb = max(num_bbs)
        hid_size = sequence_output.size(-1)
        for seq_out, len_, nbb in zip(
            sequence_output.split(1, dim=0), txt_lens, num_bbs, strict=True
        ):
            img_hid = seq_out[:, len_ : len_ + nbb, :]
            if nbb < max_bb:
                pad = torch.zeros(
                    1, max_bb - nbb, hid_size, dtype=img_hid.dtype, device=img_hid.device
                )
                img_hid = torch.cat([img_hid, pad], dim=1)
            outputs.append(img_hid)
        return torch.cat(outputs, dim=0)


class UniterForVisualCommonsenseReasoning(_Finetuned):
    def __init__(self, config, img_dim):
        super().__init__(config, img_dim)
        h = config.hidden_size
        self.vcr_output = nn.Sequential(
            nn.Linear(h, h * 2), nn.ReLU(), nn.LayerNorm(h * 2, eps=1e-12), nn.Linear(h * 2, 2)
        )
        self.apply(self.init_weights)

    def init_type_embedding(self):
        new_emb = nn.Embedding(4, self.uniter.config.hidden_size)
        new_emb.apply(self.init_weights)
        for i in [0, 1]:
            emb = self.uniter.embeddings.token_type_embeddings.weight.data[i, :]
            new_emb.weight.data[i, :].copy_(emb)
        emb = self.uniter.embeddings.token_type_embeddings.weight.data[0, :]
        new_emb.weight.data[2, :].copy_(emb)
        new_emb.weight.data[3, :].copy_(emb)
        self.uniter.embeddings.token_type_embeddings = new_emb

    def init_word_embedding(self, num_special_tokens):
        orig_word_num = self.uniter.embeddings.word_embeddings.weight.size(0)
        new_emb = nn.Embedding(orig_word_num + num_special_tokens, self.uniter.config.hidden_size)
        new_emb.apply(self.init_weights)
        emb = self.uniter.embeddings.word_embeddings.weight.data
        new_emb.weight.data[:orig_word_num, :].copy_(emb)
        self.uniter.embeddings.word_embeddings = new_emb

    def forward(self, batch, compute_loss=True):
        rank_scores = self.vcr_output(self._pooled(batch))
        if compute_loss:
            return F.cross_entropy(rank_scores, batch["targets"].squeeze(-1), reduction="mean")
        return rank_scores[:, 1:]


def compute_iou(box1, box2):
    """The reference's inclusive-pixel IoU of two [x, y, w, h] boxes (ReEvalDataset.computeIoU)."""
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def itm_eval(score_matrix, txt_ids, img_ids, txt2img, img2txts):
    """The reference's recall@1/5/10 (utils/itm_eval.py), on a [texts, images] score tensor."""
    img2j = {i: j for j, i in enumerate(img_ids)}
    _, rank_txt = score_matrix.topk(10, dim=1)
    gt_img_j = (
        torch.LongTensor([img2j[txt2img[txt_id]] for txt_id in txt_ids])
        .unsqueeze(1)
        .expand_as(rank_txt)
    )
    rank = (rank_txt == gt_img_j).nonzero()
    if rank.numel():
        ir_r1 = (rank < 1).sum().item() / len(txt_ids)
        ir_r5 = (rank < 5).sum().item() / len(txt_ids)
        ir_r10 = (rank < 10).sum().item() / len(txt_ids)
    else:
        ir_r1, ir_r5, ir_r10 = 0, 0, 0
    txt2i = {t: i for i, t in enumerate(txt_ids)}
    _, rank_img = score_matrix.topk(10, dim=0)
    tr_r1, tr_r5, tr_r10 = 0, 0, 0
    for j, img_id in enumerate(img_ids):
        gt_is = [txt2i[t] for t in img2txts[img_id]]
        ranks = [(rank_img[:, j] == i).nonzero() for i in gt_is]
        rank = min([10] + [r.item() for r in ranks if r.numel()])
        tr_r1 += rank < 1
        tr_r5 += rank < 5
        tr_r10 += rank < 10
    tr_r1, tr_r5, tr_r10 = (x / len(img_ids) for x in (tr_r1, tr_r5, tr_r10))
    tr_mean = (tr_r1 + tr_r5 + tr_r10) / 3
    ir_mean = (ir_r1 + ir_r5 + ir_r10) / 3
    return {
        "txt_r1": tr_r1,
        "txt_r5": tr_r5,
        "txt_r10": tr_r10,
        "txt_r_mean": tr_mean,
        "img_r1": ir_r1,
        "img_r5": ir_r5,
        "img_r10": ir_r10,
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


NLVR2 = {
    "paired-attn": UniterForNlvr2PairedAttn,
    "paired": UniterForNlvr2Paired,
    "triplet": UniterForNlvr2Triplet,
}


def reduce_loss(task, loss, batch):
    """The training scripts' reduction: VQA/VE `loss.mean() * targets.size(1)`; RE sum; NLVR2
    and retrieval mean."""
    if task in ("vqa", "ve"):
        return loss.mean() * batch["targets"].size(1)
    if task == "re":
        return loss.sum()
    return loss.mean()
