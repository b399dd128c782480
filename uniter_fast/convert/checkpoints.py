"""Checkpoint layouts: load the reference's, BERT's and our own; export the reference's.

Every source is first brought to the reference layout (the key names of UNITER_FACTS, with
separate `query`/`key`/`value` matrices and both tied keys), which is also what `export_reference`
writes. Each reference key then maps to one of this model's parameters, or to a row block of the
fused `attention.self.qkv` matrix, so loading copies tensors in place and never builds a second
copy of the model.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# (canonical key, key that reads the same tensor): the reference ties these parameters.
TIED_KEYS = (
    ("uniter.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
    ("uniter.img_embeddings.img_linear.weight", "feat_regress.weight"),
)
_QKV = re.compile(r"^(.*\.attention\.self)\.qkv\.(weight|bias)$")
_SPLIT = re.compile(r"^(.*\.attention\.self)\.(query|key|value)\.(weight|bias)$")
_PART = {"query": 0, "key": 1, "value": 2}
_CONTAINER_KEYS = ("model", "state_dict", "module", "model_state_dict")


@dataclass
class LoadReport:
    """What `load_pretrained` did. Keys are named in the reference layout.

    layout: "reference", "bert" or "uniter-fast" (this project's own, fused QKV).
    loaded: keys copied into the model. missing: keys the model has and the source lacks (they
    keep their current values). unexpected: keys the source has and the model does not use.
    renamed: (source key, reference key) for every key whose name changed on the way in.
    tied_conflicts: tied key pairs whose two tensors differ in the source (the reference loads the
    later one in module order, and so does this loader). adapted: what the model's
    `adapt_reference_state` hook changed (e.g. NLVR2's token types grown from 2 rows to 3).
    """

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    tied_conflicts: list[tuple[str, str]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"load_pretrained: {self.source} ({self.layout} layout): {len(self.loaded)} loaded, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.renamed)} renamed"
        ]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {k}" for k in keys)
        if self.renamed:
            lines.append(f"  renamed ({len(self.renamed)}):")
            shown = self.renamed[:20]
            lines.extend(f"    {a} -> {b}" for a, b in shown)
            if len(self.renamed) > len(shown):
                lines.append(f"    ... and {len(self.renamed) - len(shown)} more")
        lines.extend(f"  adapted: {note}" for note in self.adapted)
        for a, b in self.tied_conflicts:
            lines.append(f"  tied keys differ in the source: {a} vs {b} (took {b})")
        return "\n".join(lines)


def _targets(model: nn.Module) -> OrderedDict[str, tuple[torch.Tensor, slice | None]]:
    """Reference key -> (model tensor, row slice of it or None), in the reference's key order."""
    state = model.state_dict(keep_vars=True)
    out: OrderedDict[str, tuple[torch.Tensor, slice | None]] = OrderedDict()
    for key, tensor in state.items():
        m = _QKV.match(key)
        if m is None:
            out[key] = (tensor, None)
            continue
        prefix, kind = m.groups()
        if kind == "bias" and f"{prefix}.qkv.weight" in state:
            continue  # emitted with the weight, in the reference's order below
        rows = tensor.shape[0] // 3
        bias = state.get(f"{prefix}.qkv.bias") if kind == "weight" else None
        for part, i in _PART.items():
            block = slice(i * rows, (i + 1) * rows)
            out[f"{prefix}.{part}.{kind}"] = (tensor, block)
            if bias is not None:  # query.weight, query.bias, key.weight, ...
                out[f"{prefix}.{part}.bias"] = (bias, block)
    return out


def export_reference(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's weights as a plain fp32 state dict in the reference layout, tied keys present.

    `torch.save` of the result is a checkpoint the authors' code loads with `strict=True`.
    """
    return OrderedDict(
        (key, (t if s is None else t[s]).detach().to("cpu", torch.float32).clone())
        for key, (t, s) in _targets(model).items()
    )


def save_reference(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `export_reference(model)` to `path` atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(export_reference(model), tmp)
    os.replace(tmp, path)
    return path


def _read(source) -> tuple[dict, str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for unsafe or corrupt files
            raise ValueError(f"{path}: cannot be loaded as a weights-only checkpoint ({e})") from e
        name = str(path)
    elif isinstance(source, dict):
        obj, name = source, "<state dict>"
    else:
        raise TypeError(
            f"load_pretrained: source must be a path or a state dict, got {type(source).__name__}"
        )
    # Training checkpoints wrap the weights ({"model": ...}, DeepSpeed's {"module": ...}).
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise ValueError(
                f"{name}: not a state dict: key {bad!r} holds a {type(obj[bad]).__name__}, and "
                f"none of {list(_CONTAINER_KEYS)} holds the weights"
            )
        obj = inner
    return obj, name


def to_reference_layout(state_dict: dict) -> tuple[OrderedDict, str, list[tuple[str, str]]]:
    """Rename any supported layout to the reference's. Returns (state dict, layout, renames)."""
    keys = list(state_dict)
    stripped = [k[len("module.") :] if k.startswith("module.") else k for k in keys]
    if any(_QKV.match(k) for k in stripped):
        layout = "uniter-fast"
    elif any(k.startswith("bert.") for k in stripped):
        layout = "bert"
    else:
        layout = "reference"
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    renamed: list[tuple[str, str]] = []
    for key, new in zip(keys, stripped, strict=True):
        tensor = state_dict[key]
        if new.startswith("bert."):
            new = "uniter." + new[len("bert.") :]
        if "LayerNorm" in new or "layer_norm" in new:
            new = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", new))
        m = _QKV.match(new)
        if m is not None:
            prefix, kind = m.groups()
            for part, chunk in zip(_PART, tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}.{part}.{kind}"] = chunk
                renamed.append((key, f"{prefix}.{part}.{kind}"))
            continue
        if new != key:
            renamed.append((key, new))
        out[new] = tensor
    # Newer BERT dumps carry the vocab bias twice; keep it under the reference's name.
    if "cls.predictions.decoder.bias" in out and "cls.predictions.bias" not in out:
        out["cls.predictions.bias"] = out.pop("cls.predictions.decoder.bias")
        renamed.append(("cls.predictions.decoder.bias", "cls.predictions.bias"))
    return out, layout, renamed


def load_pretrained(model: nn.Module, source, *, verbose: bool = True) -> LoadReport:
    """Load weights from a path or a state dict in the reference, BERT or this project's layout.

    Files load with `torch.load(weights_only=True)`: no pickle code runs. Tied weights come from
    whichever of their keys the source has. A shape mismatch raises ValueError naming the key and
    both shapes, before anything is copied. Returns the report (and prints it if `verbose`).
    """
    raw, name = _read(source)
    ref, layout, renamed = to_reference_layout(raw)
    targets = _targets(model)
    report = LoadReport(source=name, layout=layout, renamed=renamed)
    # A model whose layout grows what a checkpoint holds (NLVR2's third token type) adapts the
    # reference-layout dict in place and says how.
    adapt = getattr(model, "adapt_reference_state", None)
    if adapt is not None:
        report.adapted = list(adapt(ref))

    for canonical, alias in TIED_KEYS:
        if canonical in targets and alias in targets:
            if canonical in ref and alias not in ref:
                ref[alias] = ref[canonical]
            elif alias in ref and canonical not in ref:
                ref[canonical] = ref[alias]
            elif canonical in ref and alias in ref and not torch.equal(ref[canonical], ref[alias]):
                report.tied_conflicts.append((canonical, alias))

    for key, tensor in ref.items():
        if key not in targets:
            continue
        target, rows = targets[key]
        want = tuple(target[rows].shape if rows is not None else target.shape)
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{name}: shape mismatch for {key}: checkpoint has {tuple(tensor.shape)}, "
                f"model expects {want}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: {key} has dtype {tensor.dtype}, expected a float tensor")

    with torch.no_grad():
        for key, (target, rows) in targets.items():  # module order: the later tied key wins
            if key not in ref:
                report.missing.append(key)
                continue
            dest = target if rows is None else target[rows]
            dest.copy_(ref[key])
            report.loaded.append(key)
    report.unexpected = [k for k in ref if k not in targets]
    if verbose:
        print(report)
    log.info("%s", report)
    return report
