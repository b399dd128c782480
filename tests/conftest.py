"""Shared fixtures: small configs and random ragged examples in the schema of data/schema.py."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter, which has to be chosen before
# triton is first imported (kernels are interpreted or compiled when they are defined). On a
# CUDA machine they run compiled, as in training.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from uniter_fast.config import UniterConfig
from uniter_fast.data.schema import BERT_BASE_CASED

TINY = UniterConfig(
    vocab_size=28996,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def random_examples(
    rng: np.random.Generator,
    sizes: list[tuple[int, int]],
    *,
    img_dim: int = 2048,
    label_dim: int = 1601,
    feat_dtype=np.float16,
) -> list[dict]:
    """One example per (text length incl. [CLS]/[SEP], regions), every task's fields filled."""
    vocab = BERT_BASE_CASED
    examples = []
    for txt_len, n in sizes:
        ids = np.concatenate(
            [
                [vocab.cls_id],
                rng.integers(vocab.word_start, vocab.word_end, txt_len - 2),
                [vocab.sep_id],
            ]
        )[:txt_len].astype(np.int64)
        labels = np.full(txt_len, -1, dtype=np.int64)
        chosen = rng.random(txt_len) < 0.3
        chosen[0] = chosen[-1] = False
        if txt_len > 2 and not chosen.any():
            chosen[1] = True
        labels[chosen] = ids[chosen]
        ids = ids.copy()
        ids[chosen] = vocab.mask_id
        img_mask = rng.random(n) < 0.2
        img_mask[rng.integers(n)] = True
        examples.append(
            {
                "input_ids": ids,
                "txt_labels": labels,
                "img_feat": rng.standard_normal((n, img_dim)).astype(feat_dtype),
                "img_loc": rng.random((n, 7)).astype(np.float32),
                "img_mask": img_mask,
                "soft_labels": rng.dirichlet(np.full(label_dim, 0.05), n).astype(np.float16),
                "itm_target": int(rng.integers(2)),
            }
        )
    return examples


def ragged_sizes(rng: np.random.Generator, batch: int, max_txt: int = 62, max_img: int = 100):
    return [
        (int(rng.integers(3, max_txt + 1)), int(rng.integers(1, max_img + 1))) for _ in range(batch)
    ]


# Fresh random inputs on every run; the session seed is printed in the header so that a failure
# can be replayed with UNITER_TEST_SEED=<seed>.
SESSION_SEED = int(os.environ.get("UNITER_TEST_SEED", np.random.SeedSequence().entropy % 2**31))


def pytest_report_header(config):
    return f"uniter-fast test seed: {SESSION_SEED} (replay with UNITER_TEST_SEED={SESSION_SEED})"


@pytest.fixture
def rng(request) -> np.random.Generator:
    seed = [SESSION_SEED, zlib.crc32(request.node.nodeid.encode())]
    torch.manual_seed(np.random.SeedSequence(seed).generate_state(1)[0])
    return np.random.default_rng(seed)
