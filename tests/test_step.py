"""The plain-PyTorch step (train/step.py) and the host-sync check (train/sync.py).

The step's maths is held to AdamW by hand on the summed, clipped gradient. The sync check is
held both ways: it catches each kind of syncing operation (and the authors' boolean-mask step),
and it passes our model's forward and backward for every task, with the reference ops and with
the Triton kernels (interpreted here), so no host sync hides in the step. On a GPU the whole step
(copy in, forward, backward, clip, fused AdamW) runs under PyTorch's sync debug mode.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, random_examples

import uniter_fast as uf
from uniter_fast.authors import collate as authors_collate
from uniter_fast.authors import model as authors_model
from uniter_fast.config import OptimConfig
from uniter_fast.kernels import triton_runs_on
from uniter_fast.train.engine import param_groups
from uniter_fast.train.schedule import learning_rate
from uniter_fast.train.step import TorchStep
from uniter_fast.train.sync import HostSyncError, forbid_host_sync

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
SIZES = [(7, 5), (3, 11), (12, 1), (5, 9)]  # (text length with [CLS]/[SEP], regions)


def _batch(rng, task: str) -> uf.Batch:
    return uf.data.collate(random_examples(rng, SIZES), task)


def test_torch_step_is_adamw_on_the_summed_clipped_gradient(rng):
    optim = OptimConfig(lr=1e-3, warmup_steps=10, grad_clip=0.5, grad_accum=2)
    torch.manual_seed(0)
    model = uf.UniterForPretraining(TINY)
    twin = copy.deepcopy(model)
    step = TorchStep(model, optim, total_steps=100, device="cpu", precision="fp32")
    batches = [_batch(rng, "mlm"), _batch(rng, "itm")]
    tasks = ["mlm", "itm"]
    for batch, task in zip(batches, tasks, strict=True):
        step.backward(step.forward(batch, task)["loss"] * 100)
    lr, norm = step.step()
    assert lr == pytest.approx(learning_rate(1, 1e-3, 10, 100))
    assert all(p.grad is None for p in model.parameters())

    opt = torch.optim.AdamW(
        param_groups(twin, optim.weight_decay), lr=lr, betas=optim.betas, eps=optim.eps
    )
    sum(twin(b, t)["loss"] * 100 for b, t in zip(batches, tasks, strict=True)).backward()
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    assert float(norm) == pytest.approx(float(want), rel=1e-5) and want > 0.5
    opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # The schedule moved on: the next step's lr is the reference's for step 2.
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(2, 1e-3, 10, 100))


def test_torch_step_refuses_what_it_cannot_do():
    model = uf.UniterForPretraining(TINY)
    with pytest.raises(ValueError, match="bf16 .* needs a CUDA device"):
        TorchStep(model, OptimConfig(), total_steps=1, device="cpu", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchStep(model, OptimConfig(), total_steps=1, device="cpu", precision="fp16")


@pytest.mark.parametrize(
    "op",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x.sum() > 0),
        lambda x: x[x > 0],
        lambda x: torch.nonzero(x),
        lambda x: torch.masked_select(x, x > 0),
        lambda x: torch.unique(x),
        lambda x: torch.repeat_interleave(x.long().abs()),
        lambda x: torch.equal(x, x),
    ],
    ids=["item", "bool", "mask-index", "nonzero", "masked_select", "unique", "repeat", "equal"],
)
def test_sync_check_catches_each_kind_of_host_sync(op):
    x = torch.randn(6)
    with pytest.raises(HostSyncError, match="host sync"), forbid_host_sync("cpu"):
        op(x)


def test_sync_check_lets_index_based_work_through():
    x, index = torch.randn(6, 3, requires_grad=True), torch.tensor([4, 0, 2])
    with forbid_host_sync("cpu"):
        y = x.index_select(0, index) * 2
        z = torch.zeros(6, 3).index_copy(0, index, y)
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        z.sum().backward()
    assert x.grad is not None


def test_sync_check_catches_the_authors_boolean_mask_step(rng):
    """The negative control: the reference's step selects targets with boolean masks."""
    model = authors_model.UniterForPretraining(TINY)
    batch = authors_collate.collate(random_examples(rng, SIZES), "mlm")
    with pytest.raises(HostSyncError), forbid_host_sync("cpu"):
        model(batch, "mlm")


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("task", TASKS)
def test_model_forward_and_backward_never_wait_for_the_host(rng, task, kernels):
    if kernels == "triton" and not triton_runs_on("cpu"):
        pytest.skip("triton's interpreter is not available (TRITON_INTERPRET=1, triton)")
    torch.manual_seed(int(rng.integers(2**31)))
    model = uf.UniterForPretraining(TINY, kernels=kernels)
    batch = _batch(rng, task)
    # The launchers check label ranges of CPU tensors only (on a GPU that would read a device
    # value): the one host read the check is told about.
    with forbid_host_sync("cpu", allow=["_check_labels"]):
        out = model(batch, task)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
    assert torch.isfinite(out["loss"].detach())
    assert model.uniter.img_embeddings.img_linear.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("varlen_dropout", ["keep", "drop"])
def test_fast_step_has_no_host_sync_on_cuda(varlen_dropout):
    """Copy in, forward, backward, clip and fused AdamW under torch's sync debug mode ("error"):
    bf16 autocast, the fused kernels and the attention backend "auto" picks (training on SDPA's
    padded view with "keep", on the varlen kernel with "drop"), every task."""
    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    config = uf.UniterConfig.from_json(
        Path(__file__).parent.parent / "configs/model/uniter-tiny.json"
    )
    model = uf.UniterForPretraining(config).to(device)
    model.set_attention("auto", device, varlen_dropout, dtype=torch.bfloat16)
    step = TorchStep(model, OptimConfig(lr=1e-4), total_steps=100, device=device)
    sizes = [
        (int(t), int(n))
        for t, n in zip(rng.integers(3, 40, 16), rng.integers(10, 100, 16), strict=True)
    ]
    batches = {t: uf.data.collate(random_examples(rng, sizes), t).pin_memory() for t in TASKS}

    def run_step():
        for task in TASKS:
            batch = batches[task].to(device, non_blocking=True)
            step.backward(step.forward(batch, task)["loss"])
        return step.step()

    run_step()  # compiles the Triton kernels and warms up cuBLAS: allowed to wait
    torch.cuda.synchronize()
    with forbid_host_sync(device):
        _, norm = run_step()
    assert torch.isfinite(norm).item()


def test_engine_micro_batches_between_optimizer_steps_never_wait_for_the_host(rng):
    """The trainer's hot path under DeepSpeed: the forward, backward and engine step of a
    micro-batch that does not end an optimizer step. (DeepSpeed's optimizer step itself reads
    its overflow flag and the gradient norm on the host, once per step: benchmarks/NOTES.md.)"""
    from uniter_fast.train.engine import Engine, build_deepspeed_config, init_distributed

    init_distributed(torch.device("cpu"))
    optim = OptimConfig(lr=1e-3, warmup_steps=10, grad_accum=2)
    cfg, _ = build_deepspeed_config(
        {"zero_optimization": {"stage": 1}},
        optim=optim,
        precision="bf16",
        device=torch.device("cpu"),
    )
    model = uf.UniterForPretraining(TINY)
    engine = Engine(model, optim, total_steps=100, deepspeed_config=cfg, device=torch.device("cpu"))
    for task in ("mlm", "itm"):
        batch = _batch(rng, task)
        with forbid_host_sync("cpu"):
            engine.backward(engine(batch, task)["loss"])
            assert engine.step(1) is None  # not the accumulation boundary
        engine.backward(engine(batch, task)["loss"])
        assert engine.step(1).applied
