"""UNITER and its pretraining model over packed batches.

`UniterForPretraining(config)(batch, task)` computes one task's loss on a `Batch` from
`uniter_fast.data.collate`. The step reads indices the collator prepared (`mlm_index`,
`mrm_index`, `cu_seqlens`, ...) and never asks the host how many rows a mask selects, so nothing
in it waits for the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import KERNEL_BACKENDS, UniterConfig
from ..data.schema import IMG_DIM, IMG_LABEL_DIM, MRM_TASKS, Batch, check_task
from ..data.static import IGNORE_INDEX
from .attention import AttentionChoice, AttentionLayout
from .embeddings import ImageEmbeddings, TextEmbeddings
from .encoder import Encoder, Pooler
from .heads import MLMHead, RegionClassification, RegionFeatureRegression

# Batch fields each task reads beyond the inputs every task shares.
_TASK_FIELDS = {
    "mlm": ("mlm_index", "mlm_labels"),
    "mrfr": ("mrm_index", "mrfr_target"),
    "mrc": ("mrm_index", "mrc_label"),
    "mrckl": ("mrm_index", "mrc_soft_target", "mrc_label"),
    "itm": ("itm_target",),
}


class UniterModel(nn.Module):
    """Embeddings, encoder and pooler. `forward(batch)` -> packed hidden states (N, hidden).

    attention, varlen_dropout: the attention backend request (`uniter_fast.model.attention`),
    resolved for the device the model is on; `set_attention` resolves again, and
    `attention_choice` says what runs.
    """

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        *,
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.img_embeddings = ImageEmbeddings(config, img_dim)
        self.encoder = Encoder(config, attention=attention, varlen_dropout=varlen_dropout)
        self.pooler = Pooler(config)

    @property
    def attention_choice(self) -> AttentionChoice | None:
        """The backend attention runs on; None while the request cannot run where the model is."""
        return self.encoder.attention_choice

    def set_attention(
        self,
        requested: str | None = None,
        device: torch.device | str | None = None,
        varlen_dropout: str | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> AttentionChoice:
        """Resolve the attention backend for `device` (see `Encoder.set_attention`)."""
        return self.encoder.set_attention(requested, device, varlen_dropout, dtype=dtype)

    def embed(self, batch: Batch, *, mask_regions: bool) -> torch.Tensor:
        """Text and region embeddings placed at their packed rows: (N, hidden)."""
        txt = self.embeddings(batch.input_ids, batch.txt_pos, batch.txt_type_ids)
        types = self.embeddings.token_type_embeddings
        # Regions are token type 1, or per region (NLVR2: 1 left image, 2 right image).
        img_type = types.weight[1] if batch.img_type_ids is None else types(batch.img_type_ids)
        img = self.img_embeddings(
            batch.img_feat,
            batch.img_loc,
            img_type,
            batch.img_masked if mask_regions else None,
        )
        # A static batch's padded tokens and regions land past its packed rows, and are dropped.
        rows = batch.padding.embed_rows if batch.padding else batch.num_tokens
        hidden = txt.new_zeros(rows, txt.shape[1])
        hidden.index_copy_(0, batch.txt_dest, txt)
        hidden.index_copy_(0, batch.img_dest, img.to(txt.dtype))
        return hidden[: batch.num_rows] if batch.padding else hidden

    def forward(self, batch: Batch, *, mask_regions: bool = False) -> torch.Tensor:
        hidden = self.embed(batch, mask_regions=mask_regions)
        return self.encoder(hidden, AttentionLayout.from_batch(batch, hidden.shape[0]))


class UniterWithHeads(nn.Module):
    """What every UNITER model with heads shares (pretraining and the downstream tasks): the
    reference's weight init, and the attention backend of its `self.uniter`."""

    config: UniterConfig
    uniter: UniterModel

    @property
    def attention_choice(self) -> AttentionChoice | None:
        """The backend attention runs on; None while the request cannot run where the model is."""
        return self.uniter.attention_choice

    def set_attention(
        self,
        requested: str | None = None,
        device: torch.device | str | None = None,
        varlen_dropout: str | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> AttentionChoice:
        """Resolve the attention backend now, for `device` (None: where the parameters are).

        requested / varlen_dropout: None keeps the current request; dtype: the dtype attention
        runs in (the autocast dtype), None when not known. Returns the choice for the log;
        raises ValueError where the request cannot run.
        """
        return self.uniter.set_attention(requested, device, varlen_dropout, dtype=dtype)

    def _init_weights(self, module: nn.Module) -> None:
        # The reference's scheme: N(0, initializer_range) for linear and embedding weights, zero
        # biases, unit LayerNorm.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()


class UniterForPretraining(UniterWithHeads):
    """UNITER with the MLM, MRFR, MRC, MRC-kl and ITM(+WRA) heads of the reference.

    config: the architecture; img_dim: region feature width; img_label_dim: detector classes
    (background included). wra_weight: weight of the WRA loss on ITM batches (the reference's
    `itm_ot_lambda`; 0 switches WRA off); wra_beta, wra_iterations: IPOT settings.
    kernels: the `backend` of the loss ops: "auto" (fused Triton kernels on CUDA where they are
    the default, the PyTorch references elsewhere), "reference" (fused paths off) or "triton".
    attention: the attention backend, one of `ATTENTION_BACKENDS` ("auto": flash-attn, else torch
    varlen on CUDA, else padded SDPA); varlen_dropout: "keep" or "drop", what torch varlen does
    about the recipe's attention dropout in training. Resolved for the device the model is on, at
    construction and again when `.to()` moves it; after moving the model the trainer calls
    `set_attention(...)` with the autocast dtype and logs `attention_choice.describe()`.
    """

    def __init__(
        self,
        config: UniterConfig,
        img_dim: int = IMG_DIM,
        img_label_dim: int = IMG_LABEL_DIM,
        *,
        wra_weight: float = 0.1,
        wra_beta: float = 0.5,
        wra_iterations: int = 50,
        kernels: str = "auto",
        attention: str = "auto",
        varlen_dropout: str = "keep",
    ):
        super().__init__()
        if wra_weight < 0:
            raise ValueError(f"wra_weight must be non-negative, got {wra_weight}")
        if kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels must be one of {KERNEL_BACKENDS}, got {kernels!r}")
        self.kernels = kernels
        self.config = config
        self.img_dim = img_dim
        self.img_label_dim = img_label_dim
        self.wra_weight = wra_weight
        self.wra_beta = wra_beta
        self.wra_iterations = wra_iterations
        self.uniter = UniterModel(
            config, img_dim, attention=attention, varlen_dropout=varlen_dropout
        )
        self.cls = MLMHead(config, self.uniter.embeddings.word_embeddings.weight)
        self.feat_regress = RegionFeatureRegression(
            config, img_dim, self.uniter.img_embeddings.img_linear.weight
        )
        self.region_classifier = RegionClassification(config, img_label_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.uniter.img_embeddings.mask_embedding.weight[0].zero_()

    def forward(self, batch: Batch, task: str, *, metrics: bool = False) -> dict:
        """One task's loss on a packed batch.

        Returns a dict with "loss" (what is optimised) and its named parts: `mlm`, `mrfr`, `mrc`
        or `mrckl`; for ITM `itm`, and with WRA on also `wra`, `wra_pos`, `wra_neg`
        (`loss = itm + wra_weight * wra`). With `metrics=True` it adds accuracies as tensors
        (`mlm_acc`, `mrc_acc`, `itm_acc`) and the number of targets they average over as ints
        (`mlm_count`, `mrc_count`, `itm_count`).
        """
        check_task(task)
        missing = [f for f in _TASK_FIELDS[task] if getattr(batch, f) is None]
        if missing:
            raise ValueError(
                f"batch collated for task {batch.task!r} lacks {missing} needed by task {task!r}"
            )
        hidden = self.uniter(batch, mask_regions=task in MRM_TASKS)
        if task == "mlm":
            return self._mlm(hidden, batch, metrics)
        if task == "mrfr":
            return self._mrfr(hidden, batch)
        if task in ("mrc", "mrckl"):
            return self._mrc(hidden, batch, task, metrics)
        return self._itm(hidden, batch, metrics)

    # Static batches (`uniter_fast.data.static`) carry padded targets: MLM labels and ITM
    # targets -100, which cross-entropy ignores, and masked regions flagged in `mrm_valid`,
    # whose losses are divided by the real count on the device.

    def _mlm(self, hidden: torch.Tensor, batch: Batch, metrics: bool) -> dict:
        head = self.cls.predictions
        x = head.transform(ops.gather_rows(hidden, batch.mlm_index))
        loss = ops.mlm_loss(
            x, head.decoder.weight, head.bias, batch.mlm_labels, backend=self.kernels
        )
        out = {"loss": loss, "mlm": loss}
        if metrics:
            logits = head.decoder(x) + head.bias
            valid = batch.mlm_labels != IGNORE_INDEX if batch.padding else None
            out["mlm_acc"] = _accuracy(logits, batch.mlm_labels, valid)
            out["mlm_count"] = (
                batch.padding.mlm_targets if batch.padding else int(batch.mlm_labels.shape[0])
            )
        return out

    def _mrfr(self, hidden: torch.Tensor, batch: Batch) -> dict:
        x = self.feat_regress.net(ops.gather_rows(hidden, batch.mrm_index))
        args = (x, self.feat_regress.weight, self.feat_regress.bias, batch.mrfr_target)
        if batch.mrm_valid is not None:
            loss = ops.mrfr_loss_padded(*args, batch.mrm_valid)
        else:
            loss = ops.mrfr_loss(*args, backend=self.kernels)
        return {"loss": loss, "mrfr": loss}

    def _mrc(self, hidden: torch.Tensor, batch: Batch, task: str, metrics: bool) -> dict:
        logits = self.region_classifier(ops.gather_rows(hidden, batch.mrm_index))
        if task == "mrc":
            loss = ops.mrc_loss(logits, batch.mrc_label, backend=self.kernels)
        else:
            loss = ops.mrckl_loss(logits, batch.mrc_soft_target, backend=self.kernels)
        valid = batch.mrm_valid
        if valid is not None:
            # Padded rows add 0 (label 0 is ignored; a zero target has no divergence): the
            # mean over all rows times rows / real rows is the mean over the real rows.
            loss = loss * (valid.shape[0] / valid.sum().to(loss.dtype))
        out = {"loss": loss, task: loss}
        if metrics:
            out["mrc_acc"] = _accuracy(logits, batch.mrc_label, valid)
            out["mrc_count"] = (
                batch.padding.mrm_targets if batch.padding else int(batch.mrc_label.shape[0])
            )
        return out

    def _itm(self, hidden: torch.Tensor, batch: Batch, metrics: bool) -> dict:
        cu_seqlens = batch.pair_cu_seqlens
        pooled = self.uniter.pooler(hidden, cu_seqlens[:-1].long())
        scores = self.itm_output(pooled)
        itm = ops.itm_loss(scores, batch.itm_target)
        out = {"loss": itm, "itm": itm}
        if self.wra_weight > 0:
            distance = ops.wra_distance_packed(
                hidden,
                cu_seqlens,
                batch.txt_len,
                batch.img_len,
                batch.max_txt_len,
                batch.max_img_len,
                beta=self.wra_beta,
                iterations=self.wra_iterations,
                backend=self.kernels,
            )
            out.update(ops.wra_loss(distance, batch.itm_target))
            out["loss"] = itm + self.wra_weight * out["wra"]
        if metrics:
            valid = batch.itm_target != IGNORE_INDEX if batch.padding else None
            out["itm_acc"] = _accuracy(scores, batch.itm_target, valid)
            out["itm_count"] = batch.num_pairs
        return out


def _accuracy(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Share of rows whose argmax is the target; only the `valid` rows when given."""
    right = (logits.detach().argmax(dim=-1) == target).float()
    if valid is None:
        return right.mean()
    return (right * valid).sum() / valid.sum()


class UniterForVcrPretraining(UniterForPretraining):
    """The second pretraining stage on VCR (`pretrain_vcr.py`): `UniterForPretraining` with the
    word embedding grown by `num_special_tokens` object tags (the tied MLM decoder and its bias
    grow with it) and 4 token types. Loading a first-stage checkpoint grows it as
    `grow_vcr_state` says; the reference instead rebuilds the whole MLM head at random when it
    re-ties it, which throws away the pretrained transform: here the transform is kept and the
    bias extended with zeros (UNITER_FINETUNE.md section 6; decided, documented)."""

    def __init__(self, config: UniterConfig, *args, num_special_tokens: int = 81, **kwargs):
        from .downstream import vcr_config

        self.num_special_tokens = num_special_tokens
        super().__init__(vcr_config(config, num_special_tokens), *args, **kwargs)

    def adapt_reference_state(self, state: dict) -> list[str]:
        from .downstream import grow_vcr_state

        return grow_vcr_state(self, state)
