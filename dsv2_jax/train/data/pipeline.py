"""The training and evaluation iterators: files in epochs, pieces mixed, packed, batched."""

from __future__ import annotations

import sys
from typing import Sequence

import grain
import numpy as np

from dsv2_jax.train.data.corpus import M64, Corpus
from dsv2_jax.train.data.mixer import PieceMixDataset
from dsv2_jax.train.data.spec import parse_spec

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "num_bytes")

# Number of files whose pieces are interleaved in training; keeps one big file
# (e.g. pydoc_data/topics.py, ~800 KB) from filling whole batches by itself.
TRAIN_CYCLE = 16
# First-fit packing bins: more bins, less padding for short documents.
PACK_BINS = 64


class EpochOrder:
    """Index -> file over endless epochs, each epoch a fresh seeded permutation.

    (grain's MapDataset.shuffle costs ~3 ms per element on a few-element dataset;
    a numpy permutation per epoch costs microseconds.)
    """

    def __init__(self, files: Sequence[str], seed: int):
        self._files = list(files)
        self._seed = seed & M64
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, index: int) -> str:
        epoch, pos = divmod(int(index), len(self._files))
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._files))
            self._perms[epoch] = perm
        return self._files[perm[pos]]


def finalize(batch: dict[str, np.ndarray], batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Packed, batched features -> the trainer's batch dict (int32, [B, L] / [B])."""
    mask = batch["loss_mask"].astype(np.int32)
    out = {
        "inputs": batch["inputs"],
        "targets": batch["targets"],
        "segment_ids": batch["inputs_segment_ids"],
        "positions": batch["inputs_positions"],
        "loss_mask": mask,
        "num_bytes": (batch["target_bytes"].astype(np.int64) * mask).sum(-1),
    }
    out = {k: np.asarray(v, dtype=np.int32) for k, v in out.items()}
    if batch_size is not None and out["inputs"].shape[0] < batch_size:  # pad a last eval batch
        pad = batch_size - out["inputs"].shape[0]
        out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], np.int32)]) for k, v in out.items()}
    return out


def pack(pieces: grain.IterDataset, seq_len: int, *, bins: int, seed: int | None) -> grain.IterDataset:
    """First-fit packing: a piece is never split, so segments start at document (or
    seq_len-chunk) starts; rows are padded where no piece fits. With `seed` None the
    packed rows keep their order (eval)."""
    features = ("inputs", "targets", "loss_mask", "target_bytes")
    return grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={f: seq_len for f in features},
        num_packing_bins=bins,
        seed=0 if seed is None else seed,
        shuffle_bins=seed is not None,
    )


def _check_sizes(seq_len: int, batch_size: int) -> None:
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def make_train_iter(
    spec: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    vocab_size: int | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of training batches for this process.

    Each batch is a dict of int32 numpy arrays: ``inputs``, ``targets``,
    ``segment_ids``, ``positions``, ``loss_mask`` of shape [batch_size, seq_len] and
    ``num_bytes`` of shape [batch_size]. Training files are split round-robin over
    processes (file i goes to process i % process_count), shuffled with `seed`
    (a new order each epoch) and repeated forever. Save/restore with
    ``it.get_state()`` / ``it.set_state()`` or ``grain.checkpoint.CheckpointSave(it)``.
    """
    _check_sizes(seq_len, batch_size)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    parsed = parse_spec(spec)
    rows = None
    if parsed.shard == "global":
        # Every process builds the global batch and keeps its own rows.
        rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
        batch_size, process_index, process_count = batch_size * process_count, 0, 1
    corpus = Corpus(parsed, vocab_size, spec)
    if not corpus.train_files:
        raise ValueError(f"data {spec!r}: no training files are left after the held-out split")
    if len(corpus.train_files) < process_count:  # every process must get a file
        raise ValueError(
            f"data {spec!r}: {len(corpus.train_files)} training file(s) cannot be shared "
            f"by {process_count} processes (files are split per process; split the data "
            "into more files)"
        )
    files = corpus.train_files[process_index::process_count]
    ds = (
        grain.MapDataset.range(sys.maxsize)  # endless: index -> (epoch, position)
        .map(EpochOrder(files, seed))
        .map_with_index(corpus.loader(held_out=False, seq_len=seq_len, seed=seed))
    )
    # Never more open files than the shard has: slots would hold copies of one file.
    cycle = min(TRAIN_CYCLE, len(files))
    ds = PieceMixDataset(ds, cycle=cycle, seed=seed, what=f"data {spec!r} (train)",
                          epoch=len(files))
    ds = pack(ds, seq_len, bins=max(PACK_BINS, batch_size), seed=seed)
    ds = ds.batch(batch_size, drop_remainder=True).map(finalize)
    if rows is not None:
        ds = ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    return iter(ds)


def make_eval_iter(
    spec: str,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    vocab_size: int | None = None,
) -> grain.IterDataset:
    """Held-out batches, finite and deterministic; each ``iter()`` starts over.

    Same batch dict as training. Files are read in sorted order without shuffling;
    the last batch is padded with all-zero rows (loss_mask 0, num_bytes 0) to
    `batch_size`. Every process sees the same eval batches.
    """
    _check_sizes(seq_len, batch_size)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    parsed = parse_spec(spec)
    corpus = Corpus(parsed, vocab_size, spec)
    if not corpus.eval_files or (corpus.split_docs and parsed.holdout <= 0):
        raise ValueError(
            f"data {spec!r}: the held-out split is empty (holdout={parsed.holdout}); "
            "use a larger holdout= or eval=GLOB"
        )
    ds = grain.MapDataset.source(corpus.eval_files).map_with_index(
        corpus.loader(held_out=True, seq_len=seq_len)
    )
    ds = PieceMixDataset(ds, cycle=1, seed=0, what=f"data {spec!r} (held-out)",
                          epoch=len(corpus.eval_files))
    ds = pack(ds, seq_len, bins=PACK_BINS, seed=None).batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda b: finalize(b, batch_size))
    if max_batches is not None:
        ds = grain.experimental.LimitIterDataset(ds, count=max_batches)
    return ds
