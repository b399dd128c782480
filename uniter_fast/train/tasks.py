"""Tasks as plug-ins of the one training loop (`trainer.py`): `TASKS[name]`.

A plug-in says what differs between pretraining and a downstream task, and nothing else: which
model to build, which data to write or read, how the engine is called on a batch, how the model
is validated and which figure heads the summary. The loop itself (engine, checkpoints, resume,
logs, metrics, non-finite checks, summary) is the trainer's, shared by all.

- `PretrainTask` ("pretrain"): UniterForPretraining, the pretraining shards and task mix.
- `FinetuneTask` ("vqa", "ve", "nlvr2"): the downstream models of `uniter_fast.model.downstream`
  on task shards (`uniter_fast.data.task_shards`; synthetic ones written by the run when
  `data.train` is empty), validated with the task's metric (VQA soft accuracy, VE and NLVR2
  accuracy) against its chance level.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.pipeline import BadSamples
from ..data.shards import list_shards
from ..model import (
    UniterForNlvr2,
    UniterForPretraining,
    UniterForVisualEntailment,
    UniterForVqa,
)

FINETUNE_TASKS = ("vqa", "ve", "nlvr2")
TASK_NAMES = ("pretrain", *FINETUNE_TASKS)
# What the summary's headline figure is called, per downstream task.
METRIC = {"vqa": "vqa_soft_accuracy", "ve": "accuracy", "nlvr2": "accuracy"}


class PretrainTask:
    name = "pretrain"

    def build_model(self, cfg, model_config) -> nn.Module:
        return UniterForPretraining(
            model_config,
            wra_weight=cfg.wra_weight,
            kernels=cfg.kernels,
            attention=cfg.attention,
            varlen_dropout=cfg.varlen_dropout,
        )

    def forward(self, engine, batch, task: str) -> dict:
        return engine(batch, task)


class FinetuneTask:
    """One downstream task (module docstring). `cfg.finetune` holds its settings."""

    def __init__(self, name: str):
        if name not in FINETUNE_TASKS:
            raise ValueError(f"unknown downstream task {name!r}")
        self.name = name

    def num_classes(self, cfg) -> int | None:
        if self.name == "vqa":
            return cfg.finetune.num_answers
        return 3 if self.name == "ve" else None

    def collate_task(self, cfg) -> str:
        if self.name == "nlvr2" and cfg.finetune.nlvr2_variant == "triplet":
            return "nlvr2-triplet"
        return self.name

    def build_model(self, cfg, model_config) -> nn.Module:
        common = dict(attention=cfg.attention, varlen_dropout=cfg.varlen_dropout)
        if self.name == "vqa":
            return UniterForVqa(model_config, num_answers=cfg.finetune.num_answers, **common)
        if self.name == "ve":
            return UniterForVisualEntailment(model_config, **common)
        return UniterForNlvr2(model_config, variant=cfg.finetune.nlvr2_variant, **common)

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that train at lr x `finetune.head_lr_mul` (the VQA head, as the reference)."""
        heads = getattr(model, "head_parameters", None)
        return list(heads()) if heads is not None else []

    def forward(self, engine, batch, task: str) -> dict:
        out = engine(batch)
        return {k: v for k, v in out.items() if k != "scores"}

    def chance(self) -> float:
        from ..data.synthetic_tasks import CHANCE

        return CHANCE[self.name]

    def write_synthetic(self, data_dir: Path, cfg) -> None:
        from ..data.synthetic_tasks import write_task_data

        data = cfg.data
        write_task_data(data_dir / "train", self.name, data.synthetic_images, seed=cfg.seed)
        if data.synthetic_val_images:
            write_task_data(
                data_dir / "val", self.name, data.synthetic_val_images, seed=cfg.seed + 1
            )

    def loader(self, urls, cfg, *, rank: int, world: int, pin_memory: bool, state: dict | None):
        """`data.mode` "exact": every example once per epoch, the split held in memory;
        "resampled": streamed from the shards through a shuffle buffer (large splits)."""
        from ..tasks.finetune import FinetuneLoader, StreamingFinetuneLoader

        kind = StreamingFinetuneLoader if cfg.data.mode == "resampled" else FinetuneLoader
        return kind(
            urls,
            self.name,
            collate_task=self.collate_task(cfg),
            tokens_per_batch=cfg.data.tokens_per_batch,
            seed=cfg.seed,
            num_classes=self.num_classes(cfg),
            max_txt_len=cfg.finetune.max_txt_len,
            rank=rank,
            world_size=world,
            pin_memory=pin_memory,
            state=state,
        )

    def validation_examples(self, urls, cfg) -> tuple[list[dict], BadSamples]:
        from ..tasks.finetune import read_examples

        bad = BadSamples()
        examples = read_examples(
            list_shards(urls),
            self.name,
            num_classes=self.num_classes(cfg),
            max_txt_len=None,
            bad=bad,
        )
        return examples, bad

    @torch.no_grad()
    def evaluate(self, engine, examples, cfg, *, device, rank, world, all_reduce) -> dict:
        from ..tasks.finetune import evaluate_finetune

        module = engine.module
        was_training = module.training
        engine.eval()
        result = evaluate_finetune(
            engine,
            examples,
            collate_task=self.collate_task(cfg),
            tokens_per_batch=cfg.data.tokens_per_batch,
            device=device,
            rank=rank,
            world=world,
            all_reduce=all_reduce,
        )
        engine.train(was_training)
        return {"loss": result["loss"], METRIC[self.name]: result["score"], "n": result["n"]}


TASKS = {"pretrain": PretrainTask(), **{name: FinetuneTask(name) for name in FINETUNE_TASKS}}


def get_task(name: str):
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}"
        ) from None


__all__ = [
    "FINETUNE_TASKS",
    "METRIC",
    "TASKS",
    "TASK_NAMES",
    "FinetuneTask",
    "PretrainTask",
    "get_task",
]
