"""Loading what the inspector reads: the model (a run folder or a weights file) and a vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..config import RunConfig, UniterConfig
from ..convert import load_pretrained
from ..data.schema import BERT_BASE_CASED
from ..data.task_shards import VCR_VOCAB_SIZE
from ..model import UniterForPretraining, UniterForVcrPretraining

RUN_WEIGHTS = "model_reference.pt"
RUN_RECIPE = "config.yaml"
# VCR's object tags (`uniter_fast.convert.vcr`): word ids TAG_BASE + p for the person of rank p.
TAG_BASE = BERT_BASE_CASED.size
# Key prefixes whose absence from a checkpoint makes a picture meaningless (random weights).
_ENCODER_PREFIX = "uniter."
_ITM_PREFIX = "itm_output."


class InspectError(ValueError):
    """Bad input to the inspector (a file, a key, an option); the message names it."""


def load_model(
    checkpoint: str | os.PathLike,
    *,
    model_config: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    need_pretraining: bool = True,
) -> tuple[nn.Module, list[str]]:
    """Build the model of `checkpoint` and load its weights, in eval mode on `device`.

    checkpoint: a run folder of `train.py` (holding `model_reference.pt` and `config.yaml`; the
        model is built the way the trainer builds it, by the run's task) or a weights file, which
        needs `model_config` (a `UniterForPretraining` is then built).
    model_config: a model JSON; for a run folder it overrides the recipe's `model_config`.
    need_pretraining: refuse models that are not `UniterForPretraining` (WRA and ITM need its
        heads and IPOT settings); attention maps only need `model.uniter`.

    Returns (model, notes): notes are warnings for the user (e.g. an ITM head the checkpoint
    lacks). Raises InspectError / FileNotFoundError naming the file at fault.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    hint = ""  # appended to a shape mismatch
    if path.is_dir():
        weights, recipe = path / RUN_WEIGHTS, path / RUN_RECIPE
        for needed in (weights, recipe):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"{path} is not a train.py run folder: {needed.name} is missing (a weights "
                    f"file needs --model-config instead)"
                )
        try:
            cfg = RunConfig.from_file(recipe)
        except ValueError as e:
            raise InspectError(f"{recipe}: {e}") from None
        config = _model_config(model_config or cfg.model_config, recipe)
        from ..train.tasks import get_task  # the trainer's builders (imports deepspeed lazily)

        model = get_task(cfg.task).build_model(cfg, config)
    else:
        if model_config is None:
            raise InspectError(
                f"{path} is a weights file: pass --model-config (the model JSON it was trained "
                f"with), or give the run folder that holds {RUN_WEIGHTS} and {RUN_RECIPE}"
            )
        weights = path
        model = UniterForPretraining(_model_config(model_config, None))
        # A second-stage (VCR) checkpoint has 81 more words and 4 token types: only its run
        # folder says to build a UniterForVcrPretraining.
        hint = " (a pretrain-vcr checkpoint: give its run folder, which holds config.yaml)"
    if need_pretraining and not isinstance(model, UniterForPretraining):
        raise InspectError(
            f"{checkpoint}: word-region alignment needs a pretraining model (UniterForPretraining: "
            f"its ITM head and IPOT settings); this checkpoint builds a {type(model).__name__}"
        )
    if not hasattr(model, "uniter"):
        raise InspectError(f"{checkpoint}: {type(model).__name__} has no UNITER encoder")
    try:
        report = load_pretrained(model, weights, verbose=False)
    except ValueError as e:
        raise InspectError(f"{e}{hint if 'shape mismatch' in str(e) else ''}") from None
    missing_encoder = [k for k in report.missing if k.startswith(_ENCODER_PREFIX)]
    if missing_encoder:
        shown = ", ".join(missing_encoder[:5])
        more = f" and {len(missing_encoder) - 5} more" if len(missing_encoder) > 5 else ""
        raise InspectError(
            f"{weights}: the checkpoint lacks encoder weights ({shown}{more}); a picture of a "
            f"randomly initialised encoder would mean nothing"
        )
    notes = []
    if need_pretraining and any(k.startswith(_ITM_PREFIX) for k in report.missing):
        notes.append(
            f"{weights} has no ITM head (itm_output.*): P(match) is not reported (the WRA plan is)"
        )
        model.itm_output = None
    elif need_pretraining and isinstance(model, UniterForVcrPretraining):
        notes.append(
            "the VCR pretraining stage trains neither ITM nor WRA (its tasks: MLM, MRFR, "
            "MRC-kl): P(match) comes from an ITM head carried over from the first stage (or left "
            "at random), never trained on VCR's sequences"
        )
    device = torch.device(device)
    model.to(device).eval()
    # Whatever the recipe asked for (e.g. flash on a GPU), pick what runs here; eval forwards
    # in fp32 take sdpa on any device.
    model.set_attention("auto", device)
    return model, notes


def _model_config(path: str | os.PathLike, recipe: Path | None) -> UniterConfig:
    where = f" (named by {recipe})" if recipe is not None else ""
    try:
        return UniterConfig.from_json(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model config{where}: {e}; pass --model-config") from None
    except ValueError as e:
        raise InspectError(f"model config {path}{where}: {e}") from None


def load_vocab(path: str | os.PathLike) -> list[str]:
    """A WordPiece vocabulary: one token per line, line i is id i (BERT's vocab.txt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary not found: {path}")
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InspectError(f"{path}: not a UTF-8 vocabulary file ({e})") from None
    if not tokens:
        raise InspectError(f"{path}: empty vocabulary")
    return tokens


_SPECIAL = {
    BERT_BASE_CASED.pad_id: "[PAD]",
    BERT_BASE_CASED.unk_id: "[UNK]",
    BERT_BASE_CASED.cls_id: "[CLS]",
    BERT_BASE_CASED.sep_id: "[SEP]",
    BERT_BASE_CASED.mask_id: "[MASK]",
}


def token_names(ids, vocab: list[str] | None) -> list[str]:
    """Readable WordPiece tokens for `ids`: the vocabulary's, else `#<id>` (special tokens by
    name: bert-base-cased's [CLS], [SEP], ...). VCR's object tags, ids TAG_BASE + p past BERT's
    words, show as `<person p>` (p: the person's rank among the image's persons, the tag rule of
    `uniter_fast.convert.vcr`), with or without a vocabulary."""
    names = []
    for i in ids:
        i = int(i)
        if TAG_BASE <= i < VCR_VOCAB_SIZE:
            names.append(tag_name(i))
        elif vocab is not None and 0 <= i < len(vocab):
            names.append(vocab[i])
        else:
            names.append(_SPECIAL.get(i, f"#{i}"))
    return names


def tag_name(token_id: int) -> str:
    """`<person p>` for the object tag id TAG_BASE + p."""
    return f"<person {int(token_id) - TAG_BASE}>"


def caption_text(tokens: list[str]) -> str:
    """Tokens joined into text, WordPiece continuations (`##x`) glued to the piece before."""
    text = ""
    for tok in tokens:
        if tok.startswith("##") and text:
            text += tok[2:]
        else:
            text += (" " if text else "") + tok
    return text
