"""The data path: shard schema, reading and writing shards, batching and packing examples."""

from .batching import token_bucket_batches
from .collate import collate, collate_cpp, collate_numpy, extension_error, extension_loaded
from .schema import BERT_BASE_CASED, IMG_DIM, IMG_LABEL_DIM, TASKS, Batch, Vocab

__all__ = [
    "BERT_BASE_CASED",
    "IMG_DIM",
    "IMG_LABEL_DIM",
    "TASKS",
    "Batch",
    "Vocab",
    "collate",
    "collate_cpp",
    "collate_numpy",
    "extension_error",
    "extension_loaded",
    "token_bucket_batches",
]
