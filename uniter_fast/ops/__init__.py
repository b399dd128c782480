"""Ops with a reference form (this package) and, later, fused kernels (`uniter_fast.kernels`)."""

from .losses import (
    gather_padded,
    gather_rows,
    itm_loss,
    mlm_loss,
    mrc_loss,
    mrckl_loss,
    mrfr_loss,
    wra_loss,
)
from .ot import cosine_cost, gather_pairs, ipot_plan, wra_distance, wra_distance_packed

__all__ = [
    "cosine_cost",
    "gather_padded",
    "gather_pairs",
    "gather_rows",
    "ipot_plan",
    "itm_loss",
    "mlm_loss",
    "mrc_loss",
    "mrckl_loss",
    "mrfr_loss",
    "wra_distance",
    "wra_distance_packed",
    "wra_loss",
]
