"""uniter-fast: UNITER pretraining on packed batches with fused kernels.

import uniter_fast as uf
cfg = uf.UniterConfig.from_json("configs/model/uniter-base.json")
model = uf.UniterForPretraining(cfg, img_dim=2048, img_label_dim=1601)
report = uf.load_pretrained(model, "uniter-base.pt")
batch = uf.data.collate(examples, task="mlm")
out = model(batch, task="mlm")          # {"loss": ..., "mlm": ...}

model = uf.UniterForVqa(cfg, img_dim=2048, num_answers=3129)   # or VisualEntailment, Nlvr2,
                                                              # Retrieval, ReferringExpressions,
                                                              # Vcr
out = model(uf.data.collate(examples, task=model.task))       # {"scores": ..., "loss": ...}
"""

from . import data
from .config import UniterConfig
from .convert import LoadReport, export_reference, load_pretrained, save_reference
from .data.schema import Batch
from .model import (
    UniterForNlvr2,
    UniterForPretraining,
    UniterForReferringExpressions,
    UniterForRetrieval,
    UniterForVcr,
    UniterForVcrPretraining,
    UniterForVisualEntailment,
    UniterForVqa,
    UniterModel,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "LoadReport",
    "UniterConfig",
    "UniterForNlvr2",
    "UniterForPretraining",
    "UniterForReferringExpressions",
    "UniterForRetrieval",
    "UniterForVcr",
    "UniterForVcrPretraining",
    "UniterForVisualEntailment",
    "UniterForVqa",
    "UniterModel",
    "data",
    "export_reference",
    "load_pretrained",
    "save_reference",
]
