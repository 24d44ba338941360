"""Reading batches ahead of the training step.

The grain pipeline (tokenising, packing) and the host-to-device placement of batch i+1 run
in a thread while step i computes, instead of between steps. Checkpoints must still pair
the model state with the data position of the batches the model has *consumed*, not of
those read ahead: every batch carries the iterator state right after it, and
`consumed_state()` hands Orbax that one.
"""

from __future__ import annotations

import json
import queue
import threading


class _Snapshot:
    """What grain's Orbax handler saves for a non-DatasetIterator item: `get_state()` as
    JSON bytes (the same content the iterator itself would write)."""

    def __init__(self, state):
        self._state = state

    def get_state(self) -> bytes:
        return json.dumps(self._state, indent=4).encode()


class Prefetcher:
    """Iterates `place(next(it))` up to `depth` batches ahead in a daemon thread.

    it: a grain DatasetIterator (restored before the Prefetcher is made); place: host batch ->
    device batch. An exception in the thread is raised by the `next()` that would have
    returned its batch."""

    def __init__(self, it, place, depth: int = 2):
        self._it, self._place = it, place
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._consumed = it.get_state()
        self._thread = threading.Thread(target=self._run, name="dsv2-prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                item = (self._place(batch), self._it.get_state(), None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put((None, None, e))

    def __iter__(self):
        return self

    def __next__(self):
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self._consumed = state
        return batch

    def consumed_state(self) -> _Snapshot:
        """The data position after the last batch `next()` returned, for a checkpoint."""
        return _Snapshot(self._consumed)

    def close(self) -> None:
        self._stop.set()
        # Unblock a producer waiting on a full queue, then let it see the flag.
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=10)
