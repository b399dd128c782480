"""The worker hand-over: a ring of shared arenas, recycled only once no tensor uses them."""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
from conftest import random_examples

from uniter_fast.data.collate import collate
from uniter_fast.data.handover import (
    Returns,
    SharedBuffers,
    Ticket,
    batch_from_layout,
    flat_layout,
    release_table,
)
from uniter_fast.data.pipeline import LoadedBatch, Loader, TrainSource
from uniter_fast.data.synthetic import write_synthetic


def test_a_slot_is_reused_only_after_the_training_process_releases_it():
    table = release_table(1, 3)
    ring = SharedBuffers(table[0], worker=0)
    a = ring.allocate(1000)
    first = ring.ticket
    assert (first.slot, first.generation) == (0, 1) and a.numel() == 1000
    ring.allocate(500)
    assert ring.ticket.slot == 1  # slot 0 is still lent
    table[0, 0] = first.generation  # released
    ring.allocate(800)
    assert (ring.ticket.slot, ring.ticket.generation) == (0, 2)
    # Too small and free: grown in place. All lent: a new slot, then one-off blocks.
    table[0, 1] = 1
    big = ring.allocate(3 << 20)
    assert ring.ticket.slot == 1 and big.numel() == 3 << 20
    ring.allocate(10)
    assert ring.ticket.slot == 2 and len(ring) == 3
    block = ring.allocate(10)
    assert ring.ticket is None and ring.one_off == 1 and block.is_shared()


def test_returns_release_a_slot_when_its_last_view_is_gone():
    table = release_table(2, 4)
    returns = Returns(table)
    # As received from worker 1 (whose ring, in its own process, holds its own reference).
    arena = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(4096))
    ticket = Ticket(worker=1, slot=0, generation=1)
    view = arena[64:128].view(torch.int64)
    returns.hold(ticket, arena.untyped_storage(), copied=False)
    del arena
    returns.release_unused()
    assert table[1, 0] == 0  # `view` still uses it
    del view
    returns.release_unused()
    assert table[1, 0] == 1 and not returns.held
    slot = torch.UntypedStorage._new_shared(64)
    returns.hold(Ticket(worker=1, slot=0, generation=2), slot, copied=True)  # copied to pinned
    assert table[1, 0] == 2 and returns.mapped[(1, 0)] is slot  # free at once, kept mapped


def test_a_packed_batch_crosses_as_one_buffer_and_comes_back_equal():
    examples = random_examples(np.random.default_rng(0), [(7, 5), (3, 9), (12, 1)])
    table = release_table(1, 2)
    ring = SharedBuffers(table[0], worker=0)
    for task in ("mlm", "mrckl", "itm"):
        batch = collate(examples, task, out=ring.allocate)
        arena, layout = flat_layout(batch)
        assert arena.is_shared() and set(layout["tensors"]) == set(batch.tensors())
        again = batch_from_layout(arena, layout)
        item = LoadedBatch(task, batch, 0, {}, {}, ring.ticket)
        received = pickle.loads(ForkingPickler.dumps(item))
        assert received.layout is not None and received.ticket == ring.ticket
        for got in (again, received.batch):
            for name, t in batch.tensors().items():
                assert torch.equal(getattr(got, name), t) and getattr(got, name).dtype == t.dtype
            assert got.max_seqlen == batch.max_seqlen and got.task == batch.task
        table[0, ring.ticket.slot] = ring.ticket.generation
    fresh = collate(examples, "mlm")  # fields in separate arrays: no single buffer
    assert flat_layout(fresh) is None


def test_worker_batches_use_a_small_ring_and_held_batches_stay_intact(tmp_path):
    write_synthetic(tmp_path, 60, seed=1, images_per_shard=20)
    mix = {"mlm": 1.0, "mrckl": 1.0, "itm": 1.0}
    loader = Loader(
        [TrainSource("a", [str(tmp_path)], mix)],
        tokens_per_batch=700,
        seed=0,
        num_workers=1,
        block_images=20,
    )
    held, slots = [], set()
    for i in range(40):
        _, batch = next(loader)
        slots |= set(loader._returns.mapped)
        if i % 8 == 0:  # kept by the caller: its slot must not be refilled meanwhile
            held.append((batch, {k: v.clone() for k, v in batch.tensors().items()}))
    loader.close()
    assert loader.one_off_buffers == 0
    assert len(slots) <= loader.ring_slots
    for batch, copy in held:
        for name, t in copy.items():
            assert torch.equal(getattr(batch, name), t), name


def test_recycled_buffers_carry_the_same_batches_as_the_training_process_builds(tmp_path):
    """40 batches through one worker's ring (each slot refilled several times) equal the same
    role's batches built in this process."""
    from uniter_fast.data.pipeline import RoleStream, StreamSettings

    write_synthetic(tmp_path, 40, seed=2, images_per_shard=10)
    sources = [TrainSource("a", [str(tmp_path)], {"mrckl": 1.0, "mlm": 1.0, "itm": 1.0})]
    loader = Loader(sources, tokens_per_batch=600, seed=3, block_images=10, num_workers=1)
    got = [next(loader) for _ in range(40)]
    loader.close()
    settings = StreamSettings(tokens_per_batch=600, seed=3, block_images=10)
    role = RoleStream(sources, settings, role=0, num_roles=1)
    for task, batch in got:
        want_task, want = next(role)
        assert task == want_task
        for name, t in want.tensors().items():
            assert torch.equal(getattr(batch, name), t), name


def test_pinning_copies_the_arena_once_and_keeps_its_storage_for_release(monkeypatch):
    """The pin thread's path, with pinning stood in for by a copy (this machine has no GPU)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t.clone())
    examples = random_examples(np.random.default_rng(1), [(5, 4), (9, 7)])
    ring = SharedBuffers(release_table(1, 2)[0], worker=0)
    batch = collate(examples, "mrfr", out=ring.allocate)
    item = pickle.loads(ForkingPickler.dumps(LoadedBatch("mrfr", batch, 0, {}, {}, ring.ticket)))
    slot = item.source_storage()
    pinned = item.pin_memory()
    assert pinned.arena is None and pinned.pinned_from is slot
    assert pinned.source_storage() is slot
    tensors = pinned.batch.tensors()
    assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == 1  # one copy
    assert tensors["img_feat"].untyped_storage().data_ptr() != slot.data_ptr()
    for name, t in batch.tensors().items():
        assert torch.equal(tensors[name], t), name
