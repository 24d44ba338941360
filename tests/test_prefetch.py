"""The batch prefetcher (train/prefetch.py) on a fake iterator, without grain or a model:
order, the data position a checkpoint saves, how far it reads ahead, and errors.

The end-to-end resume test (test_train) goes through it too, but at the cost of whole
training runs and without saying which of these broke."""

import json
import threading

import pytest

from dsv2_jax.train.prefetch import Prefetcher


class Counting:
    """A finite iterator with grain's get_state: batch i is {"i": i}; the state after it is
    {"next": i + 1} (the position a resume reads from)."""

    def __init__(self, n, fail_at=None):
        self.n, self.pos, self.fail_at = n, 0, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos == self.fail_at:
            raise RuntimeError(f"bad record {self.pos}")
        if self.pos >= self.n:
            raise StopIteration
        self.pos += 1
        return {"i": self.pos - 1}

    def get_state(self):
        return {"next": self.pos}


def _next_within(it, seconds=5.0):
    """next(it) on a helper thread: (value, exception), or a failure instead of a hang when
    the prefetch thread never hands anything over."""
    box = {}

    def go():
        try:
            box["value"] = next(it)
        except BaseException as e:  # noqa: BLE001 - compared by the caller
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "next() blocked: the prefetch thread handed nothing over"
    return box.get("value"), box.get("error")


def _position(p):
    return json.loads(p.consumed_state().get_state())


def test_batches_come_in_order_placed_and_checkpoints_save_the_consumed_position():
    """Every batch once, in order, through `place`; the position saved after batch i is the
    one right after batch i (a resume then reads batch i + 1), however far the thread has
    read ahead, and before any batch it is the iterator's starting position."""
    src = Counting(6)
    p = Prefetcher(src, lambda b: {"placed": b["i"] * 10}, depth=2)
    try:
        assert _position(p) == {"next": 0}
        for i in range(6):
            batch, err = _next_within(p)
            assert err is None and batch == {"placed": i * 10}
            assert _position(p) == {"next": i + 1}, i
        _, err = _next_within(p)
        assert isinstance(err, StopIteration)  # the data's end reaches the consumer
        assert _position(p) == {"next": 6}
    finally:
        p.close()


def test_reads_at_most_depth_batches_ahead():
    """The thread holds at most `depth` placed batches in the queue (plus the one it is
    placing): an unbounded queue would read, and place on the device, the whole data set."""
    src = Counting(1000)
    p = Prefetcher(src, lambda b: b, depth=2)
    try:
        assert _next_within(p)[0] == {"i": 0}
        for _ in range(50):  # give the producer time to run as far ahead as it may
            if src.pos >= 4:
                break
            threading.Event().wait(0.02)
        threading.Event().wait(0.3)
        assert src.pos <= 1 + 2 + 1, src.pos
    finally:
        p.close()


@pytest.mark.parametrize("where", ["reading", "placing"])
def test_an_error_in_the_thread_is_raised_by_the_next_that_would_return_its_batch(where):
    """Batches before the failure arrive; the next() after them raises the thread's error
    (not a hang), and the saved position stays at the last batch consumed."""
    src = Counting(10, fail_at=3 if where == "reading" else None)

    def place(b):
        if where == "placing" and b["i"] == 3:
            raise ValueError("cannot place batch 3")
        return b

    p = Prefetcher(src, place, depth=2)
    try:
        for i in range(3):
            assert _next_within(p) == ({"i": i}, None)
        _, err = _next_within(p)
        assert isinstance(err, RuntimeError if where == "reading" else ValueError), err
        assert "3" in str(err)
        assert _position(p) == {"next": 3}
    finally:
        p.close()
