"""Converters: checkpoints between layouts, and raw feature formats to shards.

Feature converters (`python -m uniter_fast.convert --help`): `lmdb` (the reference's image and
text LMDBs), `butd_tsv` (bottom-up-attention TSV + COCO or Karpathy captions), `captions`
(per-image .npz + COCO captions or Karpathy's split files), `tasks` and `vqa` (VQA, SNLI-VE,
NLVR2 task shards), `refexp` (RefCOCO/+/g task shards from refer's files or the reference's
databases), `vcr` (VCR task shards from the public annotations or the reference's databases;
its docstring holds the rule mapping object references to tag ids), `verify` (check a shard
set), on the shared machinery of `common` (region selection, counting, resumable journaled
writing, manifest). They are not imported here: their dependencies (lmdb, tokenizers, msgpack,
lz4) are the optional extra `convert` (`pip install -e ".[convert]"`), imported only when a
converter runs.
"""

from .checkpoints import (
    LoadReport,
    export_reference,
    load_pretrained,
    save_reference,
    to_reference_layout,
)

__all__ = [
    "LoadReport",
    "export_reference",
    "load_pretrained",
    "save_reference",
    "to_reference_layout",
]
