"""The word-region alignment of one pair, as WRA computes it in training.

For one (image, caption) pair: pack it as the "pairs" task does, run the encoder in eval mode,
take the text rows and the region rows of the packed hidden states, and compute the cosine cost
and the IPOT plan with the reference functions of `uniter_fast.ops.ot` and the model's own
`wra_beta` / `wra_iterations`. Which text rows: WRA in training (`gather_pairs`) takes every text
position of the pair, [CLS] and [SEP] included, so "all" (the default) gives the plan and the
distance the training loss sees; "words" leaves [CLS] and every [SEP] out and solves the
transport between the text's WordPiece tokens and the regions alone (a different problem: its
distance is not the training's).

A VCR question (`pairs`: [CLS] q [SEP] a_gt [SEP] r_gt [SEP], types 0 / 2 / 3, ground-truth then
detected boxes) goes the same way: the sequence the second pretraining stage encodes, packed as
one pair. That stage trains no WRA itself, so its plan shows how the encoder's text and region
states relate under the first stage's objective, not a loss the stage minimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.collate import collate
from ..data.schema import BERT_BASE_CASED, Batch
from ..ops.ot import cosine_cost, ipot_plan
from .loading import InspectError
from .pairs import Pair, build_example

TEXT_ROWS = ("all", "words")


@dataclass
class Alignment:
    """What the pictures show for one pair.

    input_ids: (txt_len,) the packed text, [CLS] caption [SEP] (VCR: [CLS] q [SEP] a [SEP] r [SEP]).
    txt_type_ids: (txt_len,) the text's token types when the pair has them (VCR), else None.
    text_index: (m,) positions in `input_ids` of the plan's rows (all of them, or the words').
    plan: (m, n) the IPOT transport plan, text rows by regions (IPOT's own T is its transpose).
    cost: (m, n) the cosine cost 1 - cos(w_i, v_j).
    wra_distance: sum(cost * plan), the pair's WRA distance.
    itm_match: P(match) = softmax(itm_output(pooled))[1]; None when the model has no ITM head.
    """

    pair: Pair
    input_ids: np.ndarray
    text_index: np.ndarray
    plan: np.ndarray
    cost: np.ndarray
    wra_distance: float
    itm_match: float | None
    text_rows: str = "all"
    txt_type_ids: np.ndarray | None = None

    @property
    def num_regions(self) -> int:
        return int(self.plan.shape[1])

    @property
    def best_text_row(self) -> np.ndarray:
        """(n,) the plan row (index into `text_index`) each region sends most mass to."""
        return self.plan.argmax(axis=0)

    @property
    def peak_mass(self) -> np.ndarray:
        """(n,) the mass each region sends to its best text row.

        Under IPOT's uniform marginals every region moves about the same total (1/n), so this,
        not the total, says which regions the plan ties to one word most firmly.
        """
        return self.plan.max(axis=0)


def encode(model, batch: Batch) -> torch.Tensor:
    """The encoder's packed hidden states (N, hidden) for `batch`, in eval mode, without grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.uniter(batch)
    finally:
        model.train(was_training)


def pack(model, pair: Pair) -> Batch:
    """The pair collated as the "pairs" task (text and regions, no targets; VCR's token types
    ride along as `txt_type_ids`), on the model's device. Raises InspectError naming the key
    when its features, words or token types do not fit the model."""
    where = f"sample {pair.key!r} ({pair.record.shard or 'no shard'})"
    feat, _ = pair.regions()
    img_dim = model.uniter.img_embeddings.img_linear.in_features
    if feat.ndim != 2 or feat.shape[1] != img_dim:
        raise InspectError(
            f"{where}: region features of shape {tuple(feat.shape)}, the model takes "
            f"{img_dim}-d features"
        )
    example = build_example(pair)
    embeddings = model.uniter.embeddings
    words = embeddings.word_embeddings.num_embeddings
    top = int(np.max(example["input_ids"]))
    if top >= words:
        raise InspectError(
            f"{where}: token id {top} is past the model's {words} words (VCR's object tags are "
            f"ids {BERT_BASE_CASED.size} and up: they need a pretrain-vcr checkpoint)"
        )
    types = example.get("txt_type_ids")
    num_types = embeddings.token_type_embeddings.num_embeddings
    if types is not None and int(np.max(types)) >= num_types:
        raise InspectError(
            f"{where}: token type {int(np.max(types))}, the model has {num_types} types (VCR's "
            f"sequences use 4: they need a pretrain-vcr checkpoint)"
        )
    device = next(model.parameters()).device
    batch = collate([example], task="pairs")
    if types is not None and batch.txt_type_ids is None:
        raise InspectError(f"{where}: the collated batch lost the pair's token types")
    return batch.to(device)


def pair_rows(batch: Batch, b: int = 0, text_rows: str = "all") -> tuple[torch.Tensor, ...]:
    """Packed rows of sequence b: (text rows, region rows, text_index within input_ids).

    text_rows "all" are the rows WRA reads in training (`ops.ot.gather_pairs`: every text
    position, [CLS] and [SEP] included); "words" drops [CLS] and every [SEP] (a caption's first
    and last position; VCR's [SEP]s between question, answer and rationale too).
    """
    if text_rows not in TEXT_ROWS:
        raise InspectError(f"text rows must be one of {', '.join(TEXT_ROWS)}, got {text_rows!r}")
    start = int(batch.cu_seqlens[b])
    t, n = int(batch.txt_len[b]), int(batch.img_len[b])
    device = batch.cu_seqlens.device
    text_index = torch.arange(t, device=device)
    if text_rows == "words":
        first = int(batch.txt_len[:b].sum())  # input_ids holds the texts alone, back to back
        ids = batch.input_ids[first : first + t]
        words = (ids != BERT_BASE_CASED.cls_id) & (ids != BERT_BASE_CASED.sep_id)
        if not bool(words.any()):
            raise InspectError("text rows 'words': the text has no token besides [CLS]/[SEP]")
        text_index = text_index[words]
    return start + text_index, start + t + torch.arange(n, device=device), text_index


def match_probability(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """(B,) P(match) of each packed pair from the ITM head on the pooled [CLS]; None without one."""
    if getattr(model, "itm_output", None) is None:
        return None
    with torch.no_grad():
        pooled = model.uniter.pooler(hidden, batch.cu_seqlens[:-1].long())
        return model.itm_output(pooled).float().softmax(dim=-1)[:, 1]


def align_pair(model, pair: Pair, *, text_rows: str = "all") -> Alignment:
    """Encode one pair and compute its cost, IPOT plan, WRA distance and ITM P(match)."""
    batch = pack(model, pair)
    hidden = encode(model, batch)
    txt_rows, img_rows, text_index = pair_rows(batch, 0, text_rows)
    # As the reference: WRA in fp32 at least, whatever the encoder ran in.
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    txt = hidden.index_select(0, txt_rows).to(dtype)[None]  # (1, m, hidden)
    img = hidden.index_select(0, img_rows).to(dtype)[None]  # (1, n, hidden)
    txt_len = torch.tensor([txt.shape[1]], device=hidden.device)
    img_len = torch.tensor([img.shape[1]], device=hidden.device)
    with torch.no_grad():
        cost = cosine_cost(txt, img)  # (1, m, n)
        plan = ipot_plan(
            cost, txt_len, img_len, beta=model.wra_beta, iterations=model.wra_iterations
        )  # (1, n, m)
        distance = (cost * plan.transpose(1, 2)).sum(dim=(1, 2))
    itm = match_probability(model, hidden, batch)
    return Alignment(
        pair=pair,
        input_ids=batch.input_ids.cpu().numpy(),
        text_index=text_index.cpu().numpy(),
        plan=plan[0].T.cpu().double().numpy(),
        cost=cost[0].cpu().double().numpy(),
        wra_distance=float(distance[0]),
        itm_match=None if itm is None else float(itm[0]),
        text_rows=text_rows,
        txt_type_ids=None if batch.txt_type_ids is None else batch.txt_type_ids.cpu().numpy(),
    )
