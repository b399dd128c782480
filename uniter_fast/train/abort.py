"""When one rank stops on a `RunError`, every rank stops, each with the message in one line.

A `RunError` during the run is often met by one rank alone: its loader read the bad shards, or
none of its shards gives a usable sample. The other ranks are then waiting in a collective for
it, and would end in a transport error and a traceback (gloo: "Connection closed by peer") or
hang until the launcher or NCCL's watchdog kills them. So a rank that stops on purpose first
writes its message into the process group's store (`announce`), and every rank runs a watcher
thread that polls the store and, finding a message, prints it and ends its process with exit
status 1 (`os._exit`: its main thread may be blocked inside a collective that never returns).

A killed run leaves at most an unfinished save, which the next run removes (checkpoint.py).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

from ..errors import RunError, report

# How many poll intervals a rank that may take the store with it waits before exiting, so that
# every other watcher polls at least twice meanwhile, even on a loaded machine.
_GRACE = 4


def _key() -> str:
    # A fresh key per start: torchrun's agent keeps its store across restarts of the workers.
    return f"uniter_fast/run_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


class RunErrorBroadcast:
    """The watcher of one rank (a no-op in a group of one).

    store: a client of the process group's key-value store, for this object alone (so that a
    main thread waiting on its own client never delays a poll); rank 0 hosts the store under
    the deepspeed launcher. interval: seconds between polls; whoever may take the store with it
    (the rank that announces, rank 0) waits `_GRACE` of them before exiting. A rank whose
    collective fails first (its peer exited before its watcher polled) ends with the announced
    message too (`stopped_elsewhere`).
    """

    def __init__(self, store, rank: int, world_size: int, *, interval: float = 0.5):
        self.store = store
        self.rank = rank
        self.interval = interval
        self.key = _key()
        self.active = world_size > 1 and store is not None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._taken = False
        self._thread = None
        if self.active:
            self._thread = threading.Thread(target=self._watch, name="run-error-watch", daemon=True)
            self._thread.start()

    @classmethod
    def for_default_group(cls, rank: int, world_size: int) -> RunErrorBroadcast:
        store = None
        if world_size > 1:
            if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
                from torch.distributed import TCPStore

                store = TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    is_master=False,
                    timeout=timedelta(seconds=60),
                )
            else:  # a group made another way (MPI discovery): share the group's own client
                from torch.distributed import distributed_c10d

                store = distributed_c10d._get_default_store()
        return cls(store, rank, world_size)

    def announce(self, message: str) -> None:
        """Tell every other rank that this one stops with `message`, and give them time to
        read it before this process exits (and, on rank 0, takes the store with it)."""
        if not self.active:
            return
        self._stop.set()  # this rank reports its own message, not another's
        try:
            self.store.set(self.key, f"rank {self.rank}: {message}")
        except RuntimeError:  # the store's host has gone: another rank announced and ended
            return
        time.sleep(_GRACE * self.interval)

    def stopped_elsewhere(self) -> RunError | None:
        """After a collective of this rank failed: the message another rank announced, as the
        RunError to end this rank with (None: nobody announced, the failure is this rank's).

        Once this has returned an error, the watcher stays quiet; if the watcher has already
        taken the message, it is ending the process, and this waits for it."""
        if not self.active:
            return None
        try:
            found = self.store.check([self.key])
            message = self.store.get(self.key).decode() if found else None
        except RuntimeError:
            return None
        if message is None or message.startswith(f"rank {self.rank}: "):
            return None
        if not self._take():
            threading.Event().wait()  # the watcher is printing it and ending the process
        return RunError(f"the run stopped on {message}")

    def _take(self) -> bool:
        """Claim the one report of another rank's message for this thread (False: taken)."""
        with self._lock:
            taken, self._taken = self._taken, True
        return not taken

    def stop(self) -> None:
        """End the watcher (before the run's last barrier: rank 0 may exit right after it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                found = self.store.check([self.key])
                message = self.store.get(self.key).decode() if found else None
            except RuntimeError:  # the store went away: its host ended, the run is over
                return
            if message is not None and not self._stop.is_set() and self._take():
                report(RunError(f"the run stopped on {message}"))
                if self.rank == 0:  # the store's host: let every other watcher read it first
                    time.sleep(_GRACE * self.interval)
                os._exit(1)


__all__ = ["RunErrorBroadcast"]
