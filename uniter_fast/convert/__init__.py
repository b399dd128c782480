"""Converters: checkpoints between layouts, and (next) raw feature formats to shards."""

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
