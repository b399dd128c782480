"""`python -m uniter_fast.env`: the report a user pastes into a bug, in process and as a command."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from uniter_fast import env
from uniter_fast.data.collate import extension_loaded

KEYS = {
    "uniter_fast",
    "python",
    "platform",
    "torch",
    "torch_cuda",
    "cuda_available",
    "cudnn",
    "nccl",
    "gpus",
    "triton",
    "deepspeed",
    "deepspeed_accelerator",
    "flash_attn",
    "flash_attn_import",
    "webdataset",
    "numpy",
    "cpp_extension",
    "device",
    "kernels",
    "attention",
}


def check_report(info: dict, device: str) -> None:
    assert KEYS <= set(info), KEYS - set(info)
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] is torch.cuda.is_available()
    assert info["device"] == device
    assert info["cpp_extension"].startswith("loaded" if extension_loaded() else "not loaded (")
    for key in ("kernels", "attention"):
        assert isinstance(info[key], str) and info[key] and not info[key].startswith("error")
    if device == "cpu":
        assert info["kernels"].startswith("reference PyTorch ops")
        assert info["attention"].startswith("sdpa padded")
    if not torch.cuda.is_available():
        assert info["gpus"] == [] and info["nccl"].startswith("n/a")
    for key in ("numpy", "triton", "deepspeed", "flash_attn", "webdataset"):
        assert info[key] and not info[key].startswith("error"), key


def parse(text: str) -> dict[str, str]:
    rows = (line.split(":", 1) for line in text.splitlines())
    return {name.strip(): value.strip() for name, value in rows}


def test_collect_on_cpu():
    check_report(env.collect("cpu"), "cpu")


def test_text_report_is_aligned(capsys):
    assert env.main(["--device", "cpu", "--kernels", "reference", "--attention", "eager"]) == 0
    text = capsys.readouterr().out
    colons = {line.index(":") for line in text.splitlines()}
    assert len(colons) == 1, text  # one column of names, padded to the longest
    fields = parse(text)
    assert fields["kernels"].startswith("reference PyTorch ops (fused kernels switched off)")
    assert fields["attention"] == "eager reference"
    assert fields["torch"] == torch.__version__


def test_missing_packages_read_not_installed(monkeypatch):
    real = env._version
    monkeypatch.setattr(env, "_version", lambda name: real("no-such-distribution-xyz"))
    info = env.collect("cpu")
    assert info["flash_attn"] == info["flash_attn_import"] == "not installed"
    assert info["deepspeed_accelerator"] == "not installed"
    fields = parse(env.format_report(info))
    assert fields["flash_attn"] == fields["deepspeed"] == "not installed"


def test_a_failing_probe_reports_its_error(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(env, "_extension", broken)
    info = env.collect("cpu", attention="flash")
    assert info["cpp_extension"] == "error: RuntimeError: driver exploded"
    assert info["attention"].startswith("error: ValueError: attention backend 'flash'")
    assert info["kernels"].startswith("reference PyTorch ops")  # the others still report


def test_json_command():
    result = subprocess.run(
        [sys.executable, "-m", "uniter_fast.env", "--json", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    check_report(json.loads(result.stdout), "cpu")
