"""The authors' collate functions, re-implemented: padded tensors, gather_index, OT inputs.

Takes this project's example dicts (schema in `uniter_fast.data.schema`) and returns the padded
batch dict that `uniter_fast.authors.model.UniterForPretraining` reads. Features are widened to
float32 on the way in, as the reference's feature reader does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence


def pad_tensors(tensors, lens=None, pad=0):
    if lens is None:
        lens = [t.size(0) for t in tensors]
    max_len = max(lens)
    output = torch.zeros(len(tensors), max_len, tensors[0].size(-1), dtype=tensors[0].dtype)
    if pad:
        output.data.fill_(pad)
    for i, (t, n) in enumerate(zip(tensors, lens, strict=True)):
        output.data[i, :n, ...] = t.data
    return output


def get_gather_index(txt_lens, num_bbs, batch_size, max_len, out_size):
    gather_index = torch.arange(0, out_size, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs, strict=True)):
        gather_index.data[i, tl : tl + nbb] = torch.arange(max_len, max_len + nbb, dtype=torch.long)
    return gather_index


def _compute_ot_scatter(txt_lens, max_txt_len, joint_len):
    ot_scatter = torch.arange(0, joint_len, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, tl in enumerate(txt_lens):
        max_ind = max_txt_len + (joint_len - tl)
        ot_scatter.data[i, tl:] = torch.arange(max_txt_len, max_ind, dtype=torch.long)
    return ot_scatter


def _compute_pad(lens, max_len):
    pad = torch.zeros(len(lens), max_len, dtype=torch.bool)
    for i, n in enumerate(lens):
        pad.data[i, n:].fill_(1)
    return pad


def padded_inputs(input_ids, img_feats, img_pos) -> dict:
    """The inputs every task's padded batch shares, from per-sequence tensors: padded ids,
    positions, features, boxes, attention masks and the gather index."""
    txt_lens = [t.size(0) for t in input_ids]
    num_bbs = [f.size(0) for f in img_feats]
    attn_masks = [
        torch.ones(tl + nbb, dtype=torch.long) for tl, nbb in zip(txt_lens, num_bbs, strict=True)
    ]
    padded_ids = pad_sequence(input_ids, batch_first=True, padding_value=0)
    batch = {
        "input_ids": padded_ids,
        "position_ids": torch.arange(0, padded_ids.size(1), dtype=torch.long).unsqueeze(0),
        "img_feat": pad_tensors(img_feats, num_bbs),
        "img_pos_feat": pad_tensors(img_pos, num_bbs),
        "attn_masks": pad_sequence(attn_masks, batch_first=True, padding_value=0),
    }
    bs, max_tl = padded_ids.size()
    out_size = batch["attn_masks"].size(1)
    batch["gather_index"] = get_gather_index(txt_lens, num_bbs, bs, max_tl, out_size)
    return batch


def collate(examples, task, *, ot=True):
    """The authors' padded batch for `task` from example dicts."""
    input_ids = [torch.as_tensor(np.asarray(ex["input_ids"]), dtype=torch.long) for ex in examples]
    # np.array copies: the reference reads fresh arrays; shard records are read-only.
    img_feats = [torch.from_numpy(np.array(ex["img_feat"], dtype=np.float32)) for ex in examples]
    img_pos = [torch.from_numpy(np.array(ex["img_loc"], dtype=np.float32)) for ex in examples]
    txt_lens = [t.size(0) for t in input_ids]
    num_bbs = [f.size(0) for f in img_feats]
    batch = padded_inputs(input_ids, img_feats, img_pos)
    bs, max_tl = batch["input_ids"].size()
    out_size = batch["attn_masks"].size(1)

    if task == "mlm":
        labels = [
            torch.as_tensor(np.asarray(ex["txt_labels"]), dtype=torch.long) for ex in examples
        ]
        batch["txt_labels"] = pad_sequence(labels, batch_first=True, padding_value=-1)
    elif task in ("mrfr", "mrc", "mrckl"):
        img_masks = [
            torch.as_tensor(np.asarray(ex["img_mask"]), dtype=torch.bool) for ex in examples
        ]
        tgts = [
            torch.cat([torch.zeros(tl, dtype=torch.bool), m])
            for tl, m in zip(txt_lens, img_masks, strict=True)
        ]
        img_masks = pad_sequence(img_masks, batch_first=True, padding_value=0)
        img_feat = batch["img_feat"]
        ext = img_masks.unsqueeze(-1).expand_as(img_feat)
        if task == "mrfr":
            batch["feat_targets"] = img_feat[ext].contiguous().view(-1, img_feat.size(-1))
        else:
            soft = [
                torch.from_numpy(np.array(ex["soft_labels"], dtype=np.float32)) for ex in examples
            ]
            soft = pad_tensors(soft, num_bbs)
            ext_label = img_masks.unsqueeze(-1).expand_as(soft)
            batch["label_targets"] = soft[ext_label].contiguous().view(-1, soft.size(-1))
        batch["img_feat"] = img_feat.data.masked_fill(ext, 0)
        batch["img_masks"] = img_masks
        batch["img_mask_tgt"] = pad_sequence(tgts, batch_first=True, padding_value=0)
    elif task == "itm":
        batch["targets"] = torch.tensor(
            [int(ex["itm_target"]) for ex in examples], dtype=torch.long
        )
        if ot:
            max_nbb = max(num_bbs)
            ot_scatter = _compute_ot_scatter(txt_lens, max_tl, out_size)
            batch["ot_inputs"] = {
                "ot_scatter": ot_scatter,
                "scatter_max": ot_scatter.max().item(),
                "txt_pad": _compute_pad(txt_lens, max_tl),
                "img_pad": _compute_pad(num_bbs, max_nbb),
            }
    else:
        raise ValueError(f"invalid task {task}")
    return batch


def batch_to(batch, device):
    """Move an authors' batch (nested dicts of tensors) to a device."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = batch_to(v, device)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out
