"""UNITER fine-tuned for VQA, SNLI-VE, NLVR2, retrieval and referring expressions (packed).

    model = uf.UniterForVqa(cfg, img_dim=2048, num_answers=3129)
    uf.load_pretrained(model, "uniter-base.pt")          # or the reference's fine-tuned checkpoint
    out = model(uf.data.collate(examples, task=model.task))   # {"scores": [B, C], "loss": ...}

Every model here is the packed encoder (`UniterModel`: the same attention backends, the same
sync-free forward as pretraining) plus the reference's head, under the reference's module names,
so the reference's fine-tuned checkpoints load key for key (`vqa_output.*`, `nlvr2_output.*`,
`attn1.*`, `attn2.*`, `fc.*`, `attn_pool.*`). `task` names the collate task
(`uniter_fast.data.downstream`). `forward(batch)` returns `scores` (the logits) and, when the
batch holds targets, `loss` reduced as the reference reduces it:

- VQA and VE: binary cross-entropy with logits on the soft targets, mean over B x C elements,
  times C (train_vqa.py / train_ve.py); computed in fp32.
- NLVR2: two-way cross-entropy, mean over examples.
- Retrieval: sigmoid of the rank logits, hinge `max(0, margin + s(neg) - s(pos))` against every
  negative of the positive's group, mean over the negatives (train_itm*.py).
- Referring expressions: cross-entropy over each example's regions, summed over the batch
  (train_re.py), or the reference's optional rank loss (also summed).

The heads (UNITER_FINETUNE.md): VQA/VE: pooled [CLS] -> Linear(H, 2H) -> GELU -> LayerNorm ->
Linear(2H, C). NLVR2 "triplet": one sequence with both images, pooled -> Linear(H, 2).
"paired": two sequences sharing the text, the two pooled outputs side by side -> Linear(2H, 2).
"paired-attn": the two full output sequences attend to each other (two multi-head attention
layers), [attended; original] -> shared Linear(2H, H) -> ReLU -> dropout, attention pooling
(ReLU(Linear(H, 1)) scores, -1e4 at padding, softmax, dropout) of each side, both pooled
vectors -> Linear(2H, 2). NLVR2 uses three token types: regions of the right image take type 2,
a row initialised from the image row 1 (the reference's `init_type_embedding`; a pretraining
checkpoint's two rows are extended the same way when loaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UniterConfig
from ..data.schema import IMG_DIM, Batch
from ..ops import gather_padded
from .pretrain import UniterModel, UniterWithHeads

NLVR2_VARIANTS = ("paired-attn", "paired", "triplet")
_TYPE_KEY = "uniter.embeddings.token_type_embeddings.weight"


def _widen(x: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 at least (bf16/fp16 logits widen; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class UniterForDownstream(UniterWithHeads):
    """The packed encoder (with `UniterWithHeads`' weight init and attention-backend plumbing)
    and the batch checks every downstream model shares. Subclasses add a head and
    `forward(batch)`."""

    task: str = ""

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        *,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__()
        self.config = config
        self.img_dim = img_dim
        self.uniter = UniterModel(
            config, img_dim, attention=attention, varlen_dropout=varlen_dropout
        )

    def _check(self, batch: Batch) -> None:
        if batch.task != self.task:
            raise ValueError(
                f"{type(self).__name__} takes batches collated with task={self.task!r}, got "
                f"{batch.task!r} (uf.data.collate(examples, task=model.task))"
            )

    def _pooled(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.uniter.pooler(hidden, batch.cu_seqlens[:-1].long())


class UniterForVqa(UniterForDownstream):
    """VQA: pooled [CLS] -> the reference's `vqa_output` over `num_answers` answers.

    `loss`: BCE-with-logits on `batch.targets` (soft scores), mean times num_answers.
    """

    task = "vqa"

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        num_answers: int = 3129,
        *,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__(config, img_dim, attention=attention, varlen_dropout=varlen_dropout)
        if num_answers < 1:
            raise ValueError(f"num_answers must be at least 1, got {num_answers}")
        h = config.hidden_size
        self.num_answers = num_answers
        self.vqa_output = nn.Sequential(
            nn.Linear(h, 2 * h),
            nn.GELU(),
            nn.LayerNorm(2 * h, eps=config.layer_norm_eps),
            nn.Linear(2 * h, num_answers),
        )
        self.apply(self._init_weights)

    def head_parameters(self) -> list[nn.Parameter]:
        """The head's parameters: the recipe's `lr_mul` applies to them (VQA: 10)."""
        return list(self.vqa_output.parameters())

    def forward(self, batch: Batch) -> dict:
        self._check(batch)
        hidden = self.uniter(batch)
        scores = self.vqa_output(self._pooled(hidden, batch))
        out = {"scores": scores}
        if batch.targets is not None:
            if batch.targets.shape != scores.shape:
                raise ValueError(
                    f"targets have shape {tuple(batch.targets.shape)}, scores "
                    f"{tuple(scores.shape)} ({self.num_answers} answers)"
                )
            logits = _widen(scores)
            bce = F.binary_cross_entropy_with_logits(logits, batch.targets.to(logits.dtype))
            out["loss"] = bce * scores.shape[1]
        return out


class UniterForVisualEntailment(UniterForVqa):
    """SNLI-VE: the VQA model with 3 labels (contradiction 0, entailment 1, neutral 2), as the
    reference builds it (its head keeps the name `vqa_output`)."""

    task = "ve"

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        *,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__(config, img_dim, 3, attention=attention, varlen_dropout=varlen_dropout)


class AttentionPool(nn.Module):
    """score = ReLU(Linear(H, 1)), -1e4 where `pad`, softmax, dropout, weighted sum."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """x: (E, L, H); pad: (E, L) bool, True at padding -> (E, H)."""
        score = self.fc(x).squeeze(-1) + pad.to(x.dtype) * -1e4
        weight = self.dropout(F.softmax(score, dim=1))
        return (weight.unsqueeze(1) @ x).squeeze(1)


class UniterForNlvr2(UniterForDownstream):
    """NLVR2 in the reference's three variants (module docstring); `scores` (E, 2).

    variant: "paired-attn" (both of the reference's configs), "paired" or "triplet". Collate
    task: "nlvr2" for the paired variants, "nlvr2-triplet" for the triplet.
    """

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        variant: str = "paired-attn",
        *,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__(config, img_dim, attention=attention, varlen_dropout=varlen_dropout)
        if variant not in NLVR2_VARIANTS:
            raise ValueError(f"variant must be one of {NLVR2_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.task = "nlvr2-triplet" if variant == "triplet" else "nlvr2"
        h = config.hidden_size
        # Three token types: text 0, left image 1, right image 2.
        self.uniter.embeddings.token_type_embeddings = nn.Embedding(3, h)
        if variant == "paired-attn":
            p = config.attention_probs_dropout_prob
            heads = config.num_attention_heads
            self.attn1 = nn.MultiheadAttention(h, heads, dropout=p)
            self.attn2 = nn.MultiheadAttention(h, heads, dropout=p)
            self.fc = nn.Sequential(
                nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob)
            )
            self.attn_pool = AttentionPool(h, p)
        self.nlvr2_output = nn.Linear(h if variant == "triplet" else 2 * h, 2)
        # As the reference: N(0, 0.02) for every Linear (the attention layers' out_proj
        # included); their in_proj keeps its construction-time xavier init.
        self.apply(self._init_weights)
        with torch.no_grad():
            rows = self.uniter.embeddings.token_type_embeddings.weight
            rows[2].copy_(rows[1])

    def adapt_reference_state(self, state: dict) -> list[str]:
        """`load_pretrained`'s hook: a pretraining checkpoint's two token-type rows become three,
        the right image's a copy of the image row (the reference's `init_type_embedding`)."""
        rows = state.get(_TYPE_KEY)
        if rows is None or rows.shape[0] != 2:
            return []
        state[_TYPE_KEY] = torch.cat([rows, rows[1:2]])
        return [f"{_TYPE_KEY}: 2 rows -> 3 (row 2 copied from row 1, the image row)"]

    def forward(self, batch: Batch) -> dict:
        self._check(batch)
        hidden = self.uniter(batch)
        if self.variant == "paired-attn":
            scores = self.nlvr2_output(self._paired_attention(hidden, batch))
        else:
            pooled = self._pooled(hidden, batch)
            if self.variant == "paired":
                pooled = pooled.reshape(pooled.shape[0] // 2, -1)  # [left; right] per example
            scores = self.nlvr2_output(pooled)
        out = {"scores": scores}
        if batch.target is not None:
            out["loss"] = F.cross_entropy(_widen(scores), batch.target)
        return out

    def _paired_attention(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        # The padded view of the 2E sequences: left images at even rows, right at odd ones.
        padded = gather_padded(hidden, batch.pad_index)  # (2E, L, H), zeros at padding
        pad = batch.pad_index == hidden.shape[0]  # (2E, L), True at padding
        left, right = padded[0::2].transpose(0, 1), padded[1::2].transpose(0, 1)  # (L, E, H)
        left_pad, right_pad = pad[0::2], pad[1::2]
        l2r, _ = self.attn1(left, right, right, key_padding_mask=right_pad, need_weights=False)
        r2l, _ = self.attn2(right, left, left, key_padding_mask=left_pad, need_weights=False)
        left = self.fc(torch.cat([l2r, left], dim=-1)).transpose(0, 1)
        right = self.fc(torch.cat([r2l, right], dim=-1)).transpose(0, 1)
        pooled = [self.attn_pool(left, left_pad), self.attn_pool(right, right_pad)]
        return torch.cat(pooled, dim=-1)


class UniterForRetrieval(UniterForDownstream):
    """Image-text retrieval: pooled [CLS] -> `rank_output` Linear(H, 1); `scores` [B] are the rank
    logits (before the sigmoid).

    The model also holds the pretraining ITM head (`itm_output`, as the reference's does): loading
    a pretraining checkpoint, which has no `rank_output`, initialises the rank head from the ITM
    head's "match" row (the reference's `init_output`), so a pretrained model scores retrieval
    zero-shot. A checkpoint with `rank_output` (a fine-tuned one) loads as it is.

    `loss`, when the batch has `target` (1 for a group's positive, 0 for each of its negatives,
    which follow it: the collate task "retrieval"): mean over the negatives of
    `max(0, margin + sigmoid(s_neg) - sigmoid(s_pos))`, in fp32.
    """

    task = "retrieval"

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        margin: float = 0.2,
        *,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__(config, img_dim, attention=attention, varlen_dropout=varlen_dropout)
        h = config.hidden_size
        self.margin = float(margin)
        self.itm_output = nn.Linear(h, 2)
        self.rank_output = nn.Linear(h, 1)
        self.apply(self._init_weights)

    def adapt_reference_state(self, state: dict) -> list[str]:
        """`load_pretrained`'s hook: a checkpoint with the ITM head and no rank head (a
        pretraining one) gives the rank head the ITM head's "match" row."""
        if "rank_output.weight" in state or "itm_output.weight" not in state:
            return []
        state["rank_output.weight"] = state["itm_output.weight"][1:].clone()
        state["rank_output.bias"] = state["itm_output.bias"][1:].clone()
        return ["rank_output.*: initialised from itm_output row 1 (match), as init_output does"]

    def forward(self, batch: Batch) -> dict:
        self._check(batch)
        hidden = self.uniter(batch)
        scores = self.rank_output(self._pooled(hidden, batch)).squeeze(-1)
        out = {"scores": scores}
        if batch.target is not None:
            out["loss"] = rank_hinge_loss(scores, batch.target, self.margin)
        return out


def rank_hinge_loss(scores: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over the negatives of max(0, margin + sigmoid(s_neg) - sigmoid(s_pos of its group)).

    scores [B]; target [B]: 1 opens a group (its positive), 0 a negative of the open group. No
    host sync: each group's positive score is summed into its slot on the device."""
    prob = torch.sigmoid(_widen(scores))
    t = target.to(prob.dtype)
    group = torch.cumsum(target, 0) - 1
    pos = torch.zeros_like(prob).index_add_(0, group, prob * t)
    neg = 1 - t
    hinge = torch.clamp(margin + prob - pos[group], min=0) * neg
    return hinge.sum() / neg.sum()


RE_LOSSES = ("cls", "rank")


class UniterForReferringExpressions(UniterForDownstream):
    """Referring expressions: a score for every region of each example (the reference's
    `re_output` on the region's output state). `scores` [B, R], R the most regions in the batch;
    positions past an example's regions are -1e4 (the reference's mask).

    mlp: 1, Linear(H, 1); 2, Linear(H, H) -> GELU -> LayerNorm -> Linear(H, 1). loss: "cls",
    cross-entropy over the regions against `target` (the referred region's index), summed over
    the batch (train_re.py); "rank", the reference's sigmoid hinge with `margin` against one
    negative region per example, the highest-scoring one with probability `hard_ratio`, else a
    random one (drawn with torch's generator on the scores' device), also summed; an example
    with a single region adds nothing.

    The head runs on the batch's region rows only (Ni of them, not B x R).
    """

    task = "re"

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        mlp: int = 1,
        *,
        loss: str = "cls",
        margin: float = 0.2,
        hard_ratio: float = 0.3,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__(config, img_dim, attention=attention, varlen_dropout=varlen_dropout)
        if mlp not in (1, 2):
            raise ValueError(f"mlp must be 1 or 2 (layers of the RE head), got {mlp!r}")
        if loss not in RE_LOSSES:
            raise ValueError(f"loss must be one of {RE_LOSSES}, got {loss!r}")
        h = config.hidden_size
        self.mlp, self.loss, self.margin, self.hard_ratio = mlp, loss, margin, hard_ratio
        if mlp == 1:
            self.re_output = nn.Linear(h, 1)
        else:
            self.re_output = nn.Sequential(
                nn.Linear(h, h),
                nn.GELU(),
                nn.LayerNorm(h, eps=config.layer_norm_eps),
                nn.Linear(h, 1),
            )
        self.apply(self._init_weights)

    def forward(self, batch: Batch) -> dict:
        self._check(batch)
        if batch.region_index is None:
            raise ValueError("a referring-expression batch needs region_index (collate task 're')")
        hidden = self.uniter(batch)
        regions = self.re_output(hidden.index_select(0, batch.img_dest)).squeeze(-1)  # (Ni,)
        # region_index points each padded (b, r) at its region, or at Ni: the -1e4 slot.
        scores = torch.cat([regions, regions.new_full((1,), -1e4)])[batch.region_index]
        out = {"scores": scores}
        if batch.target is not None:
            logits = _widen(scores)
            if self.loss == "cls":
                out["loss"] = F.cross_entropy(logits, batch.target, reduction="sum")
            else:
                out["loss"] = self._rank_loss(logits, batch.target, batch.img_len)
        return out

    def _rank_loss(self, scores, target, num_regions) -> torch.Tensor:
        prob = torch.sigmoid(scores)
        pos = prob.gather(1, target[:, None]).squeeze(1)
        # hard: the best-scoring region other than the target; easy: a uniform other region.
        hard = scores.scatter(1, target[:, None], float("-inf")).argmax(dim=1)
        n = num_regions.to(scores.device)
        draw = (torch.rand(n.shape, device=scores.device) * (n - 1).clamp(min=1)).long()
        easy = draw + (draw >= target).long()
        use_hard = torch.rand(n.shape, device=scores.device) < self.hard_ratio
        neg = prob.gather(1, torch.where(use_hard, hard, easy)[:, None]).squeeze(1)
        # An example with one region has no negative (the reference would fail on it): it adds 0.
        return (torch.clamp(self.margin + neg - pos, min=0) * (n > 1)).sum()


_WORD_KEY = "uniter.embeddings.word_embeddings.weight"
_DECODER_KEY = "cls.predictions.decoder.weight"  # tied to the word embeddings
_MLM_BIAS_KEY = "cls.predictions.bias"
VCR_SPECIAL_TOKENS = 81


def vcr_config(config: UniterConfig, num_special_tokens: int) -> UniterConfig:
    """The architecture VCR runs: the word embedding grown by the object tags, 4 token types."""
    import dataclasses

    return dataclasses.replace(
        config, vocab_size=config.vocab_size + num_special_tokens, type_vocab_size=4
    )


def grow_vcr_state(model: nn.Module, state: dict) -> list[str]:
    """`load_pretrained`'s hook for the VCR models: a pretraining checkpoint's word embedding
    gains the object tags' rows (the model's own fresh N(0, initializer_range) rows, as the
    reference's `init_word_embedding`), its 2 token types become 4 (rows 2 and 3 copied from row
    0, the reference's `init_type_embedding`) and, for the second-stage pretraining model, the
    MLM bias gains zeros for the tags (the decoder stays tied to the grown embedding)."""
    notes = []
    words = state.get(_WORD_KEY)
    own = model.uniter.embeddings.word_embeddings.weight
    if words is not None and words.shape[0] < own.shape[0]:
        fresh = own.detach()[words.shape[0] :].to(device=words.device, dtype=words.dtype)
        state[_WORD_KEY] = torch.cat([words, fresh])
        state.pop(_DECODER_KEY, None)  # re-tied to the grown rows by the loader
        notes.append(
            f"{_WORD_KEY}: {words.shape[0]} rows -> {own.shape[0]} (the object tags' rows "
            "initialised N(0, initializer_range))"
        )
    bias = state.get(_MLM_BIAS_KEY)
    if bias is not None and hasattr(model, "cls") and bias.shape[0] < own.shape[0]:
        state[_MLM_BIAS_KEY] = torch.cat([bias, bias.new_zeros(own.shape[0] - bias.shape[0])])
        notes.append(f"{_MLM_BIAS_KEY}: grown with zeros for the object tags")
    types = state.get(_TYPE_KEY)
    if types is not None and types.shape[0] == 2:
        state[_TYPE_KEY] = torch.cat([types, types[0:1], types[0:1]])
        notes.append(f"{_TYPE_KEY}: 2 rows -> 4 (rows 2 and 3 copied from row 0, the text row)")
    return notes


class UniterForVcr(UniterForDownstream):
    """VCR: one sequence per candidate (the collate task "vcr": [CLS] q [SEP] a [SEP], or [CLS]
    q [SEP] a_gt [SEP] r [SEP], with `txt_type_ids` 0 / 2 / 3, regions type 1), pooled [CLS] ->
    the reference's `vcr_output` (Linear(H, 2H) -> ReLU -> LayerNorm -> Linear(2H, 2)).

    config: the pretraining architecture; the model adds `num_special_tokens` word rows (the
    object tags, ids config.vocab_size ...) and grows the token types to 4. `scores` [B, 2];
    `loss`: cross-entropy against `target` (1 for the right candidate), mean over candidates. A
    question's prediction is its candidate with the highest class-1 logit.
    """

    task = "vcr"

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        num_special_tokens: int = VCR_SPECIAL_TOKENS,
        *,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        if num_special_tokens < 0:
            raise ValueError(f"num_special_tokens must be >= 0, got {num_special_tokens}")
        self.num_special_tokens = num_special_tokens
        super().__init__(
            vcr_config(config, num_special_tokens),
            img_dim,
            attention=attention,
            varlen_dropout=varlen_dropout,
        )
        h = config.hidden_size
        self.vcr_output = nn.Sequential(
            nn.Linear(h, 2 * h),
            nn.ReLU(),
            nn.LayerNorm(2 * h, eps=config.layer_norm_eps),
            nn.Linear(2 * h, 2),
        )
        self.apply(self._init_weights)

    def adapt_reference_state(self, state: dict) -> list[str]:
        return grow_vcr_state(self, state)

    def forward(self, batch: Batch) -> dict:
        self._check(batch)
        hidden = self.uniter(batch)
        scores = self.vcr_output(self._pooled(hidden, batch))
        out = {"scores": scores}
        if batch.target is not None:
            out["loss"] = F.cross_entropy(_widen(scores), batch.target)
        return out


__all__ = [
    "NLVR2_VARIANTS",
    "VCR_SPECIAL_TOKENS",
    "UniterForVcr",
    "grow_vcr_state",
    "vcr_config",
    "RE_LOSSES",
    "AttentionPool",
    "UniterForDownstream",
    "UniterForNlvr2",
    "UniterForReferringExpressions",
    "UniterForRetrieval",
    "UniterForVisualEntailment",
    "UniterForVqa",
    "rank_hinge_loss",
]
