"""How a loader worker hands its batches to the training process: a ring of shared buffers.

A worker packs each batch straight into shared memory (the C++ packer writes every field into
one arena), so that the batch crosses to the training process without a copy. Allocating a new
shared-memory block per batch costs as much as packing it: the block is created, mapped, and
faulted in 4 kB at a time, in the worker and again in the training process (about 35 ms for a
40 MB base-size batch against 3 ms of packing; benchmarks/NOTES.md, "Collate"). So each worker
keeps a ring of arenas and reuses one as soon as the training process is done with it:

    worker w                                    training process (the Loader)
    SharedBuffers.allocate(nbytes) -> slot s    receives the batch: views of slot s's arena
      (a free slot, grown if too small; a new   hands it out; at every later next(), a slot whose
      one while all are in flight, up to        arena no tensor uses any more (storage use count)
      max_slots; past that a one-off block)     is written back as released: the table below
    released[w, s] == generation[s]: free  <--  released[w, s] = generation

The table is one small shared int64 tensor [workers, max_slots] made before the workers start;
each side writes only its own entries (the worker its generation counters, kept privately; the
training process the released column), so no lock is needed. A slot's arena stays mapped in both
processes, so after the first round a hand-over moves one file descriptor and no page faults.

Pickling: a batch whose tensors all view one arena crosses as that one buffer plus its layout
(`LoadedBatch.__reduce__`), not as twenty separately shared tensors (twenty descriptors passed
over a socket). With pinned memory on, the DataLoader's pin thread copies the arena once into
one pinned block and releases the slot at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .collate import ALLOCATORS
from .schema import Batch

# A new shared-memory block: collate's own "shared" allocator.
_shared_block = ALLOCATORS["shared"]

_MIB = 1 << 20
# An arena grown for a batch gets this much room to spare, so that the next slightly larger
# batch does not grow it again.
_GROWTH = 1.25


def _use_count(storage: torch.UntypedStorage) -> int | None:
    """References to the storage held by tensors and storage objects (torch's own counter)."""
    count = getattr(torch._C, "_storage_Use_Count", None)  # noqa: B009 (private, may go)
    return None if count is None else count(storage._cdata)


def release_table(workers: int, max_slots: int) -> torch.Tensor:
    """The shared table of released generations, [workers, max_slots] int64, all zero."""
    return torch.zeros((workers, max_slots), dtype=torch.int64).share_memory_()


@dataclass(frozen=True)
class Ticket:
    """Which arena a batch was packed into: slot `slot` of worker `worker`, its `generation`-th
    use. The training process releases the slot by writing the generation into the table."""

    worker: int
    slot: int
    generation: int


class SharedBuffers:
    """A worker's ring of shared-memory arenas; `allocate` is a `collate` allocator.

    released: this worker's row of `release_table` (shared with the training process).
    After each `allocate`, `ticket` names the slot used, or is None for a one-off block (every
    slot in flight, which means the training process holds more batches than the ring has
    slots: counted in `one_off`).
    """

    def __init__(self, released: torch.Tensor, worker: int):
        self.released = released
        self.worker = worker
        self.arenas: list[torch.Tensor] = []
        self.generations: list[int] = []
        self.ticket: Ticket | None = None
        self.one_off = 0

    def __len__(self) -> int:
        return len(self.arenas)

    def _free_slots(self) -> list[int]:
        released = self.released.tolist()
        return [s for s, g in enumerate(self.generations) if released[s] == g]

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of `nbytes` in shared memory: a free slot's arena (grown if too
        small), a new slot, or past `max_slots` a one-off block."""
        free = self._free_slots()
        fits = [s for s in free if self.arenas[s].numel() >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: self.arenas[s].numel())
        elif free or len(self.arenas) < self.released.numel():
            slot = free[0] if free else len(self.arenas)
            size = -(-int(nbytes * _GROWTH) // _MIB) * _MIB
            arena = _shared_block(size)
            if slot == len(self.arenas):
                self.arenas.append(arena)
                self.generations.append(0)
            else:
                self.arenas[slot] = arena  # the old block is freed once the other side drops it
        else:
            self.ticket = None
            self.one_off += 1
            return _shared_block(nbytes)
        self.generations[slot] += 1
        self.ticket = Ticket(self.worker, slot, self.generations[slot])
        return self.arenas[slot][:nbytes]


class Returns:
    """The training process's side: which slots are lent out, and releasing them when unused.

    `hold` when a batch packed into a slot is handed out; `release_unused()` (at every next
    batch) writes back every held slot whose arena no tensor uses any more. The
    arena of every slot seen stays referenced here, so it stays mapped: the next batch in that
    slot needs no new mapping and no page faults.
    """

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.mapped: dict[tuple[int, int], torch.UntypedStorage] = {}
        self.held: dict[tuple[int, int], int] = {}

    def hold(self, ticket: Ticket, storage: torch.UntypedStorage, *, copied: bool) -> None:
        """A batch of `ticket`'s slot, whose arena is `storage`, is handed out. copied: the
        batch was copied out of the slot (pinned), which is free again at once."""
        key = (ticket.worker, ticket.slot)
        self.mapped[key] = storage
        if copied:
            self.table[key] = ticket.generation
        else:
            self.held[key] = ticket.generation

    def release_unused(self) -> None:
        for key, generation in list(self.held.items()):
            count = _use_count(self.mapped[key])
            if count is not None and count <= 1:  # only our own reference left
                self.table[key] = generation
                del self.held[key]


# --- one buffer per batch on the wire -----------------------------------------------------------


def flat_layout(batch: Batch) -> tuple[torch.Tensor, dict] | None:
    """(the arena, the layout) when every tensor of `batch` is a contiguous view of one storage
    (a batch packed by `collate(..., out=...)`); None otherwise. The layout maps each tensor
    field to (byte offset, bytes, shape, dtype) and keeps the other fields as they are."""
    tensors = batch.tensors()
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    if len(storages) != 1 or not all(t.is_contiguous() for t in tensors.values()):
        return None
    storage = next(iter(tensors.values())).untyped_storage()
    arena = torch.empty(0, dtype=torch.uint8).set_(storage)
    layout = {
        name: (
            t.storage_offset() * t.element_size(),
            t.numel() * t.element_size(),
            t.shape,
            t.dtype,
        )
        for name, t in tensors.items()
    }
    others = {
        f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name not in tensors
    }
    return arena, {"tensors": layout, "others": others}


def batch_from_layout(arena: torch.Tensor, layout: dict) -> Batch:
    """The batch `flat_layout` described, as views of `arena` (no copy)."""
    fields = dict(layout["others"])
    for name, (offset, nbytes, shape, dtype) in layout["tensors"].items():
        fields[name] = arena[offset : offset + nbytes].view(dtype).view(shape)
    return Batch(**fields)


def layout_end(layout: dict) -> int:
    """Bytes of the arena that the layout's tensors reach (what a copy of the batch needs)."""
    return max(offset + nbytes for offset, nbytes, _, _ in layout["tensors"].values())


__all__ = [
    "Returns",
    "SharedBuffers",
    "Ticket",
    "batch_from_layout",
    "flat_layout",
    "layout_end",
    "release_table",
]
