"""The data path: shard schema, reading and writing shards, and packing examples into batches."""

from .collate import collate, collate_numpy
from .schema import BERT_BASE_CASED, IMG_DIM, IMG_LABEL_DIM, TASKS, Batch, Vocab

__all__ = [
    "BERT_BASE_CASED",
    "IMG_DIM",
    "IMG_LABEL_DIM",
    "TASKS",
    "Batch",
    "Vocab",
    "collate",
    "collate_numpy",
]
