"""What flows through the data path: the shard sample, the example, and the packed batch.

Shard sample (one per image, WebDataset members named `<key>.<field>`):

    feat.npy       float16 [n, 2048]  detector region features, n in [10, 100]
    loc.npy        float32 [n, 7]     [x1, y1, x2, y2, w, h, w*h], normalised by image size
    soft.npy       float16 [n, 1601]  detector class distribution (index 0 = background)
    captions.json  {"input_ids": [[int, ...], ...]}  WordPiece ids, no [CLS]/[SEP], 1..60 each
    meta.json      {"image_id": str, "dataset": str, "width": int, "height": int, ...}

Example (one per image-text pair; what the task builders emit and `collate` takes):

    input_ids    int [L]          [CLS] ... [SEP]; for MLM already masked
    txt_labels   int [L]          MLM only: the original id where masked, -1 elsewhere
    img_feat     float [n, D]     unmasked features (float16 or float32)
    img_loc      float [n, 7]
    img_mask     bool [n]         MRM only: regions whose features are zeroed and predicted
    soft_labels  float [n, 1601]  MRM only: detector soft labels (targets of MRC and MRC-kl)
    itm_target   int              ITM only: 1 for a matching pair, 0 for a negative

Packed batch: see `Batch`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IMG_DIM = 2048
IMG_LABEL_DIM = 1601
LOC_DIM = 7
MIN_REGIONS = 10
MAX_REGIONS = 100
MAX_CAPTION_TOKENS = 60

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
MRM_TASKS = frozenset({"mrfr", "mrc", "mrckl"})
# What the packer takes: the pretraining tasks, and "pairs" (the shared inputs, no targets: what
# the downstream tasks of `uniter_fast.data.downstream` build on).
PACK_TASKS = (*TASKS, "pairs")

# Members a shard sample must have, and the only ones a reader decodes (an allow-list).
SHARD_FIELDS = ("feat.npy", "loc.npy", "soft.npy", "captions.json", "meta.json")


@dataclass(frozen=True)
class Vocab:
    """Special token ids and the range random MLM replacements are drawn from (bert-base-cased)."""

    size: int = 28996
    pad_id: int = 0
    unk_id: int = 100
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    word_start: int = 999  # first id of the word range (inclusive)
    word_end: int = 28996  # end of the word range (exclusive)

    def __post_init__(self) -> None:
        if not 0 <= self.word_start < self.word_end <= self.size:
            raise ValueError(
                f"Vocab word range [{self.word_start}, {self.word_end}) must lie in "
                f"[0, {self.size})"
            )


BERT_BASE_CASED = Vocab()


def check_task(task: str, allowed: tuple[str, ...] = TASKS) -> str:
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(allowed)}")
    return task


@dataclass
class Batch:
    """A packed, unpadded micro-batch of B image-text pairs holding N = Nt + Ni real positions.

    Sequence b occupies packed rows `cu_seqlens[b] : cu_seqlens[b+1]`: its `txt_len[b]` text
    tokens ([CLS] first), then its `img_len[b]` regions. Every index the step needs is computed
    here, on the CPU, so that the step never waits for the host.

    Text (Nt tokens over the batch):
        input_ids   int64 [Nt]     token ids (MLM: already masked)
        txt_pos     int64 [Nt]     position within its caption, 0-based
        txt_dest    int64 [Nt]     row in the packed buffer
        txt_type_ids int64 [Nt]    each token's type, when examples give `txt_type_ids` (VCR:
                                   question and [CLS] 0, answer 2, rationale 3); None: all 0
    Regions (Ni over the batch):
        img_feat    float16|float32 [Ni, D]  features, masked rows already zeroed
        img_loc     float32 [Ni, 7]
        img_masked  bool [Ni]      regions masked for MRM (all False for other tasks)
        img_dest    int64 [Ni]     row in the packed buffer
    Sequences:
        cu_seqlens  int32 [B+1]    cumulative sequence lengths; cu_seqlens[:-1] are the [CLS] rows
        txt_len     int64 [B], img_len int64 [B]
        max_seqlen, max_txt_len, max_img_len: Python ints (shapes, known without a sync)
    Padded view (for attention backends that need one; padding points at row N):
        pad_index   int64 [B, Lpad]  packed row of padded position (b, l), or N; Lpad % 8 == 0
        unpad_index int64 [N]        flat position b * Lpad + l of each packed row
    Targets (None where the task has none):
        mlm_index   int64 [M]      packed rows of masked tokens (batch-major order)
        mlm_labels  int64 [M]      their original ids
        mrm_index   int64 [R]      packed rows of masked regions (batch-major order)
        mrfr_target float [R, D]   original features of the masked regions (MRFR)
        mrc_soft_target float [R, 1601]  soft labels of the masked regions (MRC, MRC-kl)
        mrc_label   int64 [R]      1 + argmax(soft[1:]) (MRC; background never the target)
        itm_target  int64 [B]      1 for matching pairs, 0 for negatives (ITM)
    Downstream (`uniter_fast.data.downstream`; None otherwise):
        targets     float32 [B, C] VQA's soft scores, VE's one-hot labels
        target      int64 [E]      NLVR2: 1 when the statement is true (E examples: B / 2 paired)
        img_type_ids int64 [Ni]    NLVR2: the token type of each region (1 left image, 2 right)
        target      int64 [B]      retrieval: 1 opens a group (its positive), 0 a negative of it;
                                   RE: the referred region's index among the example's regions
        region_index int64 [B, R]  RE: the padded view of the regions (R = max_img_len): index
                                   into the batch's Ni regions (batch-major), Ni at padding

    Static shapes (`uniter_fast.data.static.pad_static`): every size above is then a cap of the
    `StaticShape` in `padding`, and the padding is inert. Pair slots past the real pairs have
    `itm_target` -100 (ignored); MLM targets past the real ones have label -100; masked regions
    past the real ones have `mrm_valid` False, zero targets and `mrc_label` 0; padded text
    tokens and regions embed into rows past `padding.shape.rows`, which are dropped; the packed
    rows past the real ones form short filler sequences that no loss reads. `cu_seqlens` then
    has more sequences than there are pair slots (`txt_len` is the shorter): the first
    `num_pair_slots` sequences are the pairs. `num_tokens`, `num_pairs` and `num_txt_tokens`
    count the real ones.
        mrm_valid   bool [R]       real masked regions (static batches only; None otherwise)
        padding     StaticPadding  the shape and the real sizes (None for dynamic batches)
    """

    task: str
    input_ids: torch.Tensor
    txt_pos: torch.Tensor
    txt_dest: torch.Tensor
    img_feat: torch.Tensor
    img_loc: torch.Tensor
    img_masked: torch.Tensor
    img_dest: torch.Tensor
    cu_seqlens: torch.Tensor
    txt_len: torch.Tensor
    img_len: torch.Tensor
    max_seqlen: int
    max_txt_len: int
    max_img_len: int
    pad_index: torch.Tensor
    unpad_index: torch.Tensor
    mlm_index: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    mrm_index: torch.Tensor | None = None
    mrfr_target: torch.Tensor | None = None
    mrc_soft_target: torch.Tensor | None = None
    mrc_label: torch.Tensor | None = None
    itm_target: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    target: torch.Tensor | None = None
    img_type_ids: torch.Tensor | None = None
    region_index: torch.Tensor | None = None
    txt_type_ids: torch.Tensor | None = None
    mrm_valid: torch.Tensor | None = None
    padding: Any = None  # a `uniter_fast.data.static.StaticPadding` for static batches

    @property
    def num_pairs(self) -> int:
        """Real image-text pairs."""
        return self.padding.pairs if self.padding else int(self.txt_len.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real positions N (text tokens plus regions): the throughput unit."""
        if self.padding:
            return self.padding.tokens
        return int(self.input_ids.shape[0] + self.img_feat.shape[0])

    @property
    def num_txt_tokens(self) -> int:
        return self.padding.txt_tokens if self.padding else int(self.input_ids.shape[0])

    @property
    def num_rows(self) -> int:
        """Rows of the packed hidden states the encoder runs on (the cap for static batches)."""
        return self.padding.shape.rows if self.padding else self.num_tokens

    @property
    def num_pair_slots(self) -> int:
        """Pairs the ITM and WRA heads score: the real ones, plus the padding's slots."""
        return int(self.txt_len.shape[0])

    @property
    def pair_cu_seqlens(self) -> torch.Tensor:
        """`cu_seqlens` of the pair slots, (num_pair_slots + 1,): all of it for dynamic batches."""
        return self.cu_seqlens[: self.num_pair_slots + 1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def _map(self, fn) -> Batch:
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def from_numpy(cls, task: str, arrays: dict[str, Any]) -> Batch:
        """Wrap the collator's NumPy arrays without copying (ints pass through)."""
        values = {
            k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in arrays.items()
        }
        return cls(task=task, **values)
