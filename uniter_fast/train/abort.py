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

from ..errors import RunError, report

KEY = "uniter_fast/run_error"


class RunErrorBroadcast:
    """The watcher of one rank (a no-op in a group of one).

    store: the process group's key-value store (rank 0 hosts it); interval: seconds between
    polls, and half the time `announce` waits for the others to read the message.
    """

    def __init__(self, store, rank: int, world_size: int, *, interval: float = 0.5):
        self.store = store
        self.rank = rank
        self.interval = interval
        self.active = world_size > 1 and store is not None
        self._stop = threading.Event()
        self._thread = None
        if self.active:
            self._thread = threading.Thread(target=self._watch, name="run-error-watch", daemon=True)
            self._thread.start()

    @classmethod
    def for_default_group(cls, rank: int, world_size: int) -> RunErrorBroadcast:
        store = None
        if world_size > 1:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        return cls(store, rank, world_size)

    def announce(self, message: str) -> None:
        """Tell every other rank that this one stops with `message`, and give them time to
        read it before this process exits (and, on rank 0, takes the store with it)."""
        if not self.active:
            return
        self._stop.set()  # this rank reports its own message, not another's
        self.store.set(KEY, f"rank {self.rank}: {message}")
        time.sleep(2 * self.interval)

    def stop(self) -> None:
        """End the watcher (before the run's last barrier: rank 0 may exit right after it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                found = self.store.check([KEY])
            except RuntimeError:  # the store went away: its host ended, the run is over
                return
            if found and not self._stop.is_set():
                message = self.store.get(KEY).decode()
                report(RunError(f"the run stopped on {message}"))
                os._exit(1)


__all__ = ["KEY", "RunErrorBroadcast"]
