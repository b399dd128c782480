"""Pretrain UNITER.

    python train.py            # CPU quick start: tiny model on synthetic shards it writes itself
    python train.py --config configs/pretrain/tiny-cpu.yaml --output-dir runs/tiny
    python train.py --data 'shards/coco-{000000..000099}.tar' \
        --model-config configs/model/uniter-base.json --init-checkpoint bert-base-cased.pt

Flags override the recipe given with --config (a YAML file; the defaults are
`uniter_fast.config.RunConfig`).
Logs, checkpoints and the summary go to --output-dir (default runs/<date-time>).
"""

from __future__ import annotations

import argparse
import sys

from uniter_fast.config import DatasetConfig, RunConfig
from uniter_fast.train import RunError, prepare, train


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML recipe (see configs/pretrain/)")
    p.add_argument("--output-dir", help="run folder for logs, checkpoints and the summary")
    p.add_argument("--max-steps", type=int, help="optimizer steps to run")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATTERN",
        help="training shard patterns (one dataset, the reference's COCO task mix)",
    )
    p.add_argument(
        "--val-data", nargs="+", metavar="PATTERN", help="held-out shard patterns for validation"
    )
    p.add_argument(
        "--model-config", help="model JSON (reference keys), e.g. configs/model/uniter-base.json"
    )
    p.add_argument(
        "--init-checkpoint", help="weights to start from: reference, BERT or uniter-fast layout"
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help="random seed")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig.from_file(args.config) if args.config else RunConfig()
    values = cfg.to_dict()
    for name in ("output_dir", "max_steps", "model_config", "init_checkpoint", "device", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.data:
        values["data"]["train"] = [DatasetConfig("data", list(args.data)).__dict__]
    if args.val_data:
        values["data"]["val"] = list(args.val_data)
    return RunConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = prepare(config_from_args(args))
    except (RunError, FileNotFoundError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    train(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
