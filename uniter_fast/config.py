"""Configuration: the model (the reference's JSON keys) and the run (a YAML or JSON recipe).

Both are typed dataclasses validated on construction; an unknown key or a bad value raises
ValueError naming it. `RunConfig()` with no arguments is the CPU quick start: the tiny model on
synthetic shards that the run writes itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Keys that BERT and HuggingFace config files carry and that do not change UNITER's architecture.
# They are accepted (and logged) so that a `bert-base-cased/config.json` loads as it is.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "gradient_checkpointing",
        "position_embedding_type",
        "use_cache",
        "classifier_dropout",
        "torch_dtype",
        "directionality",
        "pooler_fc_size",
        "pooler_num_attention_heads",
        "pooler_num_fc_layers",
        "pooler_size_per_head",
        "pooler_type",
        "output_past",
    }
)


@dataclass(frozen=True)
class UniterConfig:
    """UNITER's architecture, with the reference's JSON keys as field names.

    vocab_size: WordPiece vocabulary size (bert-base-cased: 28996).
    hidden_size: width of every encoder layer.
    num_hidden_layers: number of post-LayerNorm transformer layers.
    num_attention_heads: attention heads per layer; must divide `hidden_size`.
    intermediate_size: width of the feed-forward layer.
    hidden_act: activation of the feed-forward layer and the heads; only "gelu" (erf form).
    hidden_dropout_prob: dropout after embeddings, attention output and feed-forward output.
    attention_probs_dropout_prob: dropout on the attention probabilities.
    max_position_embeddings: longest text (in tokens, [CLS] and [SEP] included).
    type_vocab_size: token types; text uses 0 and regions use 1, so at least 2.
    initializer_range: standard deviation of the normal initialisation.
    layer_norm_eps: epsilon of every LayerNorm (the reference hard-codes 1e-12).
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UniterConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"UniterConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act != "gelu":
            raise ValueError(
                f"UniterConfig.hidden_act must be 'gelu' (the erf form UNITER uses), "
                f"got {self.hidden_act!r}"
            )
        if self.type_vocab_size < 2:
            raise ValueError(
                f"UniterConfig.type_vocab_size must be at least 2 (text is type 0, regions "
                f"type 1), got {self.type_vocab_size}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"UniterConfig.{name} must be in [0, 1), got {value!r}")
        if self.initializer_range <= 0 or self.layer_norm_eps <= 0:
            raise ValueError("UniterConfig.initializer_range and layer_norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> UniterConfig:
        """Build from a dict with the reference's keys; unknown keys raise, BERT extras are logged.

        The reference's own constructor argument `vocab_size_or_config_json_file` is accepted as
        a synonym of `vocab_size` when it holds an integer.
        """
        values = dict(values)
        legacy = values.pop("vocab_size_or_config_json_file", None)
        if isinstance(legacy, int) and "vocab_size" not in values:
            values["vocab_size"] = legacy
        if "layer_norm_eps" not in values:
            values["layer_norm_eps"] = 1e-12
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in values if k in _IGNORED_KEYS)
        unknown = sorted(k for k in values if k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown model config keys {unknown}")
        if ignored:
            log.info("%s: ignoring keys that do not change the architecture: %s", source, ignored)
        return cls(**{k: v for k, v in values.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> UniterConfig:
        """Read a JSON config (the reference's files load as they are)."""
        path = resolve_config_path(path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Find a config file: as given (relative to the working directory), else in the repository.

    This lets `--model-config configs/model/uniter-base.json` work from any directory once the
    project is installed in editable mode. A missing file raises FileNotFoundError naming both
    places that were tried.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if not given.is_absolute():
        in_repo = REPO_ROOT / given
        if in_repo.is_file():
            return in_repo
        raise FileNotFoundError(f"config file not found: {given} (also tried {in_repo})")
    raise FileNotFoundError(f"config file not found: {given}")


# --- the run recipe ---------------------------------------------------------------------------

# The reference's COCO task mix (itm : mlm : mrfr : mrckl = 6 : 8 : 4 : 4).
DEFAULT_MIX = {"itm": 6.0, "mlm": 8.0, "mrfr": 4.0, "mrckl": 4.0}


@dataclass
class DatasetConfig:
    """One training source. name: label used in logs; shards: patterns (brace, glob, directory,
    `pipe:`); mix: task -> ratio, drawn per micro-batch in proportion to the ratios of all
    datasets' tasks together (the reference's MetaLoader)."""

    name: str
    shards: list[str]
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MIX))

    def __post_init__(self) -> None:
        from .data.schema import TASKS

        if not self.name:
            raise ValueError("data.train[].name must be non-empty")
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if not self.shards:
            raise ValueError(f"data.train[{self.name}].shards is empty")
        for task, ratio in self.mix.items():
            if task not in TASKS:
                raise ValueError(f"data.train[{self.name}].mix: unknown task {task!r}")
            if not ratio > 0:
                raise ValueError(
                    f"data.train[{self.name}].mix.{task} must be positive, got {ratio}"
                )


@dataclass
class DataConfig:
    """train: the sources (empty: synthetic shards written into the output folder);
    val: shard patterns held out for validation (empty with synthetic data: a synthetic split);
    tokens_per_batch: real tokens (text + regions) per micro-batch, padding never counted;
    mode: "resampled" (shards drawn with replacement, endless; the default) or "exact" (every
        sample once per epoch, the position saved in checkpoints so a resumed run repeats the
        uninterrupted one's batches);
    block_images: images per shuffle block, per dataset and loader worker (about 0.4 MB each at
        base size); pairs are shuffled and bucketed by length within a block, and ITM negatives
        are drawn from it;
    length_buckets: sort each block by length before cutting batches (the reference's token
        buckets): less padding for a padded attention backend, but the captions of one image
        (nearly equal lengths, all in one block) then tend to share a batch;
    num_workers: DataLoader worker processes per rank building batches (0: the training process);
    max_bad_fraction: the run stops when more than this fraction of the samples read were bad
        (bad samples are always skipped, counted by reason and shard, and logged);
    bad_check_min_samples: the limit is applied only once a rank has read this many samples,
        so that one early bad sample in a healthy corpus does not stop a run (the summary says
        when the fraction was over the limit on fewer samples, so never checked);
    synthetic_images / synthetic_val_images: sizes of the synthetic splits."""

    train: list[DatasetConfig] = dataclasses.field(default_factory=list)
    val: list[str] = dataclasses.field(default_factory=list)
    tokens_per_batch: int = 2048
    mode: str = "resampled"
    block_images: int = 500
    length_buckets: bool = False
    num_workers: int = 0
    max_bad_fraction: float = 0.01
    bad_check_min_samples: int = 1000
    synthetic_images: int = 600
    synthetic_val_images: int = 120

    def __post_init__(self) -> None:
        self.train = [
            d
            if isinstance(d, DatasetConfig)
            else _build(DatasetConfig, d, f"data.train[{_label(d, i)}]")
            for i, d in enumerate(self.train)
        ]
        if isinstance(self.val, str):
            self.val = [self.val]
        for name in ("tokens_per_batch", "block_images", "synthetic_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        if self.mode not in ("resampled", "exact"):
            raise ValueError(f"data.mode must be 'resampled' or 'exact', got {self.mode!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(
                f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}"
            )
        if self.bad_check_min_samples < 0:
            raise ValueError(
                f"data.bad_check_min_samples must be >= 0, got {self.bad_check_min_samples}"
            )
        if self.synthetic_val_images < 0:
            raise ValueError("data.synthetic_val_images must be non-negative")


@dataclass
class OptimConfig:
    """AdamW with the reference's settings; linear warm-up then linear decay to zero.

    grad_accum: micro-batches per optimizer step; their gradients are summed, not averaged, as
    in the reference (which also sums over GPUs), so the clip threshold means the same thing.
    """

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 10000
    grad_clip: float = 5.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_accum < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.grad_accum >= 1")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("optim.weight_decay must be >= 0 and optim.eps > 0")


@dataclass
class FinetuneConfig:
    """Settings of the downstream tasks (`task` other than "pretrain").

    num_answers: VQA's answer vocabulary (the reference's 3129); nlvr2_variant: "paired-attn"
    (the reference's configs), "paired" or "triplet"; head_lr_mul: the head's lr multiplier (the
    reference's VQA `lr_mul`: 10); max_txt_len: training texts longer than this many tokens
    ([CLS]/[SEP] not counted) are dropped, as the reference drops them (evaluation keeps all).

    Retrieval: margin of the hinge (0.2); hard_negatives: the reference's hard-negative training
    (else plain: `negatives` random images and captions per positive, the reference's 1); per
    micro-batch, `hard_positives` captions each scored against their image and `negative_size`
    random images, and as many images against `negative_size` captions, without gradients, the
    `hard_neg_size` best-scoring negatives of each kept for training (the reference's 1, 399,
    31); eval_chunk_texts: texts per chunk of the full evaluation (its unit of resumption).
    RE: re_mlp, the head's layers (1 or 2); re_loss, "cls" (the reference's default) or "rank".
    """

    num_answers: int = 3129
    nlvr2_variant: str = "paired-attn"
    head_lr_mul: float = 1.0
    max_txt_len: int = 60
    margin: float = 0.2
    hard_negatives: bool = False
    negatives: int = 1
    hard_positives: int = 1
    negative_size: int = 399
    hard_neg_size: int = 31
    eval_chunk_texts: int = 64
    re_mlp: int = 1
    re_loss: str = "cls"

    def __post_init__(self) -> None:
        if self.num_answers < 1:
            raise ValueError(f"finetune.num_answers must be at least 1, got {self.num_answers}")
        if self.nlvr2_variant not in ("paired-attn", "paired", "triplet"):
            raise ValueError(
                "finetune.nlvr2_variant must be paired-attn, paired or triplet, got "
                f"{self.nlvr2_variant!r}"
            )
        if self.head_lr_mul <= 0:
            raise ValueError(f"finetune.head_lr_mul must be positive, got {self.head_lr_mul}")
        if self.max_txt_len < 1:
            raise ValueError(f"finetune.max_txt_len must be at least 1, got {self.max_txt_len}")
        for name in ("negatives", "hard_positives", "negative_size", "hard_neg_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"finetune.{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_chunk_texts < 1:
            raise ValueError(
                f"finetune.eval_chunk_texts must be at least 1, got {self.eval_chunk_texts}"
            )
        if self.hard_neg_size > self.negative_size:
            raise ValueError(
                f"finetune.hard_neg_size ({self.hard_neg_size}) cannot exceed negative_size "
                f"({self.negative_size}): the hard negatives are chosen among them"
            )
        if not self.margin > 0:
            raise ValueError(f"finetune.margin must be positive, got {self.margin}")
        if self.re_mlp not in (1, 2):
            raise ValueError(f"finetune.re_mlp must be 1 or 2, got {self.re_mlp}")
        if self.re_loss not in ("cls", "rank"):
            raise ValueError(f"finetune.re_loss must be cls or rank, got {self.re_loss!r}")


# uniter_fast.train.tasks
RUN_TASKS = ("pretrain", "pretrain-vcr", "vqa", "ve", "nlvr2", "retrieval", "re", "vcr")
KERNEL_BACKENDS = ("auto", "reference", "triton")
# The names of uniter_fast.model.attention.ATTENTION_BACKENDS (kept here: config imports no torch)
ATTENTION_BACKENDS = ("auto", "flash", "varlen", "sdpa", "eager")


@dataclass
class RunConfig:
    """A training run. The defaults are the CPU quick start (tiny model, synthetic data).

    model_config: JSON path (reference keys); output_dir: run folder (default: runs/<time>);
    max_steps: optimizer steps; device: "auto" (CUDA when present), "cpu", "cuda", "cuda:N";
    deepspeed_config: DeepSpeed JSON (ZeRO stage, buckets, precision; see configs/deepspeed/);
    None: ZeRO-1 over the ranks there are (one, without a launcher);
    precision: "auto" (the DeepSpeed JSON's choice; when it names none, bf16 on CUDA and fp32 on
    the CPU), "bf16", "fp16" (dynamic loss scaling) or "fp32" (these override the JSON);
    wra_weight: the reference's itm_ot_lambda; log_every / save_every / val_every: in optimizer
    steps (0 = only at the end); keep_checkpoints: complete checkpoints kept (0: all);
    resume: a run whose output folder holds checkpoints resumes from the newest complete one
    (False: such a folder is refused); reschedule: a resume whose schedule settings (max_steps,
    optim.lr, optim.warmup_steps) or AdamW settings (betas, eps, weight_decay) differ from the
    checkpoint's is refused unless this is set, which rebuilds the schedule from this recipe at
    the checkpoint's step (logged); init_checkpoint: weights to start from (any layout);
    attention: "auto" (flash-attn's varlen kernel when installed on CUDA, else PyTorch's varlen
    attention on CUDA, else SDPA on a padded view), "flash", "varlen", "sdpa" or "eager";
    varlen_dropout: PyTorch's varlen attention has no attention dropout: "keep" (the recipe's
    dropout is kept: training forwards take SDPA, evaluation takes varlen) or "drop" (varlen in
    training too, without attention dropout: a change from the recipe, logged as one);
    kernels: "auto" (the fused Triton kernels on CUDA where they are the measured default per op,
    the PyTorch reference ops elsewhere), "reference" (the fused paths off), or "triton" (forced;
    on the CPU only under TRITON_INTERPRET=1, for debugging). task: "pretrain" or a downstream
    task ("vqa", "ve", "nlvr2"; `uniter_fast.train.tasks`), whose settings are in `finetune`.

    The defaults of `optim` here are the quick start's (lr 1e-3, 40 warm-up steps); an `optim`
    section in a recipe starts from `OptimConfig`'s, which are the reference's (lr 5e-5, 10k).
    """

    task: str = "pretrain"
    model_config: str = "configs/model/uniter-tiny.json"
    output_dir: str | None = None
    max_steps: int = 400
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    wra_weight: float = 0.1
    log_every: int = 10
    save_every: int = 0
    val_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = True
    reschedule: bool = False
    init_checkpoint: str | None = None
    deepspeed_config: str | None = None
    kernels: str = "auto"
    attention: str = "auto"
    varlen_dropout: str = "keep"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=40)
    )
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        if self.task not in RUN_TASKS:
            raise ValueError(f"task must be one of {', '.join(RUN_TASKS)}, got {self.task!r}")
        if not isinstance(self.finetune, FinetuneConfig):
            self.finetune = _build(FinetuneConfig, self.finetune, "finetune")
        if not isinstance(self.data, DataConfig):  # _build refuses what is not a mapping
            self.data = _build(DataConfig, self.data, "data")
        if not isinstance(self.optim, OptimConfig):
            self.optim = _build(OptimConfig, self.optim, "optim")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("log_every", "save_every", "val_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.log_every == 0:
            self.log_every = self.max_steps
        if self.wra_weight < 0:
            raise ValueError(f"wra_weight must be non-negative, got {self.wra_weight}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )
        if self.varlen_dropout not in ("keep", "drop"):
            raise ValueError(f"varlen_dropout must be keep or drop, got {self.varlen_dropout!r}")
        if self.kernels not in KERNEL_BACKENDS:
            raise ValueError(
                f"kernels must be one of {', '.join(KERNEL_BACKENDS)}, got {self.kernels!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        return _build(cls, values, "")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> RunConfig:
        """Read a YAML (or JSON) recipe."""
        import yaml

        path = resolve_config_path(path)
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _label(values: Any, index: int) -> Any:
    """How errors name a list item of a recipe: its `name` when it has one, else its index."""
    return values.get("name", index) if isinstance(values, dict) else index


def _build(cls, values: Any, where: str):
    """Construct a config dataclass from a mapping (a recipe's section).

    Unknown keys raise ValueError naming them; every value is checked against its field's type
    (`_typed`), so that a bad one is refused here, naming the key, rather than failing later in
    an unrelated comparison.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    prefix = f"{where}." if where else ""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(prefix + k for k in unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(v, hints[k], prefix + k) for k, v in values.items()})


def _number(value: Any) -> float | None:
    """A recipe's number: an int or float, or a numeric string (PyYAML reads `1e-3`, which has
    no dot, as a string); None for anything else. Booleans, NaN and infinities are not numbers
    here (no recipe field means one)."""
    if isinstance(value, bool):
        return None
    number = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    return number if number is not None and math.isfinite(number) else None


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` as the field type `hint` wants it, or ValueError naming the key, value and type.

    Numbers may come as numeric strings (`lr: 1e-3`, `max_steps: "20"`); an integer field takes
    a whole number in any of those forms (`max_steps: 2.0e5`). Nested config sections are
    checked by their own `_build`.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(value, hint, key)
    if dataclasses.is_dataclass(hint):
        return value  # a section: its own _build checks it

    def refuse(expected: str):
        return ValueError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")

    if hint is bool:
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if hint is int:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if number is None:
            number = _number(value)
            if number is None or not number.is_integer():
                raise refuse("an integer")
        return int(number)
    if hint is float:
        number = _number(value)
        if number is None:
            raise refuse("a number")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise refuse("a string")
        return value
    if origin is tuple:  # betas: a fixed number of numbers
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise refuse(f"a list of {len(args)} numbers")
        return tuple(
            _typed(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is list:
        (item,) = args
        if item is str and isinstance(value, str):
            return value  # one pattern for a list of patterns
        if not isinstance(value, (list, tuple)):
            raise refuse("a list")
        return [_typed(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise refuse("a mapping")
        _, item = args
        return {k: _typed(v, item, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: no type check for the annotation {hint!r}")  # a new field type
