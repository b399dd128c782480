"""Attention backends against the eager reference, the backend choice, and its routing.

The varlen backends run on CUDA only; on the CPU their routing is exercised through stand-ins
for the kernels built from the eager path one sequence at a time.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import TINY, ragged_sizes, random_examples

import uniter_fast as uf
from uniter_fast.config import UniterConfig
from uniter_fast.model import attention
from uniter_fast.model.attention import (
    ATTENTION_BACKENDS,
    VARLEN_DROPOUT,
    AttentionLayout,
    SelfAttention,
    resolve_attention,
)

# 3 heads of 16: neither a power of two.
SMALL = UniterConfig(
    hidden_size=48,
    num_attention_heads=3,
    num_hidden_layers=1,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_layout(lengths: list[int], device="cpu", extra_pad: int = 0) -> AttentionLayout:
    """The collator's layout for sequences of `lengths`: Lpad rounded up to 8, plus extra_pad."""
    n = sum(lengths)
    lpad = -(-max(lengths) // 8) * 8 + extra_pad
    pad_index = torch.full((len(lengths), lpad), n, dtype=torch.int64)
    unpad, start = [], 0
    for b, length in enumerate(lengths):
        pad_index[b, :length] = torch.arange(start, start + length)
        unpad.append(b * lpad + torch.arange(length))
        start += length
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return AttentionLayout(
        pad_index=pad_index.to(device),
        unpad_index=torch.cat(unpad).to(device),
        key_mask=(pad_index < n)[:, None, None, :].to(device),
        cu_seqlens=cu.to(device),
        max_seqlen=max(lengths),
    )


def random_lengths(rng, batch: int, *, with_single: bool = True) -> list[int]:
    lengths = [int(x) for x in rng.integers(1, 41, batch)]
    if with_single:
        lengths[int(rng.integers(batch))] = 1
    return lengths


def twins(config: UniterConfig, backends, dtype=torch.float32, device="cpu"):
    """One SelfAttention per backend, identical weights."""
    first = None
    modules = []
    for backend in backends:
        choice = resolve_attention(
            backend, device, dropout_p=config.attention_probs_dropout_prob, dtype=None
        )
        module = SelfAttention(config, choice).to(device=device, dtype=dtype)
        if first is None:
            first = module
        else:
            module.load_state_dict(first.state_dict())
        modules.append(module)
    return modules


RESULTS = ("out", "x.grad", "qkv.weight.grad", "qkv.bias.grad")


def run_with_grads(module, x, layout, upstream):
    """Output and the gradients of input, qkv weight and bias, for a given upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, layout)
    out.backward(upstream)
    return out.detach(), x.grad, module.qkv.weight.grad, module.qkv.bias.grad


# ---------------------------------------------------------------------------------------------
# sdpa against eager on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 2, 7, 16])
def test_sdpa_matches_eager(batch, dtype, rng):
    lengths = random_lengths(rng, batch, with_single=batch > 1)
    layout = make_layout(lengths)
    sdpa, eager = twins(SMALL, ("sdpa", "eager"), dtype)
    x = torch.randn(sum(lengths), SMALL.hidden_size, dtype=dtype)
    upstream = torch.randn(sum(lengths), SMALL.hidden_size, dtype=dtype)
    got = run_with_grads(sdpa, x, layout, upstream)
    want = run_with_grads(eager, x, layout, upstream)
    for name, g, w in zip(RESULTS, got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=name)


def test_single_token_sequence_alone(rng):
    # B = 1, length 1: attention is the identity on v.
    layout = make_layout([1])
    (eager,) = twins(SMALL, ("eager",), torch.float64)
    x = torch.randn(1, SMALL.hidden_size, dtype=torch.float64)
    v = eager.qkv(x)[:, 2 * SMALL.hidden_size :]
    torch.testing.assert_close(eager(x, layout), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("task", ["mlm", "itm"])
def test_whole_model_sdpa_matches_eager(task, dtype, rng):
    sdpa = uf.UniterForPretraining(TINY, attention="sdpa").to(dtype)
    eager = uf.UniterForPretraining(TINY, attention="eager").to(dtype)
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.attention_choice.backend == "sdpa" and eager.attention_choice.backend == "eager"
    sizes = ragged_sizes(rng, 5, max_txt=20, max_img=20) + [(3, 1)]
    batch = uf.data.collate(random_examples(rng, sizes), task)
    losses = []
    for model in (sdpa, eager):
        loss = model(batch, task)["loss"]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], **TOL[dtype])
    grads = dict(eager.named_parameters())
    for name, p in sdpa.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads[name].grad, **TOL[dtype], msg=name)


# ---------------------------------------------------------------------------------------------
# Padding and sequence isolation


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_sequences_do_not_see_each_other(backend, rng):
    lengths = random_lengths(rng, 6)
    layout = make_layout(lengths)
    (module,) = twins(SMALL, (backend,), torch.float64)
    x = torch.randn(sum(lengths), SMALL.hidden_size, dtype=torch.float64)
    changed = 3
    start, end = sum(lengths[:changed]), sum(lengths[: changed + 1])
    y = x.clone()
    y[start:end] = torch.randn(end - start, SMALL.hidden_size, dtype=torch.float64) * 10
    with torch.no_grad():
        a, b = module(x, layout), module(y, layout)
    others = torch.ones(sum(lengths), dtype=torch.bool)
    others[start:end] = False
    torch.testing.assert_close(a[others], b[others], rtol=0, atol=1e-13)
    assert not torch.allclose(a[~others], b[~others])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_more_padding_changes_nothing(backend, rng):
    # Padded keys are zero vectors: without the mask each would take weight exp(0) / Z.
    lengths = random_lengths(rng, 5)
    (module,) = twins(SMALL, (backend,), torch.float64)
    x = torch.randn(sum(lengths), SMALL.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        tight = module(x, make_layout(lengths))
        loose = module(x, make_layout(lengths, extra_pad=24))
    torch.testing.assert_close(tight, loose, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Dropout


def dropout_config(p: float) -> UniterConfig:
    return dataclasses.replace(SMALL, attention_probs_dropout_prob=p)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_eval_has_no_dropout(backend, rng):
    lengths = random_lengths(rng, 4)
    layout = make_layout(lengths)
    module, eager0 = twins(dropout_config(0.5), (backend, "eager"), torch.float64)
    x = torch.randn(sum(lengths), SMALL.hidden_size, dtype=torch.float64)
    module.eval(), eager0.eval()
    with torch.no_grad():
        first, second, want = module(x, layout), module(x, layout), eager0(x, layout)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, want, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_training_dropout_is_unbiased(backend, rng):
    # 2000 copies of one sequence in one batch: 2000 independent dropout masks. Inverted dropout
    # keeps the expectation, so their mean is the eval output within a few standard errors; a
    # missing 1 / (1 - p) would be off by half the output, no dropout would show zero spread.
    p, copies, length = 0.5, 2000, 6
    (module,) = twins(dropout_config(p), (backend,), torch.float64)
    layout = make_layout([length] * copies)
    seq = torch.randn(length, SMALL.hidden_size, dtype=torch.float64)
    x = seq.repeat(copies, 1)
    with torch.no_grad():
        module.eval()
        want = module(seq, make_layout([length]))
        module.train()
        out = module(x, layout).view(copies, length, -1)
    spread = out.std(dim=0)
    assert spread.min() > 1e-3, "training forward applied no dropout"
    stderr = spread / copies**0.5
    assert ((out.mean(dim=0) - want).abs() <= 6 * stderr + 1e-9).all()


# ---------------------------------------------------------------------------------------------
# resolve_attention


def test_auto_on_cpu_is_sdpa():
    choice = resolve_attention("auto", "cpu", dropout_p=0.1)
    assert (choice.backend, choice.train_backend, choice.eval_backend) == ("sdpa",) * 3
    assert choice.train_dropout and choice.warning is None
    assert choice.describe().startswith("sdpa padded")
    assert "CUDA only" in choice.describe()


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cpu_backends_resolve_as_asked(backend):
    choice = resolve_attention(backend, torch.device("cpu"), dropout_p=0.1, varlen_dropout="drop")
    assert choice.backend == choice.train_backend == choice.eval_backend == backend
    assert choice.train_dropout and choice.warning is None


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_cuda_backends_on_cpu_raise(backend):
    with pytest.raises(ValueError, match=rf"'{backend}' cannot run here: CUDA only.*use .*sdpa"):
        resolve_attention(backend, "cpu", dropout_p=0.1)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="auto, flash, varlen, sdpa, eager, got 'xformers'"):
        resolve_attention("xformers", "cpu", dropout_p=0.1)
    with pytest.raises(ValueError, match="keep, drop"):
        resolve_attention("auto", "cpu", dropout_p=0.1, varlen_dropout="sometimes")
    with pytest.raises(ValueError, match="dropout_p"):
        resolve_attention("auto", "cpu", dropout_p=1.0)
    assert ATTENTION_BACKENDS == ("auto", "flash", "varlen", "sdpa", "eager")
    assert VARLEN_DROPOUT == ("keep", "drop")


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Pretend the CPU can run the varlen kernels; returns a setter for the two libraries."""
    monkeypatch.setattr(attention, "_device_problem", lambda device: None)

    def available(*, flash: bool, varlen: bool) -> None:
        monkeypatch.setattr(attention, "_flash_available", lambda: flash)
        monkeypatch.setattr(attention, "_varlen_available", lambda: varlen)

    available(flash=False, varlen=True)
    return available


def test_varlen_keep_trains_on_sdpa(pretend_gpu):
    choice = resolve_attention("auto", "cuda", dropout_p=0.1)
    assert (choice.backend, choice.train_backend, choice.eval_backend) == (
        "varlen",
        "sdpa",
        "varlen",
    )
    assert choice.train_dropout and choice.warning is None
    assert choice.describe().startswith(
        "torch varlen (eval); sdpa padded (training: torch varlen has no attention dropout, "
        "recipe has 0.1; varlen_dropout: drop trains without it)"
    )


def test_varlen_drop_warns(pretend_gpu):
    choice = resolve_attention("varlen", "cuda", dropout_p=0.1, varlen_dropout="drop")
    assert (choice.backend, choice.train_backend, choice.eval_backend) == ("varlen",) * 3
    assert not choice.train_dropout
    assert "off in training" in choice.warning and "0.1" in choice.warning
    assert "OFF in training" in choice.describe()


@pytest.mark.parametrize("policy", VARLEN_DROPOUT)
def test_varlen_without_dropout_needs_no_policy(pretend_gpu, policy):
    choice = resolve_attention("auto", "cuda", dropout_p=0.0, varlen_dropout=policy)
    assert (choice.train_backend, choice.eval_backend) == ("varlen", "varlen")
    assert choice.warning is None
    assert choice.describe().startswith("torch varlen")


def test_auto_prefers_flash(pretend_gpu):
    pretend_gpu(flash=True, varlen=True)
    choice = resolve_attention("auto", "cuda", dropout_p=0.1, varlen_dropout="drop")
    assert (choice.backend, choice.train_backend, choice.eval_backend) == ("flash",) * 3
    assert choice.train_dropout and choice.warning is None  # flash-attn applies dropout


def test_auto_without_either_library(pretend_gpu):
    pretend_gpu(flash=False, varlen=False)
    choice = resolve_attention("auto", "cuda", dropout_p=0.1)
    assert choice.backend == "sdpa"
    assert "flash-attn is not importable" in choice.describe()
    with pytest.raises(ValueError, match="has no torch.nn.attention.varlen"):
        resolve_attention("varlen", "cuda", dropout_p=0.1)


def test_float32_rules_out_the_varlen_kernels(pretend_gpu):
    pretend_gpu(flash=True, varlen=True)
    assert resolve_attention("auto", "cuda", dropout_p=0.1, dtype=torch.float32).backend == "sdpa"
    with pytest.raises(ValueError, match="fp16/bf16 only"):
        resolve_attention("flash", "cuda", dropout_p=0.1, dtype=torch.float32)
    choice = resolve_attention("auto", "cuda", dropout_p=0.1, dtype=torch.bfloat16)
    assert choice.backend == "flash" and "float32" not in choice.describe()
    assert "float32" in resolve_attention("auto", "cuda", dropout_p=0.1).describe()


# ---------------------------------------------------------------------------------------------
# Routing, with CPU stand-ins for the kernels


def eager_per_sequence(q, k, v, cu_seqlens, max_seqlen):
    """Attention one sequence at a time on packed (N, heads, head_dim): a kernel's stand-in."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))
        probs = (qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5).softmax(dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out


@pytest.fixture
def kernels(monkeypatch, pretend_gpu):
    """Stand-ins for both kernels and a counting sdpa; returns the call log."""
    calls = []

    def varlen(q, k, v, cu_seqlens, max_seqlen):
        calls.append(("varlen", 0.0))
        return eager_per_sequence(q, k, v, cu_seqlens, max_seqlen)

    def flash(q, k, v, cu_seqlens, max_seqlen, dropout_p):
        calls.append(("flash", dropout_p))
        return eager_per_sequence(q, k, v, cu_seqlens, max_seqlen)

    sdpa = attention._RUN["sdpa"]

    def counting_sdpa(qkv, layout, heads, head_dim, dropout_p):
        calls.append(("sdpa", dropout_p))
        return sdpa(qkv, layout, heads, head_dim, dropout_p)

    monkeypatch.setattr(attention, "_varlen_attn", varlen)
    monkeypatch.setattr(attention, "_flash_attn", flash)
    monkeypatch.setitem(attention._RUN, "sdpa", counting_sdpa)
    return calls


def routing_setup(rng, policy, backend="varlen", p=0.5):
    lengths = random_lengths(rng, 5)
    layout = make_layout(lengths)
    config = dropout_config(p)
    choice = resolve_attention(backend, "cpu", dropout_p=p, varlen_dropout=policy)
    module = SelfAttention(config, choice).to(torch.bfloat16)
    (eager,) = twins(config, ("eager",), torch.float32)
    eager.load_state_dict(module.state_dict())
    eager.eval()
    x = torch.randn(sum(lengths), SMALL.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        want = eager(x.float(), layout)
    return module, x, layout, want


def test_keep_routes_training_to_sdpa(kernels, rng):
    module, x, layout, want = routing_setup(rng, "keep")
    with torch.no_grad():
        module.eval()
        evaluated = module(x, layout)
        assert kernels == [("varlen", 0.0)]
        module.train()
        trained = module(x, layout)
        assert kernels[1:] == [("sdpa", 0.5)]
    torch.testing.assert_close(evaluated.float(), want, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(trained, evaluated)


def test_drop_trains_on_varlen_without_dropout(kernels, rng):
    module, x, layout, want = routing_setup(rng, "drop")
    with torch.no_grad():
        module.train()
        trained = module(x, layout)
        module.eval()
        evaluated = module(x, layout)
    assert kernels == [("varlen", 0.0), ("varlen", 0.0)]
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)
    torch.testing.assert_close(evaluated.float(), want, rtol=2e-2, atol=2e-2)


def test_flash_gets_dropout_in_training_only(kernels, pretend_gpu, rng):
    pretend_gpu(flash=True, varlen=True)
    module, x, layout, want = routing_setup(rng, "keep", backend="flash", p=0.1)
    with torch.no_grad():
        module.train()
        module(x, layout)
        module.eval()
        evaluated = module(x, layout)
    assert kernels == [("flash", 0.1), ("flash", 0.0)]
    torch.testing.assert_close(evaluated.float(), want, rtol=2e-2, atol=2e-2)


def test_float32_activations_take_sdpa(kernels, rng):
    module, x, layout, want = routing_setup(rng, "keep", p=0.0)
    module.float().eval()
    with torch.no_grad():
        got = module(x.float(), layout)
    assert kernels == [("sdpa", 0.0)]
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# The model's choice


def self_attentions(model):
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def test_model_resolves_for_the_cpu(rng):
    model = uf.UniterForPretraining(TINY)
    assert model.attention_choice.backend == "sdpa"
    assert all(m.attention_choice is model.attention_choice for m in self_attentions(model))
    with pytest.raises(ValueError, match="unknown|must be one of"):
        uf.UniterForPretraining(TINY, attention="fast")
    with pytest.raises(ValueError, match="varlen_dropout"):
        uf.UniterForPretraining(TINY, varlen_dropout="maybe")


def test_cuda_request_stays_pending_on_the_cpu(rng):
    model = uf.UniterForPretraining(TINY, attention="varlen")
    assert model.attention_choice is None
    batch = uf.data.collate(random_examples(rng, [(5, 3)]), "mlm")
    with pytest.raises(ValueError, match="'varlen' cannot run here: CUDA only"):
        model(batch, "mlm")
    choice = model.set_attention("eager")
    assert choice.backend == "eager" and model.attention_choice is choice
    assert all(m.attention_choice is choice for m in self_attentions(model))
    model(batch, "mlm")
    with pytest.raises(ValueError, match="CUDA only"):
        model.set_attention("flash", "cpu")
    assert model.attention_choice is choice  # unchanged by the failed request


def test_moving_the_model_resolves_again(monkeypatch):
    # The meta device stands in for a GPU: .to() goes through the same _apply.
    monkeypatch.setattr(
        attention, "_device_problem", lambda d: None if d.type == "meta" else "CUDA only"
    )
    monkeypatch.setattr(attention, "_varlen_available", lambda: True)
    model = uf.UniterForPretraining(TINY)
    assert model.attention_choice.backend == "sdpa"
    model.to("meta")
    assert model.attention_choice.backend == "varlen"
    assert all(m.attention_choice is model.attention_choice for m in self_attentions(model))
    model.to_empty(device="cpu")
    assert model.attention_choice.backend == "sdpa"
    recipe = dataclasses.replace(TINY, attention_probs_dropout_prob=0.1)
    pinned = uf.UniterForPretraining(recipe, attention="varlen", varlen_dropout="drop")
    assert pinned.attention_choice is None
    pinned.to("meta")
    assert pinned.attention_choice.train_backend == "varlen"
    assert pinned.attention_choice.warning is not None


# ---------------------------------------------------------------------------------------------
# On a GPU: every backend it has against the fp32 eager reference


def cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    usable = []
    for backend in ("flash", "varlen", "sdpa", "eager"):
        try:
            resolve_attention(backend, "cuda", dropout_p=0.0, dtype=torch.bfloat16)
        except ValueError:
            continue
        usable.append(backend)
    return usable


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "varlen", "sdpa", "eager"])
def test_cuda_backend_matches_eager_bf16(backend, rng):
    if backend not in cuda_backends():
        pytest.skip(f"{backend} cannot run on this GPU")
    config = dataclasses.replace(SMALL, hidden_size=256, num_attention_heads=4)  # head_dim 64
    lengths = random_lengths(rng, 12)
    layout = make_layout(lengths, "cuda")
    module, ref_bf16, ref_fp32 = twins(config, (backend, "eager", "eager"), device="cuda")
    module.to(torch.bfloat16), ref_bf16.to(torch.bfloat16)
    x = torch.randn(sum(lengths), config.hidden_size, device="cuda")
    upstream = torch.randn_like(x)
    want = run_with_grads(ref_fp32, x, layout, upstream)
    ref = run_with_grads(ref_bf16, x.bfloat16(), layout, upstream.bfloat16())
    got = run_with_grads(module, x.bfloat16(), layout, upstream.bfloat16())
    for name, g, r, w in zip(RESULTS, got, ref, want, strict=True):
        # The 2x rule: our error against fp32 at most twice the bf16 reference's, plus a floor.
        err = (g.float() - w).abs().max().item()
        ref_err = (r.float() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-2 * w.abs().max().item(), (name, err, ref_err)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "varlen", "sdpa"])
def test_cuda_backend_has_no_host_sync(backend, rng):
    if backend not in cuda_backends():
        pytest.skip(f"{backend} cannot run on this GPU")
    config = dataclasses.replace(SMALL, hidden_size=256, num_attention_heads=4)
    layout = make_layout(random_lengths(rng, 8), "cuda")
    (module,) = twins(config, (backend,), torch.bfloat16, device="cuda")
    x = torch.randn(int(layout.cu_seqlens[-1]), config.hidden_size, device="cuda").bfloat16()
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x, layout).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.gpu
def test_cuda_model_auto_matches_eager(rng):
    # The whole model under bf16 autocast, as the trainer runs it, against fp32 eager.
    model = uf.UniterForPretraining(TINY).cuda()
    chosen = model.set_attention("auto", "cuda", dtype=torch.bfloat16)
    reference = uf.UniterForPretraining(TINY, attention="eager").cuda()
    reference.load_state_dict(model.state_dict())
    batch = uf.data.collate(random_examples(rng, ragged_sizes(rng, 6)), "mlm").to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = model(batch, "mlm")["loss"].float()
    want = reference(batch, "mlm")["loss"]
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2, msg=chosen.describe())
