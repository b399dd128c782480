"""Fault tests: two ranks under the deepspeed launcher (CPU, gloo), killed and resumed.

Each run trains the tiny model for 12 steps in exact data mode, logging every step and saving
every 4. The checks:
- ZeRO-2 and ZeRO-3: a run SIGKILLed from outside at a random point after its first checkpoint
  (launcher and both ranks at once), then started again on the same folder, resumes from its last
  complete checkpoint and logs the same per-step losses as the uninterrupted run;
- a save killed half-way (rank 0 SIGKILLs itself after every file but the marker) leaves the
  previous checkpoint the newest complete one, and the next run resumes from it;
- a checkpoint of two ranks resumes on one (through DeepSpeed's universal layout);
- a NaN in the loss stops every rank with the step and the task named.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("deepspeed")

from uniter_fast.data.synthetic import write_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

RECIPE = {
    "max_steps": 12,
    "log_every": 1,
    "save_every": 4,
    "val_every": 0,
    "keep_checkpoints": 0,
    "data": {"tokens_per_batch": 512, "block_images": 30, "mode": "exact"},
    "optim": {"lr": 1e-3, "warmup_steps": 2},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    write_synthetic(root / "train", 120, seed=3, images_per_shard=30)
    write_synthetic(root / "val", 20, seed=4, images_per_shard=20)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    return {"root": root, "recipe": recipe}


def _command(setup: dict, out: Path, ranks: int, *extra: str) -> list[str]:
    train = [
        "train.py",
        "--config",
        str(setup["recipe"]),
        "--data",
        str(setup["root"] / "train"),
        "--output-dir",
        str(out),
        *extra,
    ]
    if ranks == 1:
        return [sys.executable, *train]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    return [*launcher, "--master_port", str(_port()), *train]


def _env(fault: str | None = None) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop(fault_env := "UNITER_FAST_FAULT", None)
    if fault:
        env[fault_env] = fault
    return env


def _run(setup, out, ranks=2, *extra, fault=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(setup, out, ranks, *extra),
        cwd=REPO,
        env=_env(fault),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _losses(out: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["task"], r["loss"]) for r in rows if "task" in r]


def _complete(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.glob("step-*") if (p / "COMPLETE").is_file())


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def uninterrupted(setup) -> dict:
    """The reference runs: ZeRO-2 and ZeRO-3, 12 steps without a fault."""
    runs = {}
    for stage in (2, 3):
        out = setup["root"] / f"whole-zero{stage}"
        _ok(_run(setup, out, 2, "--deepspeed-config", f"configs/deepspeed/zero{stage}.json"))
        runs[stage] = _losses(out)
        assert [s for s, _, _ in runs[stage]] == list(range(1, 13))
    return runs


def test_zero2_killed_at_a_random_point_resumes_to_the_same_losses(setup, uninterrupted):
    out = setup["root"] / "killed-zero2"
    args = ("--deepspeed-config", "configs/deepspeed/zero2.json")
    proc = subprocess.Popen(
        _command(setup, out, 2, *args),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and both ranks share a process group
    )
    try:
        deadline = time.monotonic() + 240
        while "step-000004" not in _complete(out):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        time.sleep(random.uniform(0.0, 1.5))  # somewhere in steps 5 to ~8, or inside a save
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _complete(out)
    assert done and done[-1] < "step-000012", done
    resumed = _run(setup, out, 2, *args)
    _ok(resumed)
    assert f"resumed from {out / 'checkpoints' / done[-1]}" in resumed.stderr
    assert _losses(out) == uninterrupted[2]


def test_zero3_save_killed_half_way_leaves_the_previous_checkpoint(setup, uninterrupted):
    out = setup["root"] / "killed-in-save-zero3"
    args = ("--deepspeed-config", "configs/deepspeed/zero3.json")
    killed = _run(setup, out, 2, *args, fault="kill-in-save@8")
    assert killed.returncode != 0
    assert _complete(out) == ["step-000004"]
    leftover = out / "checkpoints" / ".step-000008.tmp"
    assert (leftover / "state.json").is_file() and not (leftover / "COMPLETE").exists()
    # The previous checkpoint is whole: its fp32 weights consolidate from the ZeRO-3 partitions.
    from uniter_fast.train.engine import fp32_state_dict

    assert "cls.predictions.decoder.weight" in fp32_state_dict(out / "checkpoints" / "step-000004")
    resumed = _run(setup, out, 2, *args)
    _ok(resumed)
    assert "removed" in resumed.stderr and "left by a save that did not finish" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000004 at step 4" in resumed.stderr
    assert not leftover.exists()
    assert _losses(out) == uninterrupted[3]


def test_two_rank_checkpoint_resumes_on_one_rank(setup, uninterrupted):
    src = setup["root"] / "whole-zero2"
    out = setup["root"] / "one-rank"
    shutil.copytree(src, out)
    for name in ("step-000012", "step-000008"):  # resume from step 4
        shutil.rmtree(out / "checkpoints" / name)
    proc = _run(setup, out, 1, "--deepspeed-config", "configs/deepspeed/zero2.json")
    _ok(proc)
    assert "converting it to DeepSpeed's universal layout" in proc.stderr
    assert "cannot be carried to 1 ranks" in proc.stderr  # the data position is not exact
    losses = _losses(out)
    assert [s for s, _, _ in losses] == list(range(1, 13))
    assert losses[:4] == uninterrupted[2][:4]
    # The model and optimizer came back: losses continue from where training was, not from
    # initialisation (step 1's MLM loss of a fresh model is about 10.5 on this vocabulary).
    first_mlm = next(loss for _, task, loss in uninterrupted[2] if task == "mlm")
    resumed_mlm = [loss for step, task, loss in losses if task == "mlm" and step > 4]
    assert resumed_mlm and max(resumed_mlm) < first_mlm - 0.5


def test_nan_loss_stops_every_rank_naming_step_and_task(setup):
    out = setup["root"] / "nan"
    proc = _run(setup, out, 2, "--deepspeed-config", "configs/deepspeed/zero2.json", fault="nan@3")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "step 3, task " in text and "the loss is not finite" in text, text[-3000:]
    assert "step-000004" not in _complete(out)  # nothing was saved after the NaN


@pytest.mark.parametrize("ranks, bad_rank", [(2, 0), (3, 1)])
def test_bad_data_on_one_rank_stops_every_rank_in_one_line(tmp_path, ranks, bad_rank):
    """One rank's shards hold the bad samples: it stops on the limit, and the other ranks,
    waiting for it in a collective, stop with its message instead of a transport error (with
    three ranks the failing one is not the store's host, rank 0)."""
    from test_shards import make_record, raw_sample, write_tar

    data = tmp_path / "data"
    data.mkdir()
    for shard in range(2 * ranks):  # shard i goes to rank i mod ranks (exact mode, no workers)
        members = {}
        for i in range(10):
            key = f"s{shard}_{i}"
            raw = raw_sample(make_record(key, n=10 + i, seed=10 * shard + i, num_captions=2))
            if i == 3 and shard % ranks == bad_rank:
                raw["feat.npy"] = b"junk"
            members.update({f"{key}.{m}": v for m, v in raw.items() if m != "__key__"})
        write_tar(data / f"mixed-{shard:06d}.tar", members)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {bad_check_min_samples: 10, block_images: 20, mode: exact}\n")
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    proc = subprocess.run(
        [*launcher, "--master_port", str(_port()), "train.py", "--config", str(recipe)]
        + ["--max-steps", "3", "--tokens-per-batch", "600", "--data", str(data)]
        + ["--output-dir", str(tmp_path / "out")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "Connection closed" not in text, text[-4000:]
    errors = sorted(line for line in text.splitlines() if line.startswith("train.py: error:"))
    assert len(errors) == ranks, errors
    for rank, line in enumerate(errors):
        assert line.startswith(f"train.py: error: [rank {rank}] "), errors
        if rank != bad_rank:
            assert f"the run stopped on rank {bad_rank}: " in line, line
        assert "samples read were bad" in line, line
