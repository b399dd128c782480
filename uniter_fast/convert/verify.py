"""Check a shard set: every sample decodes, keys are unique, and it matches its manifest.

    python -m uniter_fast.convert verify shards/coco              # a directory (its manifest.json)
    python -m uniter_fast.convert verify 'shards/coco/coco-{000000..000009}.tar' \\
        --manifest shards/coco/manifest.json --deep

Every sample goes through the readers' own allow-list decoder (`shards.iter_shard`), which checks
the members, shapes, dtypes, finite values, caption lengths and token ids; a bad sample is
reported and reading goes on. Across the set, sample keys must be unique. With a manifest, the
shard names, sample and pair counts, sizes, sha256 and first/last keys must match it. `--deep`
adds semantic checks: boxes consistent (x1 <= x2, w = x2 - x1, area = w * h, inside the image
up to a margin), soft labels summing to 1, meta naming the image.

Exit status 0 when the set is clean, 1 otherwise; each problem names shard, sample and field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.shards import ImageRecord, ShardFormatError, iter_shard, list_shards
from .common import MANIFEST_FORMAT, MANIFEST_NAME

__all__ = ["Problem", "ShardReport", "VerifyReport", "verify_shards"]

# --deep tolerances: float16/float32 rounding of normalised boxes and of 1601 soft labels.
_LOC_MARGIN = 0.05  # boxes may poke slightly out of the image (detectors do not always clip)
_LOC_ATOL = 2e-3
_SOFT_ATOL = 0.02


@dataclass
class Problem:
    """One thing wrong: where (shard, sample key, field) and what (reason, detail)."""

    shard: str
    key: str | None
    field: str | None
    reason: str
    detail: str

    def __str__(self) -> str:
        where = self.shard or "<set>"
        if self.key is not None:
            where += f": sample {self.key!r}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.detail} [{self.reason}]"


@dataclass
class ShardReport:
    name: str
    samples: int = 0
    pairs: int = 0
    bytes: int = 0
    sha256: str = ""
    first_key: str | None = None
    last_key: str | None = None
    problems: int = 0
    manifest: str = "-"  # "ok", "MISMATCH", "unlisted" or "-" (no manifest)


@dataclass
class VerifyReport:
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    manifest: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, max_problems: int = 50) -> list[str]:
        width = max([len(s.name) for s in self.shards] + [5])
        out = [
            f"{'shard':<{width}}  {'samples':>8}  {'pairs':>8}  {'bytes':>12}  manifest  problems"
        ]
        for s in self.shards:
            out.append(
                f"{s.name:<{width}}  {s.samples:>8}  {s.pairs:>8}  {s.bytes:>12}  "
                f"{s.manifest:<8}  {s.problems:>8}"
            )
        samples = sum(s.samples for s in self.shards)
        pairs = sum(s.pairs for s in self.shards)
        manifest = f" against {self.manifest}" if self.manifest else " (no manifest)"
        out.append(
            f"verified {len(self.shards)} shard(s){manifest}: {samples} good samples, {pairs} "
            f"pairs, {len(self.problems)} problem(s)"
        )
        for problem in self.problems[:max_problems]:
            out.append(f"  {problem}")
        if len(self.problems) > max_problems:
            out.append(f"  ... and {len(self.problems) - max_problems} more")
        out.append("OK" if self.ok else "FAILED")
        return out


def _resolve(target: str, manifest: str | os.PathLike | None) -> tuple[list[str], Path | None]:
    path = Path(target)
    if path.is_dir():
        shards = list_shards(str(path))
        if manifest is None and (path / MANIFEST_NAME).is_file():
            manifest = path / MANIFEST_NAME
    else:
        shards = list_shards(target)
    return shards, Path(manifest) if manifest is not None else None


def _sha256(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _deep_checks(record: ImageRecord) -> list[tuple[str, str, str]]:
    """(field, reason, detail) for semantic problems of a record that decodes."""
    found = []
    loc = record.loc.astype(np.float64)
    x1, y1, x2, y2, w, h, area = loc.T
    if (loc[:, :4] < -_LOC_MARGIN).any() or (loc[:, :4] > 1 + _LOC_MARGIN).any():
        found.append(("loc.npy", "deep_loc", "has box corners outside the image"))
    if (x2 < x1 - _LOC_ATOL).any() or (y2 < y1 - _LOC_ATOL).any():
        found.append(("loc.npy", "deep_loc", "has boxes with x2 < x1 or y2 < y1"))
    if not (np.allclose(w, x2 - x1, atol=_LOC_ATOL) and np.allclose(h, y2 - y1, atol=_LOC_ATOL)):
        found.append(("loc.npy", "deep_loc", "has w/h columns that are not x2 - x1 / y2 - y1"))
    if not np.allclose(area, w * h, atol=_LOC_ATOL):
        found.append(("loc.npy", "deep_loc", "has an area column that is not w * h"))
    sums = record.soft.astype(np.float64).sum(axis=1)
    if not np.allclose(sums, 1.0, atol=_SOFT_ATOL):
        worst = float(sums[np.argmax(np.abs(sums - 1.0))])
        found.append(("soft.npy", "deep_soft", f"has a row summing to {worst:.4f}, not 1"))
    for name in ("image_id", "dataset"):
        if name not in record.meta:
            found.append(("meta.json", "deep_meta", f"has no {name!r}"))
    return found


def verify_shards(
    target: str | os.PathLike,
    *,
    manifest: str | os.PathLike | None = None,
    deep: bool = False,
    vocab: Vocab = BERT_BASE_CASED,
    progress: bool | None = None,
) -> VerifyReport:
    """Verify the shards of a directory or pattern (see the module docstring).

    Raises FileNotFoundError when the target matches no shard; everything else wrong with the
    set is a `Problem` in the report.
    """
    from tqdm import tqdm

    paths, manifest_path = _resolve(os.fspath(target), manifest)
    report = VerifyReport(manifest=str(manifest_path) if manifest_path else None)
    listed: dict[str, dict] = {}
    if manifest_path is not None:
        try:
            obj = json.loads(manifest_path.read_text(encoding="utf-8"))
            if obj.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {obj.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            listed = {s["name"]: s for s in obj["shards"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # A manifest is data: a broken one is a problem to report, not a crash.
            report.problems.append(
                Problem(str(manifest_path), None, None, "manifest", f"cannot be read ({e})")
            )
            manifest_path = None
    seen: dict[str, str] = {}  # key -> shard it was first seen in
    for path in tqdm(paths, desc="verify", unit="shard", disable=None if progress else True):
        name = Path(path).name
        shard = ShardReport(name=name)
        report.shards.append(shard)
        start = len(report.problems)

        def bad(err: ShardFormatError, name=name) -> None:
            report.problems.append(Problem(name, err.key, err.field, err.reason, err.detail))

        shard.sha256, shard.bytes = _sha256(path)
        for record in iter_shard(path, vocab=vocab, on_bad=bad):
            shard.samples += 1
            shard.pairs += len(record.captions)
            shard.first_key = shard.first_key or record.key
            shard.last_key = record.key
            if record.key in seen:
                report.problems.append(
                    Problem(
                        name,
                        record.key,
                        "__key__",
                        "duplicate_key",
                        f"was already used in shard {seen[record.key]}",
                    )
                )
            else:
                seen[record.key] = name
            if deep:
                for fld, reason, detail in _deep_checks(record):
                    report.problems.append(Problem(name, record.key, fld, reason, detail))
        if shard.samples == 0 and len(report.problems) == start:
            report.problems.append(Problem(name, None, None, "empty", "holds no sample"))
        if manifest_path is not None:
            _compare(shard, listed.get(name), report)
        shard.problems = len(report.problems) - start
    if manifest_path is not None:
        names = {s.name for s in report.shards}
        for missing in sorted(set(listed) - names):
            report.problems.append(
                Problem(missing, None, None, "manifest", "is listed in the manifest but missing")
            )
        if names == set(listed):
            totals = obj.get("totals", {})
            for what, have in (
                ("images", sum(s.samples for s in report.shards)),
                ("pairs", sum(s.pairs for s in report.shards)),
            ):
                if totals.get(what) != have:
                    report.problems.append(
                        Problem(
                            str(manifest_path),
                            None,
                            f"totals.{what}",
                            "manifest",
                            f"says {totals.get(what)}, the shards hold {have}",
                        )
                    )
    return report


def _compare(shard: ShardReport, entry: dict | None, report: VerifyReport) -> None:
    if entry is None:
        shard.manifest = "unlisted"
        report.problems.append(
            Problem(shard.name, None, None, "manifest", "is not listed in the manifest")
        )
        return
    mismatched = False
    for what in ("samples", "pairs", "bytes", "sha256", "first_key", "last_key"):
        have = getattr(shard, what)
        if entry.get(what) != have:
            mismatched = True
            report.problems.append(
                Problem(
                    shard.name,
                    None,
                    what,
                    "manifest",
                    f"is {have!r}, the manifest says {entry.get(what)!r}",
                )
            )
    shard.manifest = "MISMATCH" if mismatched else "ok"
