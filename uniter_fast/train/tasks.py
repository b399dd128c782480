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
- `RetrievalTask` ("retrieval"): `UniterForRetrieval` on pretraining-layout shards, plain or
  hard-negative training (`uniter_fast.tasks.retrieval`), validated by the full evaluation
  (every text against every image): recall@1, the mean of image and text retrieval's.
- `VcrTask` ("vcr"): `UniterForVcr` on "vcr" task shards (4 token types, 81 object tags),
  Q->A and QA->R candidates, validated with Q->A, QA->R and Q->AR (`uniter_fast.tasks.vcr`).
- `VcrPretrainTask` ("pretrain-vcr"): the second pretraining stage, `UniterForVcrPretraining`
  with MLM, MRFR and MRC-kl on [CLS] q [SEP] a [SEP] r [SEP] (mix 2:1:1 unless the dataset's
  `mix` says otherwise), validated with each task's loss and the MLM accuracy.
- `ReTask` ("re"): `UniterForReferringExpressions` on "re" task shards, trained on the
  ground-truth boxes, validated on both the ground-truth and the detected boxes (IoU accuracy,
  `uniter_fast.tasks.refexp`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.pipeline import BadSamples
from ..data.shards import list_shards
from ..model import (
    UniterForNlvr2,
    UniterForPretraining,
    UniterForReferringExpressions,
    UniterForRetrieval,
    UniterForVcr,
    UniterForVcrPretraining,
    UniterForVisualEntailment,
    UniterForVqa,
)

FINETUNE_TASKS = ("vqa", "ve", "nlvr2", "retrieval", "re", "vcr")
TASK_NAMES = ("pretrain", "pretrain-vcr", *FINETUNE_TASKS)
VCR_MIX = {"mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0}  # the base recipe's (large: 10:1:1)
# What the summary's headline figure is called, per downstream task.
METRIC = {
    "vqa": "vqa_soft_accuracy",
    "ve": "accuracy",
    "nlvr2": "accuracy",
    "retrieval": "recall_at_1",
    "re": "accuracy",
    "vcr": "q2ar",
    "pretrain-vcr": "mlm_acc",
}


@contextlib.contextmanager
def _eval_mode(engine):
    """The engine's model in eval mode for the block, then back to the mode it was in."""
    was_training = engine.module.training
    engine.eval()
    try:
        yield
    finally:
        engine.train(was_training)


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

    def chance(self, cfg) -> float:
        """The metric's chance level on the synthetic validation split."""
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

        with _eval_mode(engine):
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
        return {"loss": result["loss"], METRIC[self.name]: result["score"], "n": result["n"]}


class RetrievalTask(FinetuneTask):
    """Image-text retrieval (module docstring; `cfg.finetune` holds margin and the
    hard-negative sizes)."""

    def __init__(self):
        super().__init__("retrieval")

    def num_classes(self, cfg) -> None:
        return None

    def build_model(self, cfg, model_config) -> nn.Module:
        return UniterForRetrieval(
            model_config,
            margin=cfg.finetune.margin,
            attention=cfg.attention,
            varlen_dropout=cfg.varlen_dropout,
        )

    def forward(self, engine, batch, task: str) -> dict:
        from ..tasks.retrieval import HardNegativeWork, mine_and_train

        if isinstance(batch, HardNegativeWork):
            return mine_and_train(engine, batch)
        return super().forward(engine, batch, task)

    def chance(self, cfg) -> float:
        """Recall@1 of a random ranking: 1 / images of the validation split."""
        return 1.0 / max(cfg.data.synthetic_val_images, 1)

    def loader(self, urls, cfg, *, rank: int, world: int, pin_memory: bool, state: dict | None):
        from ..tasks.retrieval import HardNegativeLoader, RetrievalLoader

        if cfg.data.mode != "exact":
            raise ValueError(
                "retrieval holds its split in memory (negatives are drawn from all of it): "
                f"data.mode must be exact, got {cfg.data.mode!r}"
            )
        ft = cfg.finetune
        common = dict(
            tokens_per_batch=cfg.data.tokens_per_batch,
            seed=cfg.seed,
            max_txt_len=ft.max_txt_len,
            rank=rank,
            world_size=world,
            pin_memory=pin_memory,
            state=state,
        )
        if ft.hard_negatives:
            return HardNegativeLoader(
                urls,
                negative_size=ft.negative_size,
                hard_neg_size=ft.hard_neg_size,
                positives=ft.hard_positives,
                **common,
            )
        return RetrievalLoader(urls, negatives=ft.negatives, **common)

    def validation_examples(self, urls, cfg):
        from ..tasks.retrieval import read_retrieval_split

        bad = BadSamples()
        return read_retrieval_split(list_shards(urls), bad=bad), bad

    @torch.no_grad()
    def evaluate(self, engine, split, cfg, *, device, rank, world, all_reduce) -> dict:
        from ..tasks.retrieval import recall_at_k, score_matrix

        with _eval_mode(engine):
            scores = score_matrix(
                engine,
                split,
                chunk_texts=cfg.finetune.eval_chunk_texts,
                tokens_per_batch=cfg.data.tokens_per_batch,
                device=device,
                rank=rank,
                world=world,
                all_reduce=all_reduce,
                progress=False,
            )
        recall = recall_at_k(scores, split.txt2img, split.img2txts)
        headline = (recall["img_r1"] + recall["txt_r1"]) / 2
        return {METRIC["retrieval"]: headline, **recall, "n": split.num_texts}


class ReTask(FinetuneTask):
    """Referring expressions (module docstring; `cfg.finetune.re_mlp` and `re_loss`)."""

    def __init__(self):
        super().__init__("re")

    def num_classes(self, cfg) -> None:
        return None

    def build_model(self, cfg, model_config) -> nn.Module:
        return UniterForReferringExpressions(
            model_config,
            mlp=cfg.finetune.re_mlp,
            loss=cfg.finetune.re_loss,
            margin=cfg.finetune.margin,
            attention=cfg.attention,
            varlen_dropout=cfg.varlen_dropout,
        )

    def validation_examples(self, urls, cfg):
        from ..data.task_shards import iter_task_shard
        from ..tasks.refexp import re_examples

        bad = BadSamples()
        examples: dict[str, list] = {"gt": [], "det": []}
        for url in list_shards(urls):
            for record in iter_task_shard(url, "re", on_bad=bad.add_bad):
                bad.add_good(record.shard)
                for features in examples:
                    examples[features] += re_examples(record, features=features)[0]
        return examples, bad

    @torch.no_grad()
    def evaluate(self, engine, examples, cfg, *, device, rank, world, all_reduce) -> dict:
        from ..tasks.refexp import evaluate_re

        with _eval_mode(engine):
            out = {}
            for features, name in (("gt", "accuracy"), ("det", "accuracy_detected")):
                result = evaluate_re(
                    engine,
                    examples[features],
                    tokens_per_batch=cfg.data.tokens_per_batch,
                    device=device,
                    rank=rank,
                    world=world,
                    all_reduce=all_reduce,
                )
                out[name] = result["accuracy"]
                if features == "gt":
                    out["loss"], out["n"] = result["loss"], result["n"]
        return out


class VcrTask(FinetuneTask):
    """VCR fine-tuning (module docstring)."""

    def __init__(self):
        super().__init__("vcr")

    def num_classes(self, cfg) -> None:
        return None

    def build_model(self, cfg, model_config) -> nn.Module:
        return UniterForVcr(
            model_config, attention=cfg.attention, varlen_dropout=cfg.varlen_dropout
        )

    def loader(self, urls, cfg, *, rank: int, world: int, pin_memory: bool, state: dict | None):
        from ..tasks.vcr import VcrLoader

        if cfg.data.mode != "exact":
            raise ValueError(
                f"vcr holds its split in memory: data.mode must be exact, got {cfg.data.mode!r}"
            )
        return VcrLoader(
            urls,
            tokens_per_batch=cfg.data.tokens_per_batch,
            seed=cfg.seed,
            max_txt_len=cfg.finetune.max_txt_len,
            rank=rank,
            world_size=world,
            pin_memory=pin_memory,
            state=state,
        )

    def validation_examples(self, urls, cfg):
        from ..tasks.vcr import read_questions

        bad = BadSamples()
        return read_questions(list_shards(urls), mode="val", max_txt_len=None, bad=bad), bad

    @torch.no_grad()
    def evaluate(self, engine, questions, cfg, *, device, rank, world, all_reduce) -> dict:
        from ..tasks.vcr import evaluate_vcr

        with _eval_mode(engine):
            result = evaluate_vcr(
                engine,
                questions,
                tokens_per_batch=cfg.data.tokens_per_batch,
                device=device,
                rank=rank,
                world=world,
                all_reduce=all_reduce,
            )
        return {k: result[k] for k in ("q2ar", "q2a", "qa2r", "loss", "n")}


class VcrPretrainTask(FinetuneTask):
    """The second pretraining stage on VCR (module docstring)."""

    def __init__(self):
        self.name = "pretrain-vcr"

    def num_classes(self, cfg) -> None:
        return None

    def build_model(self, cfg, model_config) -> nn.Module:
        return UniterForVcrPretraining(
            model_config,
            wra_weight=cfg.wra_weight,
            kernels=cfg.kernels,
            attention=cfg.attention,
            varlen_dropout=cfg.varlen_dropout,
        )

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def forward(self, engine, batch, task: str) -> dict:
        return engine(batch, task)

    def chance(self, cfg) -> None:
        return None

    def write_synthetic(self, data_dir: Path, cfg) -> None:
        from ..data.synthetic_tasks import write_task_data

        data = cfg.data
        write_task_data(data_dir / "train", "vcr", data.synthetic_images, seed=cfg.seed)
        if data.synthetic_val_images:
            write_task_data(data_dir / "val", "vcr", data.synthetic_val_images, seed=cfg.seed + 1)

    def mix(self, cfg) -> dict[str, float]:
        if not cfg.data.train:
            return dict(VCR_MIX)
        mix: dict[str, float] = {}
        for source in cfg.data.train:
            for task, ratio in source.mix.items():
                mix[task] = mix.get(task, 0.0) + ratio
        return mix

    def loader(self, urls, cfg, *, rank: int, world: int, pin_memory: bool, state: dict | None):
        from ..tasks.vcr import VcrPretrainLoader

        return VcrPretrainLoader(
            urls,
            tokens_per_batch=cfg.data.tokens_per_batch,
            seed=cfg.seed,
            mix=self.mix(cfg),
            rank=rank,
            world_size=world,
            pin_memory=pin_memory,
            state=state,
        )

    def validation_examples(self, urls, cfg):
        from ..tasks.vcr import VcrPretrainLoader

        loader = VcrPretrainLoader(
            list_shards(urls), tokens_per_batch=cfg.data.tokens_per_batch, seed=0, mix=VCR_MIX
        )
        return loader, loader.bad

    @torch.no_grad()
    def evaluate(self, engine, loader, cfg, *, device, rank, world, all_reduce) -> dict:
        """Each task's loss (and the MLM accuracy) over one deterministic pass of the validation
        questions, masked with a fixed seed; the ranks take every world-th batch."""
        from ..data.collate import collate
        from ..tasks.vcr import VCR_PRETRAIN_TASKS, mask_for

        with _eval_mode(engine):
            batches = loader._batches()
            out: dict[str, float] = {}
            for t, task in enumerate(VCR_PRETRAIN_TASKS):
                totals = torch.zeros(3, dtype=torch.float64, device=device)
                for k in range(rank, len(batches), world):
                    rng = np.random.default_rng([t, k])
                    examples = [mask_for(task, loader.items[i], rng) for i in batches[k]]
                    res = engine(collate(examples, task=task).to(device), task, metrics=True)
                    acc = res.get("mlm_acc", torch.zeros((), device=device))
                    totals += torch.stack(
                        [torch.ones((), device=device), res[task].double(), acc.double()]
                    ).to(torch.float64)
                n, loss, acc = all_reduce(totals).tolist()
                out[f"{task}_loss"] = loss / max(n, 1)
                if task == "mlm":
                    out["mlm_acc"] = acc / max(n, 1)
        out["n"] = len(loader.items)
        return out


TASKS = {
    "pretrain": PretrainTask(),
    "pretrain-vcr": VcrPretrainTask(),
    "vcr": VcrTask(),
    **{name: FinetuneTask(name) for name in ("vqa", "ve", "nlvr2")},
    "retrieval": RetrievalTask(),
    "re": ReTask(),
}


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
    "ReTask",
    "VcrPretrainTask",
    "VcrTask",
    "RetrievalTask",
    "get_task",
]
