"""What a bug report needs to know about this machine, in one paste.

    python -m uniter_fast.env                      # aligned `name: value` lines
    python -m uniter_fast.env --device cuda --json # the same as JSON

Versions (python, torch with its CUDA, cuDNN and NCCL, triton, deepspeed, flash-attn, webdataset,
numpy), the GPUs, whether the C++ packer loaded, and which paths the loss kernels and attention
take on the device. Every probe is guarded: one that fails reports its error text in place of a
value. Missing packages read "not installed".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

NOT_INSTALLED = "not installed"
DEVICES = ("auto", "cpu", "cuda")


def _probe(fn: Callable[[], Any]) -> Any:
    """fn(), or "error: <type>: <message>" when it raises."""
    try:
        return fn()
    except Exception as e:  # a report that crashes on the machine being reported is no report
        return f"error: {type(e).__name__}: {e}"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cudnn() -> str:
    version = torch.backends.cudnn.version()
    return "none" if version is None else str(version)


def _nccl() -> str:
    if not torch.cuda.is_available():
        return "n/a (CUDA not available)"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _gpus() -> list[str]:
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
            f"compute capability {props.major}.{props.minor}"
        )
    return gpus


def _deepspeed_accelerator() -> str:
    # deepspeed logs to stdout while it picks an accelerator: keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().device_name()


def _flash_attn_import() -> str:
    from .model.attention import _import_flash

    error = _import_flash()[1]
    return "ok" if error is None else f"error: {error}"


def _extension() -> str:
    from .data.collate import extension_error, extension_loaded

    return "loaded" if extension_loaded() else f"not loaded ({extension_error()})"


def _kernels(kernels: str, device: torch.device) -> str:
    from .config import KERNEL_BACKENDS
    from .ops import describe_kernels

    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_BACKENDS)}, got {kernels!r}")
    return describe_kernels(kernels, device)


def _attention(attention: str, device: torch.device) -> dict[str, str]:
    from .config import UniterConfig
    from .model.attention import resolve_attention

    # As the trainer runs: the recipe's attention dropout, bf16 autocast on CUDA.
    choice = resolve_attention(
        attention,
        device,
        dropout_p=UniterConfig().attention_probs_dropout_prob,
        dtype=torch.bfloat16 if device.type == "cuda" else None,
    )
    out = {"attention": choice.describe()}
    if choice.warning:
        out["attention_warning"] = choice.warning
    return out


def collect(
    device: torch.device | str | None = None, kernels: str = "auto", attention: str = "auto"
) -> dict:
    """The report as a dict of JSON-ready values (strings, bools, a list of GPU lines).

    device: where kernels and attention are resolved; None or "auto" picks CUDA when available.
    kernels: the loss-kernel backend to describe; attention: the attention backend to resolve.
    """
    from . import __version__

    dev = _probe(lambda: _resolve_device(device))
    info: dict[str, Any] = {
        "uniter_fast": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "cuda_available": torch.cuda.is_available(),
        "cudnn": _probe(_cudnn),
        "nccl": _probe(_nccl),
        "gpus": _probe(_gpus) if torch.cuda.is_available() else [],
    }
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    info["triton"] = _version("triton")
    info["deepspeed"] = _version("deepspeed")
    info["deepspeed_accelerator"] = (
        NOT_INSTALLED if info["deepspeed"] == NOT_INSTALLED else _probe(_deepspeed_accelerator)
    )
    info["flash_attn"] = _version("flash-attn")
    info["flash_attn_import"] = (
        NOT_INSTALLED if info["flash_attn"] == NOT_INSTALLED else _probe(_flash_attn_import)
    )
    info["webdataset"] = _version("webdataset")
    info["numpy"] = _version("numpy")
    info["cpp_extension"] = _probe(_extension)
    if isinstance(dev, str):  # the device itself did not parse
        info["device"] = dev
        info["kernels"] = info["attention"] = "error: no device"
        return info
    info["device"] = str(dev)
    info["kernels"] = _probe(lambda: _kernels(kernels, dev))
    attention_info = _probe(lambda: _attention(attention, dev))
    if isinstance(attention_info, str):
        info["attention"] = attention_info
    else:
        info.update(attention_info)
    return info


def format_report(info: dict) -> str:
    """Aligned `name: value` lines; a list is one line per item (`gpus[0]: ...`)."""
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        if isinstance(value, list):
            rows.extend((f"{key}[{i}]", str(item)) for i, item in enumerate(value))
            if not value:
                rows.append((key, "none"))
        elif isinstance(value, bool):
            rows.append((key, "yes" if value else "no"))
        else:
            rows.append((key, str(value)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}: {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    from .config import KERNEL_BACKENDS
    from .model.attention import ATTENTION_BACKENDS

    parser = argparse.ArgumentParser(
        prog="python -m uniter_fast.env", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--kernels", choices=KERNEL_BACKENDS, default="auto")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect(args.device, kernels=args.kernels, attention=args.attention)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
