"""Choosing pairs from shards, and turning one into an example.

Two kinds of shards (`--data-kind`):

- "pretrain": pretraining shards (`uniter_fast.data.shards`). A pair is one caption of an image:
  [CLS] caption [SEP], every token of type 0, the image's regions.
- "vcr": "vcr" task shards (`uniter_fast.data.task_shards`), what the second pretraining stage
  reads. A pair is one question (item j of a sample): the stage's own sequence
  [CLS] q [SEP] a_gt [SEP] r_gt [SEP] with its token types 0 / 2 / 3
  (`uniter_fast.tasks.vcr.pretrain_example`), the frame's ground-truth boxes (object k of meta
  "objects" is ground-truth region k) then its detected boxes. Test-split questions, which
  have no right answer or rationale, give no pair.

"auto" (the default) reads the first sample of the first non-empty shard: its meta "task"
(or, without one, its members) says which it is.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.schema import BERT_BASE_CASED
from ..data.shards import ImageRecord, ShardFormatError, iter_shard, list_shards
from ..data.task_shards import TaskRecord, iter_task_shard
from .loading import InspectError

_CAPTION_SUFFIX = re.compile(r"^(?P<key>.+)/(?P<caption>\d+)$")
DATA_KINDS = ("auto", "pretrain", "vcr")


@dataclass
class Pair:
    """One text with its image: caption `caption` of a pretraining `record`, or question (item)
    `caption` of a VCR `record`."""

    record: ImageRecord | TaskRecord
    caption: int

    @property
    def kind(self) -> str:
        return "vcr" if isinstance(self.record, TaskRecord) else "pretrain"

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def name(self) -> str:
        """`KEY/j`, what `--keys` takes back."""
        return f"{self.record.key}/{self.caption}"

    @property
    def item(self) -> dict | None:
        """The VCR question (its item of items.json); None for a pretraining caption."""
        return self.record.items[self.caption] if self.kind == "vcr" else None

    def text_parts(self) -> list[np.ndarray]:
        """The texts shown as the caption: [caption], or VCR's [question, answer, rationale]
        (the right ones)."""
        item = self.item
        if item is None:
            return [np.asarray(self.record.captions[self.caption])]
        _check_labelled(self)
        return [
            np.asarray(item["question"]),
            np.asarray(item["answers"][item["answer_label"]]),
            np.asarray(item["rationales"][item["rationale_label"]]),
        ]

    def regions(self) -> tuple[np.ndarray, np.ndarray]:
        """(feat, loc) of every region in packing order (VCR: ground truth, then detected)."""
        if self.kind == "vcr":
            (gf, gl), (df, dl) = self.record.images
            return np.concatenate([gf, df]), np.concatenate([gl, dl])
        return self.record.feat, self.record.loc

    @property
    def num_regions(self) -> int:
        return int(self.record.num_regions)

    @property
    def ground_truth_regions(self) -> int:
        """How many of the first regions are VCR ground-truth boxes (0 for pretraining)."""
        return int(self.record.images[0][0].shape[0]) if self.kind == "vcr" else 0

    def region_names(self) -> list[str]:
        """Per region, what it shows when that is known, else "": a VCR ground-truth box is
        named by its object (meta "objects"); a person also by its rank among the persons, the p
        of its tag `<person p>`. Detected boxes and pretraining regions are unnamed."""
        names = [""] * self.num_regions
        if self.kind != "vcr":
            return names
        objects = self.record.meta.get("objects") or []
        persons = 0
        for k in range(self.ground_truth_regions):
            name = str(objects[k]) if k < len(objects) else ""
            if name == "person":
                name = f"person {min(persons, _MAX_PERSON_TAG)}"
                persons += 1
            names[k] = name
        return names

    def region_labels(self) -> list[str]:
        """`r<j>`, with the region's name when it has one: `r0 person 1`, `r2 car`."""
        return [f"r{j} {n}" if n else f"r{j}" for j, n in enumerate(self.region_names())]


_MAX_PERSON_TAG = 80  # persons from the 81st on share the last tag (`uniter_fast.convert.vcr`)


def _check_labelled(pair: Pair) -> None:
    item = pair.item
    if item.get("answer_label") is None or item.get("rationale_label") is None:
        raise InspectError(
            f"{pair.name} (question {item.get('id')!r}, {pair.record.shard}): no answer_label / "
            f"rationale_label (a test split?): the VCR pretraining sequence needs the right "
            f"answer and rationale"
        )


def _usable(record: ImageRecord | TaskRecord, j: int) -> bool:
    if isinstance(record, TaskRecord):
        item = record.items[j]
        return item.get("answer_label") is not None and item.get("rationale_label") is not None
    return True


def build_example(pair: Pair) -> dict:
    """The pair's example for the "pairs" collate task.

    pretrain: `input_ids` = [CLS] caption [SEP], the image's features and boxes. vcr: the second
    pretraining stage's example (`uniter_fast.tasks.vcr.pretrain_example`: input_ids,
    txt_type_ids, img_feat / img_loc of the ground-truth then the detected boxes, soft_labels).
    """
    if pair.kind == "vcr":
        from ..tasks.vcr import pretrain_example

        _check_labelled(pair)
        return pretrain_example(pair.record, pair.item)
    vocab = BERT_BASE_CASED
    ids = np.concatenate(
        [[vocab.cls_id], np.asarray(pair.record.captions[pair.caption]), [vocab.sep_id]]
    ).astype(np.int64)
    return {"input_ids": ids, "img_feat": pair.record.feat, "img_loc": pair.record.loc}


def _shards(pattern: str | Sequence[str]) -> list[str]:
    try:
        return list_shards(pattern)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--data: {e}") from None


def _raw(members: dict, *, shard: str) -> dict:
    return members


def _sniff(urls: list[str]) -> str:
    """The kind of the first sample of the shards: "pretrain" (captions.json) or "vcr" (a task
    shard's items.json, with meta "task" "vcr"). Nothing but meta.json is decoded."""
    for url in urls:
        for members in iter_shard(url, decode=_raw):
            if "items.json" not in members:
                return "pretrain"  # what is wrong with it, if anything, the reader will say
            try:
                meta = json.loads(members.get("meta.json", b"{}"))
            except (ValueError, TypeError):
                meta = None
            task = meta.get("task") if isinstance(meta, dict) else None
            if task != "vcr":
                raise InspectError(
                    f"--data: {url} holds task shards of {task!r}; the inspector reads "
                    f"pretraining shards and VCR task shards (meta task 'vcr')"
                )
            return "vcr"
    where = urls[0] if len(urls) == 1 else f"{len(urls)} shards ({urls[0]} ...)"
    raise InspectError(f"--data: no samples in {where}")


def _kind(urls: list[str], kind: str) -> str:
    if kind not in DATA_KINDS:
        raise InspectError(f"--data-kind must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
    return _sniff(urls) if kind == "auto" else kind


def data_kind(pattern: str | Sequence[str], kind: str = "auto") -> str:
    """`kind`, or for "auto" what the shards of `pattern` hold: "pretrain" or "vcr"."""
    return _kind(_shards(pattern), kind)


def _records(urls: list[str], kind: str) -> Iterator[ImageRecord | TaskRecord]:
    for url in urls:
        try:
            yield from iter_task_shard(url, "vcr") if kind == "vcr" else iter_shard(url)
        except ShardFormatError as e:
            if e.reason not in ("forbidden_member", "missing_field", "type"):
                raise
            other = "pretrain" if kind == "vcr" else "vcr"
            raise InspectError(
                f"{e} (read as {kind} shards: are they {other} shards? --data-kind auto tells "
                f"them apart)"
            ) from None


def sample_pairs(
    pattern: str | Sequence[str],
    count: int,
    *,
    seed: int = 0,
    progress: bool = False,
    kind: str = "auto",
) -> list[Pair]:
    """`count` pairs drawn uniformly (without replacement) from every caption of every image
    (VCR: every labelled question of every frame).

    One pass over all the shards `pattern` matches (reservoir sampling: only the chosen records
    stay in memory), so point it at a few shards rather than a whole corpus. The same shards and
    seed give the same pairs. Returned in file order; fewer when the shards hold fewer pairs.
    """
    if count < 1:
        raise InspectError(f"--pairs must be at least 1, got {count}")
    urls = _shards(pattern)
    kind = _kind(urls, kind)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, Pair]] = []
    seen = unlabelled = 0
    for url in urls:
        if progress:
            print(f"inspect: reading {url}", file=sys.stderr)
        for record in _records([url], kind):
            for j in range(len(record.captions)):
                if not _usable(record, j):
                    unlabelled += 1
                    continue
                # Algorithm R: item `seen` replaces a kept one with probability count / (seen+1).
                if len(chosen) < count:
                    chosen.append((seen, Pair(record, j)))
                else:
                    slot = int(rng.integers(seen + 1))
                    if slot < count:
                        chosen[slot] = (seen, Pair(record, j))
                seen += 1
    if not chosen:
        why = (
            f" ({unlabelled} VCR questions without answer_label / rationale_label: a test split?)"
            if unlabelled
            else ""
        )
        raise InspectError(f"--data {pattern}: the shards hold no image-text pairs{why}")
    return [pair for _, pair in sorted(chosen, key=lambda item: item[0])]


def find_pairs(
    pattern: str | Sequence[str], keys: Sequence[str], *, kind: str = "auto"
) -> list[Pair]:
    """The pairs named by `keys`, in that order: `KEY` (caption 0) or `KEY/j` (caption j; for
    VCR shards, question j).

    A spec that is itself a sample key is that sample's caption 0, whatever its last `/j` says.
    Reading stops once every key is found. Raises InspectError naming the keys not found.
    """
    if not keys:
        raise InspectError("--keys: no keys given")
    specs = list(dict.fromkeys(keys))
    wanted: dict[str, list[tuple[str, int]]] = {}  # sample key -> [(spec, caption)]
    for spec in specs:
        wanted.setdefault(spec, []).append((spec, 0))
        m = _CAPTION_SUFFIX.match(spec)
        if m:
            wanted.setdefault(m["key"], []).append((spec, int(m["caption"])))
    # spec -> its pair, or why the sample it names cannot give one (a caption out of range).
    found: dict[str, Pair | str] = {}
    # Specs matched through their `/j` suffix: a sample whose key is the whole spec may still come.
    tentative: set[str] = set()
    urls = _shards(pattern)
    kind = _kind(urls, kind)
    what = "questions" if kind == "vcr" else "captions"
    for record in _records(urls, kind):
        for spec, caption in wanted.get(record.key, ()):
            exact = spec == record.key
            if spec in found and spec not in tentative:
                continue
            n = len(record.captions)
            found[spec] = (
                Pair(record, caption)
                if caption < n
                else f"--keys {spec}: sample {record.key!r} in {record.shard} has {n} "
                f"{what} (0..{n - 1})"
            )
            if exact:
                tentative.discard(spec)
            else:
                tentative.add(spec)
        if len(found) == len(specs) and not tentative:
            break
    missing = [spec for spec in specs if spec not in found]
    if missing:
        where = urls[0] if len(urls) == 1 else f"{len(urls)} shards ({urls[0]} ...)"
        raise InspectError(f"--keys: not found in {where}: {', '.join(missing)}")
    for spec in keys:
        if isinstance(found[spec], str):
            raise InspectError(found[spec])
        if found[spec].kind == "vcr":
            _check_labelled(found[spec])
    return [found[spec] for spec in keys]
