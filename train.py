r"""Pretrain UNITER, or fine-tune it on a downstream task.

    python train.py            # CPU quick start: tiny model on synthetic shards it writes itself
    python train.py --task vqa # a downstream quick start (vqa, ve, nlvr2, retrieval, re, vcr;
                               # pretrain-vcr: VCR's second pretraining stage); summary.json
                               # holds the validation metric and its chance level
    python train.py --config configs/pretrain/tiny-cpu.yaml --output-dir runs/tiny
    python train.py --data 'shards/coco-{000000..000099}.tar' \
        --model-config configs/model/uniter-base.json --init-checkpoint bert-base-cased.pt

Many ranks, one node or several (a hostfile), through the DeepSpeed launcher:

    deepspeed --num_gpus 8 train.py --config configs/pretrain/uniter-base.yaml --output-dir runs/b
    deepspeed --hostfile hosts train.py --config configs/pretrain/uniter-large.yaml --output-dir ...

Flags override the recipe given with --config (a YAML file; the defaults are
`uniter_fast.config.RunConfig`).
Logs, checkpoints and the summary go to --output-dir (default runs/<date-time>). A run pointed at
a folder that already holds checkpoints resumes from the newest complete one (--no-resume refuses).
A resume with other schedule settings than the checkpoint's is refused unless --reschedule:

    python train.py --config runs/tiny/config.yaml --max-steps 800 --reschedule   # train on
"""

from __future__ import annotations

import argparse
import sys

from uniter_fast.config import DatasetConfig, RunConfig
from uniter_fast.errors import report
from uniter_fast.train import RunError, prepare, train


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--task",
        choices=["pretrain", "pretrain-vcr", "vqa", "ve", "nlvr2", "retrieval", "re", "vcr"],
        help="pretrain (default) or a downstream task; without --config a downstream task runs "
        "its CPU quick start, configs/finetune/<task>-tiny-cpu.yaml",
    )
    p.add_argument("--config", help="YAML recipe (see configs/pretrain/, configs/finetune/)")
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
    p.add_argument(
        "--deepspeed-config",
        metavar="PATH",
        help="DeepSpeed JSON, e.g. configs/deepspeed/zero2.json (default: ZeRO-1)",
    )
    p.add_argument(
        "--precision", choices=["auto", "bf16", "fp16", "fp32"], help="overrides the JSON's"
    )
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps")
    p.add_argument("--val-every", type=int, metavar="N", help="validate every N steps")
    p.add_argument("--log-every", type=int, metavar="N", help="log every N steps")
    p.add_argument(
        "--data-mode",
        choices=["exact", "resampled"],
        help="exact: each sample once per epoch, resumable to the batch; resampled: with "
        "replacement",
    )
    p.add_argument("--tokens-per-batch", type=int, metavar="N", help="real tokens per micro-batch")
    p.add_argument("--num-workers", type=int, metavar="N", help="data workers per rank")
    p.add_argument(
        "--attention", choices=["auto", "flash", "varlen", "sdpa", "eager"], help="backend"
    )
    p.add_argument("--kernels", choices=["auto", "reference", "triton"], help="loss kernels")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse an output folder that already holds checkpoints instead of resuming",
    )
    p.add_argument(
        "--reschedule",
        action="store_true",
        help="on a resume with another --max-steps, lr or warm-up than the checkpoint's, rebuild "
        "the schedule from this recipe at the checkpoint's step (without it such a resume is "
        "refused)",
    )
    # The deepspeed launcher passes --local_rank=N (also in the environment, which is what we read)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


# A task's CPU quick start (`python train.py --task vqa`); the second pretraining stage's lives
# with the pretraining recipes.
QUICK_START = "configs/finetune/{task}-tiny-cpu.yaml"
QUICK_STARTS = {"pretrain-vcr": "configs/pretrain/vcr-tiny-cpu.yaml"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.config:
        cfg = RunConfig.from_file(args.config)
    elif args.task not in (None, "pretrain"):
        cfg = RunConfig.from_file(QUICK_STARTS.get(args.task, QUICK_START.format(task=args.task)))
    else:
        cfg = RunConfig()
    if args.task is not None and args.config and cfg.task != args.task:
        raise ValueError(f"--task {args.task} but the recipe {args.config} is for {cfg.task!r}")
    values = cfg.to_dict()
    names = (
        "output_dir",
        "max_steps",
        "model_config",
        "init_checkpoint",
        "device",
        "seed",
        "deepspeed_config",
        "precision",
        "save_every",
        "val_every",
        "log_every",
        "attention",
        "kernels",
    )
    for name in names:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.no_resume:
        values["resume"] = False
    if args.reschedule:
        values["reschedule"] = True
    for flag, key in (
        ("data_mode", "mode"),
        ("tokens_per_batch", "tokens_per_batch"),
        ("num_workers", "num_workers"),
    ):
        if getattr(args, flag) is not None:
            values["data"][key] = getattr(args, flag)
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
    try:
        train(run)
    except (RunError, FloatingPointError) as e:
        # Raised on purpose (bad data past the limit, a diverged loss naming its step and task):
        # the message says it all, on every rank; a bug keeps its traceback.
        report(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
