"""Choosing (image, caption) pairs from pretraining shards, and turning one into an example."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.schema import BERT_BASE_CASED
from ..data.shards import ImageRecord, iter_shard, list_shards
from .loading import InspectError

_CAPTION_SUFFIX = re.compile(r"^(?P<key>.+)/(?P<caption>\d+)$")


@dataclass
class Pair:
    """One image-text pair: `record.captions[caption]` with the image of `record`."""

    record: ImageRecord
    caption: int

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def name(self) -> str:
        """`KEY/j`, what `--keys` takes back."""
        return f"{self.record.key}/{self.caption}"


def build_example(pair: Pair) -> dict:
    """The "pairs" example: `input_ids` = [CLS] caption [SEP], the image's features and boxes."""
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


def _records(urls: list[str]):
    for url in urls:
        yield from iter_shard(url)


def sample_pairs(
    pattern: str | Sequence[str], count: int, *, seed: int = 0, progress: bool = False
) -> list[Pair]:
    """`count` pairs drawn uniformly (without replacement) from every caption of every image.

    One pass over all the shards `pattern` matches (reservoir sampling: only the chosen records
    stay in memory), so point it at a few shards rather than a whole corpus. The same shards and
    seed give the same pairs. Returned in file order; fewer when the shards hold fewer pairs.
    """
    if count < 1:
        raise InspectError(f"--pairs must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, Pair]] = []
    seen = 0
    for url in _shards(pattern):
        if progress:
            print(f"inspect: reading {url}", file=sys.stderr)
        for record in iter_shard(url):
            for j in range(len(record.captions)):
                # Algorithm R: item `seen` replaces a kept one with probability count / (seen+1).
                if len(chosen) < count:
                    chosen.append((seen, Pair(record, j)))
                else:
                    slot = int(rng.integers(seen + 1))
                    if slot < count:
                        chosen[slot] = (seen, Pair(record, j))
                seen += 1
    if not chosen:
        raise InspectError(f"--data {pattern}: the shards hold no image-text pairs")
    return [pair for _, pair in sorted(chosen, key=lambda item: item[0])]


def find_pairs(pattern: str | Sequence[str], keys: Sequence[str]) -> list[Pair]:
    """The pairs named by `keys`, in that order: `KEY` (caption 0) or `KEY/j` (caption j).

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
    for record in _records(urls):
        for spec, caption in wanted.get(record.key, ()):
            exact = spec == record.key
            if spec in found and spec not in tentative:
                continue
            n = len(record.captions)
            found[spec] = (
                Pair(record, caption)
                if caption < n
                else f"--keys {spec}: sample {record.key!r} in {record.shard} has {n} "
                f"captions (0..{n - 1})"
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
    return [found[spec] for spec in keys]
