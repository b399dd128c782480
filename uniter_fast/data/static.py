"""Static shapes: a packed batch padded to fixed sizes, so that a step can be captured once.

A packed batch's sizes change with every batch (pairs, text tokens, regions, MLM and MRM
targets, the longest lengths). That is what makes it cheap, and also what keeps a step from
being captured in a CUDA graph, whose kernels and buffers are fixed: the host then issues every
kernel of every step, and for UNITER's step it issues them more slowly than the GPU runs them
(benchmarks/NOTES.md, "Is the fast step host-bound?"). `pad_static` pads a batch to the caps of
a `StaticShape`; every padded batch of one task then has the same tensors, shapes and Python
ints, and `uniter_fast.train.graphs` replays one captured graph for all of them.

    shape = StaticShape.covering(batches)           # or StaticShape.for_budget(10240, pairs=192)
    padded = pad_static(batch, shape)               # None when the batch does not fit
    model(padded, task)                             # the same losses as model(batch, task)

The padding is inert: it changes no loss and no gradient (tests/test_static.py holds the padded
batch to the unpadded one for every task, loss and gradient). How:

- Text tokens and regions past the real ones are embedded into rows past `shape.rows`, which
  the model drops right after embedding (so they reach nothing).
- The packed rows past the real N are zero rows. The first `2 * (pairs - B)` of them form
  `pairs - B` dummy pairs of one token and one region (so the pair slots are all real-looking
  pairs and WRA's transport stays finite); the rest form `filler` sequences of 1 to
  `max_seqlen` rows, so that every row belongs to some sequence and attention over it is
  finite on every backend. No sequence is empty.
- Loss targets past the real ones are ignored: ITM targets and MLM labels -100 (cross-entropy's
  ignore index), masked regions flagged in `mrm_valid` with zero targets and `mrc_label` 0; the
  model divides by the real counts, on the device.

The cost: the encoder runs on `shape.rows` rows instead of N (the caps are chosen so that is a
few percent), and the CPU copies each batch once more into the padded buffers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .collate import PAD_MULTIPLE
from .schema import MAX_CAPTION_TOKENS, MAX_REGIONS, Batch

IGNORE_INDEX = -100  # cross-entropy's ignore index: padded MLM labels and ITM targets

# What `covering` rounds each cap up to, so that nearby data gives the same shape.
_ROUND = {"pairs": 8, "tokens": 64, "targets": 16}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class StaticShape:
    """The fixed sizes a padded batch has.

    tokens: the most real positions (text tokens plus regions) of a batch; pairs: pair slots;
    txt_tokens, regions: the most text tokens and regions; max_txt_len, max_img_len: the longest
    caption (with [CLS] and [SEP]) and the most regions of one pair; mlm_targets, mrm_targets:
    the most masked tokens and masked regions. Derived: `rows` (packed rows the encoder runs
    on), `filler` (sequences past the pair slots), `sequences`, `max_seqlen`, `lpad`.
    """

    tokens: int
    pairs: int
    txt_tokens: int
    regions: int
    max_txt_len: int = MAX_CAPTION_TOKENS + 2
    max_img_len: int = MAX_REGIONS
    mlm_targets: int = 0
    mrm_targets: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StaticShape.{f.name} must be a non-negative int, got {value!r}")
        for name in ("tokens", "pairs", "txt_tokens", "regions", "max_txt_len", "max_img_len"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"StaticShape.{name} must be at least 1, got {value}")

    @property
    def max_seqlen(self) -> int:
        return self.max_txt_len + self.max_img_len

    @property
    def lpad(self) -> int:
        return _round_up(self.max_seqlen, PAD_MULTIPLE)

    @property
    def filler(self) -> int:
        """Filler sequences: enough for the most filler rows a fitting batch can leave."""
        return -(-(self.tokens + 2 * self.pairs) // (self.max_seqlen - 1))

    @property
    def sequences(self) -> int:
        return self.pairs + self.filler

    @property
    def rows(self) -> int:
        """Packed rows: the token cap, two per dummy pair, at least one per filler sequence."""
        return self.tokens + 2 * self.pairs + self.filler

    @classmethod
    def for_budget(
        cls,
        tokens: int,
        pairs: int,
        *,
        mlm_targets: int | None = None,
        mrm_targets: int | None = None,
        max_txt_len: int = MAX_CAPTION_TOKENS + 2,
        max_img_len: int = MAX_REGIONS,
    ) -> StaticShape:
        """A shape for a token budget: every batch of at most `tokens` real positions and `pairs`
        pairs fits, except one with more targets than given (default: a quarter of the tokens,
        well above the 15% the masking draws)."""
        quarter = _round_up(tokens // 4, _ROUND["targets"])
        return cls(
            tokens=tokens,
            pairs=pairs,
            txt_tokens=tokens,
            regions=tokens,
            max_txt_len=max_txt_len,
            max_img_len=max_img_len,
            mlm_targets=quarter if mlm_targets is None else mlm_targets,
            mrm_targets=quarter if mrm_targets is None else mrm_targets,
        )

    @classmethod
    def covering(cls, batches: Iterable[Batch]) -> StaticShape:
        """The smallest shape (caps rounded up: pairs to 8, tokens to 64, targets to 16) that
        every one of `batches` (unpadded, any tasks) fits."""
        top = dict.fromkeys(("tokens", "pairs", "txt", "img", "mtxt", "mimg", "mlm", "mrm"), 0)
        seen = 0
        for b in batches:
            if b.padding is not None:
                raise ValueError("StaticShape.covering: takes unpadded batches")
            seen += 1
            sizes = {
                "tokens": b.num_tokens,
                "pairs": b.num_pairs,
                "txt": b.num_txt_tokens,
                "img": int(b.img_feat.shape[0]),
                "mtxt": b.max_txt_len,
                "mimg": b.max_img_len,
                "mlm": 0 if b.mlm_index is None else int(b.mlm_index.shape[0]),
                "mrm": 0 if b.mrm_index is None else int(b.mrm_index.shape[0]),
            }
            top = {k: max(v, sizes[k]) for k, v in top.items()}
        if not seen:
            raise ValueError("StaticShape.covering: no batches")
        return cls(
            tokens=_round_up(top["tokens"], _ROUND["tokens"]),
            pairs=_round_up(top["pairs"], _ROUND["pairs"]),
            txt_tokens=_round_up(top["txt"], _ROUND["tokens"]),
            regions=_round_up(top["img"], _ROUND["tokens"]),
            max_txt_len=top["mtxt"],
            max_img_len=top["mimg"],
            mlm_targets=_round_up(top["mlm"], _ROUND["targets"]),
            mrm_targets=_round_up(top["mrm"], _ROUND["targets"]),
        )

    def describe(self) -> str:
        return (
            f"{self.rows} rows ({self.tokens} tokens + {self.pairs} pair slots + "
            f"{self.filler} filler sequences), text {self.txt_tokens}, regions {self.regions}, "
            f"lengths <= {self.max_txt_len} x {self.max_img_len}, targets MLM "
            f"{self.mlm_targets} MRM {self.mrm_targets}"
        )


@dataclass(frozen=True)
class StaticPadding:
    """What `pad_static` records on a batch: its shape and the real sizes under the caps."""

    shape: StaticShape
    tokens: int
    txt_tokens: int
    pairs: int
    mlm_targets: int
    mrm_targets: int

    @property
    def embed_rows(self) -> int:
        """Rows the embeddings are scattered into: the packed rows, then a row per padded text
        token and region (dropped after embedding)."""
        return self.shape.rows + self.shape.txt_tokens + self.shape.regions


def fit_problem(batch: Batch, shape: StaticShape) -> str | None:
    """Why `batch` does not fit `shape` (the first size over its cap), or None when it does."""
    sizes = [
        ("tokens", batch.num_tokens, shape.tokens),
        ("pairs", batch.num_pairs, shape.pairs),
        ("text tokens", batch.num_txt_tokens, shape.txt_tokens),
        ("regions", int(batch.img_feat.shape[0]), shape.regions),
        ("longest caption", batch.max_txt_len, shape.max_txt_len),
        ("most regions", batch.max_img_len, shape.max_img_len),
    ]
    if batch.mlm_index is not None:
        sizes.append(("MLM targets", int(batch.mlm_index.shape[0]), shape.mlm_targets))
    if batch.mrm_index is not None:
        sizes.append(("MRM targets", int(batch.mrm_index.shape[0]), shape.mrm_targets))
    for name, value, cap in sizes:
        if value > cap:
            return f"{name} {value} > {cap}"
    return None


def _padded(t: torch.Tensor, length: int, fill) -> torch.Tensor:
    out = t.new_full((length, *t.shape[1:]), fill)
    out[: t.shape[0]] = t
    return out


def pad_static(batch: Batch, shape: StaticShape) -> Batch | None:
    """`batch` padded to `shape` (module docstring), or None when it does not fit
    (`fit_problem` says why). The result is a new batch on `batch`'s device (meant for the
    CPU, before pinning); `batch` is not modified."""
    if batch.padding is not None:
        if batch.padding.shape == shape:
            return batch
        raise ValueError("pad_static: the batch is already padded to another shape")
    if fit_problem(batch, shape) is not None:
        return None
    s = shape
    num_pairs, tokens, txt_tokens = batch.num_pairs, batch.num_tokens, batch.num_txt_tokens
    regions = int(batch.img_feat.shape[0])
    dummies = s.pairs - num_pairs
    device = batch.cu_seqlens.device
    i64 = dict(dtype=torch.int64, device=device)

    # Sequence lengths: the real pairs, the dummy pairs (2 rows each), the filler sequences.
    filler_rows = s.rows - tokens - 2 * dummies
    base, extra = divmod(filler_rows, s.filler)
    seq_len = torch.cat(
        [
            (batch.txt_len + batch.img_len).to(**i64),
            torch.full((dummies,), 2, **i64),
            torch.full((s.filler,), base, **i64),
        ]
    )
    seq_len[s.pairs : s.pairs + extra] += 1
    if base < 1 or base + (extra > 0) > s.max_seqlen:  # what StaticShape.filler guarantees
        raise AssertionError(f"pad_static: filler of {filler_rows} rows breaks {s}")
    cu_seqlens = torch.zeros(s.sequences + 1, **i64)
    torch.cumsum(seq_len, 0, out=cu_seqlens[1:])

    # Padded view over every sequence, and its inverse.
    seq_id = torch.repeat_interleave(torch.arange(s.sequences, **i64), seq_len)
    seq_pos = torch.arange(s.rows, **i64) - cu_seqlens[:-1][seq_id]
    pad_index = torch.full((s.sequences, s.lpad), s.rows, **i64)
    pad_index[seq_id, seq_pos] = torch.arange(s.rows, **i64)

    # Padded text tokens and regions land past the packed rows, each on its own row.
    txt_dest = torch.cat([batch.txt_dest, s.rows + torch.arange(s.txt_tokens - txt_tokens, **i64)])
    img_dest = torch.cat(
        [batch.img_dest, s.rows + s.txt_tokens + torch.arange(s.regions - regions, **i64)]
    )
    fields = {
        "input_ids": _padded(batch.input_ids, s.txt_tokens, 0),
        "txt_pos": _padded(batch.txt_pos, s.txt_tokens, 0),
        "txt_dest": txt_dest,
        "img_feat": _padded(batch.img_feat, s.regions, 0),
        "img_loc": _padded(batch.img_loc, s.regions, 0),
        "img_masked": _padded(batch.img_masked, s.regions, False),
        "img_dest": img_dest,
        "cu_seqlens": cu_seqlens.to(batch.cu_seqlens.dtype),
        "txt_len": _padded(batch.txt_len, s.pairs, 1),
        "img_len": _padded(batch.img_len, s.pairs, 1),
        "max_seqlen": s.max_seqlen,
        "max_txt_len": s.max_txt_len,
        "max_img_len": s.max_img_len,
        "pad_index": pad_index,
        "unpad_index": seq_id * s.lpad + seq_pos,
    }
    mlm = mrm = 0
    if batch.mlm_index is not None:
        mlm = int(batch.mlm_index.shape[0])
        fields["mlm_index"] = _padded(batch.mlm_index, s.mlm_targets, 0)
        fields["mlm_labels"] = _padded(batch.mlm_labels, s.mlm_targets, IGNORE_INDEX)
    if batch.mrm_index is not None:
        mrm = int(batch.mrm_index.shape[0])
        fields["mrm_index"] = _padded(batch.mrm_index, s.mrm_targets, 0)
        fields["mrm_valid"] = _padded(
            torch.ones(mrm, dtype=torch.bool, device=device), s.mrm_targets, False
        )
        for name in ("mrfr_target", "mrc_soft_target", "mrc_label"):
            value = getattr(batch, name)
            if value is not None:
                fields[name] = _padded(value, s.mrm_targets, 0)
    if batch.itm_target is not None:
        fields["itm_target"] = _padded(batch.itm_target, s.pairs, IGNORE_INDEX)
    fields["padding"] = StaticPadding(
        shape=s,
        tokens=tokens,
        txt_tokens=txt_tokens,
        pairs=num_pairs,
        mlm_targets=mlm,
        mrm_targets=mrm,
    )
    return dataclasses.replace(batch, **fields)


def static_key(batch: Batch, task: str) -> tuple:
    """What a captured step depends on: the task, the shape, and every tensor's dtype and shape
    (a graph replays only for batches with the same key)."""
    if batch.padding is None:
        raise ValueError("static_key: the batch is not padded (pad_static)")
    tensors = tuple(
        (name, str(t.dtype), tuple(t.shape), t.device.type)
        for name, t in sorted(batch.tensors().items())
    )
    return (task, batch.padding.shape, tensors)


def padding_overhead(batch: Batch) -> float:
    """Rows the encoder runs on per real position (1.0 for an unpadded batch)."""
    return batch.num_rows / batch.num_tokens if batch.num_tokens else math.inf


__all__ = [
    "IGNORE_INDEX",
    "StaticPadding",
    "StaticShape",
    "fit_problem",
    "pad_static",
    "padding_overhead",
    "static_key",
]
