"""The authors' UNITER pretraining model, re-implemented faithfully for comparison.

Padded batches, a gather from `cat([text, regions])` through `gather_index`, an additive -10000
attention mask, boolean-mask selection of targets, the WRA scatter into a padded copy and the
unfused IPOT loop: the reference's computation step for step, in the reference's parameter
layout (its `state_dict()` keys are the released checkpoints' keys). It is deliberately written
apart from `uniter_fast.model` and shares no code with it, so that the tests comparing the two
mean something, and the throughput benchmark times the authors' approach rather than ours.
Not used for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(*new_x_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        scores = scores + attention_mask
        probs = self.dropout(nn.Softmax(dim=-1)(scores))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.size()[:-2], self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, config, in_size=None):
        super().__init__()
        self.dense = nn.Linear(in_size or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, input_tensor, attention_mask):
        return self.output(self.self(input_tensor, attention_mask), input_tensor)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states):
        return gelu(self.dense(hidden_states))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, in_size=config.intermediate_size)

    def forward(self, hidden_states, attention_mask):
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class UniterEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask):
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states, attention_mask)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class UniterTextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class UniterImageEmbeddings(nn.Module):
    def __init__(self, config, img_dim):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_feat, type_embeddings, img_masks=None):
        if img_masks is not None:
            self.mask_embedding.weight.data[0, :].fill_(0)
            img_feat = img_feat + self.mask_embedding(img_masks.long())
        transformed_im = self.img_layer_norm(self.img_linear(img_feat))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        embeddings = transformed_im + transformed_pos + type_embeddings
        return self.dropout(self.LayerNorm(embeddings))


class UniterModel(nn.Module):
    def __init__(self, config, img_dim):
        super().__init__()
        self.config = config
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config, img_dim)
        self.encoder = UniterEncoder(config)
        self.pooler = BertPooler(config)

    def forward(
        self,
        input_ids,
        position_ids,
        img_feat,
        img_pos_feat,
        attention_mask,
        gather_index,
        img_masks=None,
        img_type_ids=None,
        txt_type_ids=None,
    ):
        extended = attention_mask.unsqueeze(1).unsqueeze(2)
        extended = extended.to(dtype=next(self.parameters()).dtype)
        extended = (1.0 - extended) * -10000.0
        txt_emb = self.embeddings(input_ids, position_ids, txt_type_ids)
        if img_type_ids is None:
            img_type_ids = torch.ones_like(img_feat[:, :, 0].long())
        img_type_embeddings = self.embeddings.token_type_embeddings(img_type_ids)
        img_emb = self.img_embeddings(img_feat, img_pos_feat, img_type_embeddings, img_masks)
        gather_index = gather_index.unsqueeze(-1).expand(-1, -1, self.config.hidden_size)
        embedding_output = torch.gather(
            torch.cat([txt_emb, img_emb], dim=1), dim=1, index=gather_index
        )
        return self.encoder(embedding_output, extended)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)

    def forward(self, hidden_states):
        return self.LayerNorm(gelu(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config, embedding_weights):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(embedding_weights.size(1), embedding_weights.size(0), bias=False)
        self.decoder.weight = embedding_weights
        self.bias = nn.Parameter(torch.zeros(embedding_weights.size(0)))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states)) + self.bias


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config, embedding_weights):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, embedding_weights)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class GELU(nn.Module):
    def forward(self, x):
        return gelu(x)


class RegionFeatureRegression(nn.Module):
    def __init__(self, hidden_size, feat_dim, img_linear_weight):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), GELU(), nn.LayerNorm(hidden_size, eps=1e-12)
        )
        self.weight = img_linear_weight
        self.bias = nn.Parameter(torch.zeros(feat_dim))

    def forward(self, input_):
        return F.linear(self.net(input_), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    def __init__(self, hidden_size, label_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            GELU(),
            nn.LayerNorm(hidden_size, eps=1e-12),
            nn.Linear(hidden_size, label_dim),
        )

    def forward(self, input_):
        return self.net(input_)


# --- the reference's OT (model/ot.py) ---------------------------------------------------------


def cost_matrix_cosine(x, y, eps=1e-5):
    x_norm = F.normalize(x, p=2, dim=-1, eps=eps)
    y_norm = F.normalize(y, p=2, dim=-1, eps=eps)
    return 1 - x_norm.matmul(y_norm.transpose(1, 2))


def trace(x):
    b, m, n = x.size()
    mask = torch.eye(n, dtype=torch.bool, device=x.device).unsqueeze(0).expand_as(x)
    return x.masked_select(mask).contiguous().view(b, n).sum(dim=-1, keepdim=False)


@torch.no_grad()
def ipot(C, x_len, x_pad, y_len, y_pad, joint_pad, beta, iteration, k):
    b, m, n = C.size()
    sigma = torch.ones(b, m, dtype=C.dtype, device=C.device) / x_len.unsqueeze(1)
    T = torch.ones(b, n, m, dtype=C.dtype, device=C.device)
    A = torch.exp(-C.transpose(1, 2) / beta)
    sigma.masked_fill_(x_pad, 0)
    joint_pad = joint_pad.transpose(1, 2)
    T.masked_fill_(joint_pad, 0)
    A.masked_fill_(joint_pad, 0)
    x_len = x_len.unsqueeze(1).unsqueeze(2)
    y_len = y_len.unsqueeze(1).unsqueeze(2)
    x_mask = (x_pad.to(C.dtype) * 1e4).unsqueeze(1)
    y_mask = (y_pad.to(C.dtype) * 1e4).unsqueeze(1)
    for _ in range(iteration):
        Q = A * T
        sigma = sigma.view(b, m, 1)
        for _ in range(k):
            delta = 1 / (y_len * Q.matmul(sigma).view(b, 1, n) + y_mask)
            sigma = 1 / (x_len * delta.matmul(Q) + x_mask)
        T = delta.view(b, n, 1) * Q * sigma
    T.masked_fill_(joint_pad, 0)
    return T


def optimal_transport_dist(txt_emb, img_emb, txt_pad, img_pad, beta=0.5, iteration=50, k=1):
    cost = cost_matrix_cosine(txt_emb, img_emb)
    joint_pad = txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)
    cost.masked_fill_(joint_pad, 0)
    txt_len = (txt_pad.size(1) - txt_pad.sum(dim=1, keepdim=False)).to(dtype=cost.dtype)
    img_len = (img_pad.size(1) - img_pad.sum(dim=1, keepdim=False)).to(dtype=cost.dtype)
    T = ipot(cost.detach(), txt_len, txt_pad, img_len, img_pad, joint_pad, beta, iteration, k)
    return trace(cost.matmul(T.detach()))


# --- the pretraining model (model/pretrain.py) ----------------------------------------------


class UniterForPretraining(nn.Module):
    """The authors' pretraining model; `forward` returns unreduced losses as theirs does."""

    def __init__(self, config, img_dim=2048, img_label_dim=1601):
        super().__init__()
        self.config = config
        self.uniter = UniterModel(config, img_dim)
        self.cls = BertOnlyMLMHead(config, self.uniter.embeddings.word_embeddings.weight)
        self.feat_regress = RegionFeatureRegression(
            config.hidden_size, img_dim, self.uniter.img_embeddings.img_linear.weight
        )
        self.region_classifier = RegionClassification(config.hidden_size, img_label_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.apply(self.init_weights)

    def init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, batch, task):
        if task == "mlm":
            return self.forward_mlm(batch)
        if task == "mrfr":
            return self.forward_mrfr(batch)
        if task == "itm":
            return self.forward_itm(batch)
        if task.startswith("mrc"):
            return self.forward_mrc(batch, task)
        raise ValueError(f"invalid task {task}")

    def _encode(self, batch, img_masks=None):
        return self.uniter(
            batch["input_ids"],
            batch["position_ids"],
            batch["img_feat"],
            batch["img_pos_feat"],
            batch["attn_masks"],
            batch["gather_index"],
            img_masks=img_masks,
        )

    @staticmethod
    def _compute_masked_hidden(hidden, mask):
        return hidden[mask.unsqueeze(-1).expand_as(hidden)].contiguous().view(-1, hidden.size(-1))

    def forward_mlm(self, batch):
        input_ids, txt_labels = batch["input_ids"], batch["txt_labels"]
        sequence_output = self._encode(batch)[:, : input_ids.size(1), :]
        masked_output = self._compute_masked_hidden(sequence_output, txt_labels != -1)
        prediction_scores = self.cls(masked_output)
        return F.cross_entropy(prediction_scores, txt_labels[txt_labels != -1], reduction="none")

    def forward_mrfr(self, batch):
        sequence_output = self._encode(batch, batch["img_masks"])
        masked_output = self._compute_masked_hidden(sequence_output, batch["img_mask_tgt"])
        prediction_feat = self.feat_regress(masked_output)
        return F.mse_loss(prediction_feat, batch["feat_targets"], reduction="none")

    def forward_mrc(self, batch, task):
        sequence_output = self._encode(batch, batch["img_masks"])
        masked_output = self._compute_masked_hidden(sequence_output, batch["img_mask_tgt"])
        prediction_soft_label = self.region_classifier(masked_output)
        label_targets = batch["label_targets"]
        if "kl" in task:
            prediction_soft_label = F.log_softmax(prediction_soft_label, dim=-1)
            return F.kl_div(prediction_soft_label, label_targets, reduction="none")
        label_targets = torch.max(label_targets[:, 1:], dim=-1)[1] + 1
        return F.cross_entropy(
            prediction_soft_label, label_targets, ignore_index=0, reduction="none"
        )

    def forward_itm(self, batch):
        input_ids, img_feat, targets = batch["input_ids"], batch["img_feat"], batch["targets"]
        sequence_output = self._encode(batch)
        itm_scores = self.itm_output(self.uniter.pooler(sequence_output))
        ot_inputs = batch.get("ot_inputs")
        ot_loss = None
        if ot_inputs is not None:
            ot_scatter = ot_inputs["ot_scatter"]
            b = sequence_output.size(0)
            tl = input_ids.size(1)
            il = img_feat.size(1)
            max_l = max(ot_inputs["scatter_max"] + 1, tl + il)
            ot_scatter = ot_scatter.unsqueeze(-1).expand_as(sequence_output)
            ctx_emb = torch.zeros(
                b,
                max_l,
                self.config.hidden_size,
                dtype=sequence_output.dtype,
                device=sequence_output.device,
            ).scatter_(dim=1, index=ot_scatter, src=sequence_output)
            txt_emb = ctx_emb[:, :tl, :]
            img_emb = ctx_emb[:, tl : tl + il, :]
            ot_dist = optimal_transport_dist(
                txt_emb.float(), img_emb.float(), ot_inputs["txt_pad"], ot_inputs["img_pad"]
            ).to(txt_emb)
            ot_loss = (ot_dist.masked_select(targets == 1), ot_dist.masked_select(targets == 0))
        return F.cross_entropy(itm_scores, targets, reduction="none"), ot_loss


def reduce_losses(task, loss, itm_ot_lambda=0.1):
    """The authors' training loop's reduction of `forward`'s output into the optimised loss."""
    if task == "itm":
        itm_loss, ot_loss = loss
        itm_loss = itm_loss.mean()
        if ot_loss is None:
            return {"loss": itm_loss, "itm": itm_loss}
        ot_pos, ot_neg = ot_loss
        ot = (ot_pos.sum() - ot_neg.sum()) / (ot_pos.size(0) + ot_neg.size(0))
        return {
            "loss": itm_loss + itm_ot_lambda * ot,
            "itm": itm_loss,
            "wra": ot,
            "wra_pos": ot_pos.mean(),
            "wra_neg": ot_neg.mean(),
        }
    loss = loss.mean()
    return {"loss": loss, task: loss}
