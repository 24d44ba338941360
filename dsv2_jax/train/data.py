"""Training and evaluation data for ``dsv2 train``.

A data SPEC names a corpus (see ``docs/data.md`` for the full syntax)::

    stdlib                                  built-in: byte-level Python stdlib sources
    text:GLOB,tokenizer=PATH|bytes          one document per .txt file
    jsonl:GLOB,tokenizer=PATH|bytes[,field=text]   one document per JSON line
    npy:GLOB[,sep=ID]                       pre-tokenised 1-D integer arrays

    common options: holdout=FRACTION (default 0.02), eval=GLOB

Pipeline (all in-process, all grain, all checkpointable)::

    files (sorted) -> held-out split -> per-process shard -> shuffle(seed) -> repeat
      -> lazy per-file load + tokenise (grain MapDataset.map_with_index)
      -> cut documents into pieces of <= seq_len tokens, seeded order within the file
      -> mix pieces of up to 16 open files (seeded; state = a few ints)
      -> grain FirstFitPackIterDataset into [seq_len] rows (pieces never split)
      -> batch -> dict of int32 numpy arrays

Targets are computed per document before packing, so a target is always the next
token of the same document; the last token of every document has ``loss_mask`` 0.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import hashlib
import json
import os
import sys
import sysconfig
from typing import Any, Callable, Sequence

import grain
import numpy as np

__all__ = [
    "DataSpec",
    "parse_spec",
    "make_train_iter",
    "make_eval_iter",
    "BATCH_KEYS",
]

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "num_bytes")

_KINDS = ("stdlib", "text", "jsonl", "npy")
_OPTIONS = {
    "stdlib": {"holdout", "shard"},
    "text": {"tokenizer", "holdout", "eval", "shard"},
    "jsonl": {"tokenizer", "field", "holdout", "eval", "shard"},
    "npy": {"sep", "holdout", "eval", "shard"},
}
_SHARDS = ("process", "global")
_DEFAULT_HOLDOUT = 0.02
_M64 = (1 << 64) - 1
# Number of files whose pieces are interleaved in training; keeps one big file
# (e.g. pydoc_data/topics.py, ~800 KB) from filling whole batches by itself.
_TRAIN_CYCLE = 16
# First-fit packing bins: more bins, less padding for short documents.
_PACK_BINS = 64


# --------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` SPEC."""

    kind: str
    pattern: str | None = None
    tokenizer: str | None = None  # a tokenizer.json path, or "bytes"
    field: str = "text"
    holdout: float = _DEFAULT_HOLDOUT
    eval_pattern: str | None = None
    sep: int | None = None
    # process: each process reads its own files (scales with hosts); global: every process
    # builds the whole global batch and keeps its rows (the stream does not depend on the
    # process count, at the cost of every host reading everything).
    shard: str = "process"


def parse_spec(spec: str) -> DataSpec:
    """Parses a SPEC string; raises ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    head, *opts = [p.strip() for p in spec.strip().split(",")]
    kind, colon, pattern = head.partition(":")
    kind = kind.strip()
    if kind not in _KINDS:
        raise ValueError(
            f"data spec {spec!r}: unknown source {kind!r}; expected one of "
            "stdlib, text:GLOB, jsonl:GLOB, npy:GLOB"
        )
    if kind == "stdlib":
        if colon:
            raise ValueError(f"data spec {spec!r}: 'stdlib' takes no ':GLOB'")
        pattern = None
    elif not pattern:
        raise ValueError(f"data spec {spec!r}: '{kind}:' needs a file GLOB after the colon")

    values: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"data spec {spec!r}: option {opt!r} is not KEY=VALUE")
        if key not in _OPTIONS[kind]:
            allowed = ", ".join(sorted(_OPTIONS[kind])) or "none"
            raise ValueError(
                f"data spec {spec!r}: option {key!r} does not apply to '{kind}' "
                f"(allowed: {allowed})"
            )
        if key in values:
            raise ValueError(f"data spec {spec!r}: option {key!r} given twice")
        values[key] = value

    holdout = _DEFAULT_HOLDOUT
    if "holdout" in values:
        try:
            holdout = float(values["holdout"])
        except ValueError:
            raise ValueError(
                f"data spec {spec!r}: holdout={values['holdout']!r} is not a number"
            ) from None
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"data spec {spec!r}: holdout must be in [0, 1), got {holdout}")
    if "eval" in values and "holdout" in values:
        raise ValueError(f"data spec {spec!r}: give either eval=GLOB or holdout=, not both")

    sep = None
    if "sep" in values:
        try:
            sep = int(values["sep"])
        except ValueError:
            raise ValueError(f"data spec {spec!r}: sep={values['sep']!r} is not an integer") from None
        if sep < 0:
            raise ValueError(f"data spec {spec!r}: sep must be a token id >= 0")

    shard = values.get("shard", "process")
    if shard not in _SHARDS:
        raise ValueError(f"data spec {spec!r}: shard={shard!r}; expected one of {', '.join(_SHARDS)}")

    tokenizer = values.get("tokenizer")
    if kind in ("text", "jsonl") and tokenizer is None:
        raise ValueError(
            f"data spec {spec!r}: '{kind}' data needs tokenizer=PATH/to/tokenizer.json "
            "(or tokenizer=bytes for byte-level tokens, vocab 256)"
        )
    if tokenizer not in (None, "bytes"):
        tokenizer = os.path.expanduser(tokenizer)
        if os.path.isdir(tokenizer):  # a model folder: its tokenizer.json
            inside = os.path.join(tokenizer, "tokenizer.json")
            if not os.path.isfile(inside):
                raise ValueError(f"data spec {spec!r}: tokenizer folder {tokenizer!r} has no "
                                 f"tokenizer.json")
            tokenizer = inside
        elif not os.path.isfile(tokenizer):
            raise ValueError(f"data spec {spec!r}: tokenizer file {tokenizer!r} does not exist")

    return DataSpec(
        kind=kind,
        pattern=os.path.expanduser(pattern) if pattern else None,
        tokenizer=tokenizer,
        field=values.get("field", "text"),
        holdout=holdout,
        eval_pattern=os.path.expanduser(values["eval"]) if "eval" in values else None,
        sep=sep,
        shard=shard,
    )


# ------------------------------------------------------------------------- corpus


def _is_held_out(key: str, fraction: float) -> bool:
    """Deterministic, machine-independent split decision for one document key."""
    if fraction <= 0.0:
        return False
    # surrogateescape: a file name that is not UTF-8 keeps its own bytes
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "little")
    return h < fraction * 2.0**64


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard (for relative keys)."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    root = os.sep.join(fixed) or "."
    if len(fixed) == len(parts):  # no wildcard: a single file
        root = os.path.dirname(root) or "."
    return os.path.abspath(root)


def _glob_files(pattern: str, what: str) -> list[str]:
    files = sorted(
        os.path.abspath(p) for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p)
    )
    if not files:
        raise ValueError(f"{what}: no files match {pattern!r}")
    return files


def _stdlib_files() -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        found.extend(os.path.join(d, f) for f in files if f.endswith(".py"))
    if not found:
        raise ValueError(f"stdlib corpus: no *.py files under {root!r}")
    return root, sorted(found, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def _utf8_char_byte_ends(text: str) -> np.ndarray:
    """ends[i] = number of UTF-8 bytes in text[:i] (length len(text) + 1)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lens = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    ends = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(lens, out=ends[1:])
    return ends


@dataclasses.dataclass
class _Doc:
    tokens: np.ndarray  # int32 [n]
    nbytes: np.ndarray  # int32 [n]: UTF-8 bytes token i stands for (0 when unknown)


class _Corpus:
    """Files, the held-out split and per-file loading into documents."""

    def __init__(self, spec: DataSpec, vocab_size: int | None, spec_text: str):
        self.spec = spec
        self.spec_text = spec_text
        self.vocab_size = vocab_size
        self._tok = None
        self.byte_level = spec.kind == "stdlib" or spec.tokenizer == "bytes"
        if self.byte_level and vocab_size is not None and vocab_size < 256:
            raise ValueError(
                f"data {spec_text!r} is byte-level (token ids 0..255) but the model "
                f"vocab_size is {vocab_size}"
            )
        if spec.tokenizer not in (None, "bytes"):
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_file(spec.tokenizer)
            except Exception as e:  # tokenizers raises a plain Exception
                raise ValueError(f"cannot load tokenizer {spec.tokenizer!r}: {e}") from None
            ids = self._tok.get_vocab(with_added_tokens=True).values()
            top = max(ids, default=-1)
            if vocab_size is not None and top >= vocab_size:
                raise ValueError(
                    f"tokenizer {spec.tokenizer!r} has token ids up to {top} ({len(ids)} tokens) "
                    f"but the model vocab_size is {vocab_size}"
                )

        if spec.kind == "stdlib":
            self.root, files = _stdlib_files()
        else:
            self.root = _glob_root(spec.pattern)
            files = _glob_files(spec.pattern, f"data {spec_text!r}")
        # A file is one document for stdlib/text/npy-without-sep: split whole files,
        # so the train file list (and so the process shards) is exact.
        self.doc_per_file = spec.kind in ("stdlib", "text") or (
            spec.kind == "npy" and spec.sep is None
        )
        if spec.eval_pattern is not None:
            eval_files = _glob_files(spec.eval_pattern, f"data {spec_text!r} eval=")
            eval_set = set(eval_files)
            self.train_files = [f for f in files if f not in eval_set]
            self.eval_files = eval_files
            self.split_docs = False
        elif self.doc_per_file:
            held = [_is_held_out(self.key(f), spec.holdout) for f in files]
            self.train_files = [f for f, h in zip(files, held) if not h]
            self.eval_files = [f for f, h in zip(files, held) if h]
            self.split_docs = False
        else:  # many documents per file: split by document key inside each file
            self.train_files = self.eval_files = files
            self.split_docs = True

    def key(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    # -- loading ---------------------------------------------------------------

    def load(self, path: str, held_out: bool) -> list[_Doc]:
        """Reads one file into the documents of the requested side of the split."""
        kind = self.spec.kind
        if kind in ("stdlib", "text"):
            docs = [(self.key(path), self._read_text_doc(path))]
        elif kind == "jsonl":
            docs = self._read_jsonl(path, held_out)
        else:
            docs = self._read_npy(path)
        out = []
        for key, make in docs:
            if self.split_docs and _is_held_out(key, self.spec.holdout) != held_out:
                continue
            doc = make()
            if len(doc.tokens) >= 2:  # a document needs at least one target
                out.append(doc)
        return out

    def _encode(self, texts: Sequence[str]) -> list[_Doc]:
        # JSON can carry lone surrogates ("\ud800"), which have no UTF-8 form: they become '?'.
        texts = [t if t.isascii() else t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        if self._tok is None:  # byte-level
            out = []
            for t in texts:
                b = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32)
                out.append(_Doc(b, np.ones(len(b), np.int32)))
            return out
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for text, enc in zip(texts, encs):
            ids = np.asarray(enc.ids, dtype=np.int32)
            out.append(_Doc(ids, _token_bytes(text, enc.offsets)))
        return out

    def _read_text_doc(self, path: str) -> Callable[[], _Doc]:
        def make():
            with open(path, "rb") as f:
                raw = f.read()
            if self.byte_level:
                b = np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
                return _Doc(b, np.ones(len(b), np.int32))
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
            return self._encode([text])[0]

        return make

    def _read_jsonl(self, path: str, held_out: bool):
        rel = self.key(path)
        keys, texts = [], []
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e})") from None
                if not line.strip():
                    continue
                key = f"{rel}:{lineno}"
                if self.split_docs and _is_held_out(key, self.spec.holdout) != held_out:
                    continue  # skip parsing and tokenising the other side of the split
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
                if not isinstance(rec, dict) or self.spec.field not in rec:
                    raise ValueError(f"{path}:{lineno}: no {self.spec.field!r} field")
                text = rec[self.spec.field]
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{lineno}: field {self.spec.field!r} is "
                        f"{type(text).__name__}, not a string"
                    )
                keys.append(key)
                texts.append(text)
        docs = self._encode(texts) if texts else []
        return [(k, (lambda d=d: d)) for k, d in zip(keys, docs)]

    def _read_npy(self, path: str):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as .npy ({e})") from None
        if not isinstance(arr, np.ndarray):  # an .npz archive: several arrays, not one
            arr.close()
            raise ValueError(f"{path}: expected a 1-D integer array of token ids (.npy), got an "
                             f".npz archive")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"{path}: expected a 1-D integer array of token ids, got "
                f"shape {arr.shape} dtype {arr.dtype}"
            )
        arr = np.asarray(arr)
        if len(arr):
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0:
                raise ValueError(f"{path}: negative token id {lo}")
            if self.vocab_size is not None and hi >= self.vocab_size:
                raise ValueError(
                    f"{path}: token id {hi} does not fit the model vocab_size {self.vocab_size}"
                )
        arr = arr.astype(np.int32)
        rel = self.key(path)
        if self.spec.sep is None:
            pieces = [arr]
        else:  # the separator ends (and stays in) the document it closes
            cuts = np.flatnonzero(arr == self.spec.sep) + 1
            pieces = [p for p in np.split(arr, cuts) if len(p)]
        zeros = lambda p: np.zeros(len(p), np.int32)  # bytes unknown for npy
        if self.spec.sep is None:
            return [(rel, lambda p=pieces[0]: _Doc(p, zeros(p)))]
        return [(f"{rel}#{i}", lambda p=p: _Doc(p, zeros(p))) for i, p in enumerate(pieces)]

    def loader(
        self, held_out: bool, seq_len: int, seed: int | None = None
    ) -> Callable[[int, str], list[dict]]:
        """The per-file map function: (index, path) -> pieces of its documents.

        With a seed the pieces come in an order drawn from (seed, index): a file read
        again in a later epoch (a new index) is shuffled anew, and a restore that
        re-reads it (same index) sees the same order.
        """

        def load_pieces(index: int, path: str) -> list[dict[str, np.ndarray]]:
            pieces = []
            for d in self.load(path, held_out):
                pieces.extend(_doc_pieces(d, seq_len))
            if seed is not None and len(pieces) > 1:
                order = np.random.default_rng([seed & _M64, index]).permutation(len(pieces))
                pieces = [pieces[i] for i in order]
            return pieces

        return load_pieces


def _token_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes each token stands for; sums to the text's UTF-8 length.

    Token i covers the bytes from the end of the furthest span seen so far to the
    end of its own span (char offsets from `tokenizers`, mapped to bytes). Bytes a
    pre-tokenizer dropped (e.g. whitespace) go to the next token, trailing ones to
    the last token, and a character split over several tokens counts once.
    """
    ends = _utf8_char_byte_ends(text)
    n = len(offsets)
    out = np.zeros(n, np.int64)
    if n == 0:
        return out.astype(np.int32)
    span_end = np.fromiter((e for _, e in offsets), dtype=np.int64, count=n)
    span_end = np.clip(span_end, 0, len(text))
    cum = np.maximum.accumulate(ends[span_end])
    out[0] = cum[0]
    out[1:] = np.diff(cum)
    out[-1] += ends[-1] - cum[-1]
    return out.astype(np.int32)


def _doc_pieces(doc: _Doc, seq_len: int) -> list[dict[str, np.ndarray]]:
    """One document -> pieces of <= seq_len tokens with per-token next-token targets."""
    t = doc.tokens
    n = len(t)
    targets = np.zeros(n, np.int32)
    targets[:-1] = t[1:]
    mask = np.ones(n, np.int32)
    mask[-1] = 0
    tbytes = np.zeros(n, np.int32)
    tbytes[:-1] = doc.nbytes[1:]
    return [
        {
            "inputs": t[s : s + seq_len],
            "targets": targets[s : s + seq_len],
            "loss_mask": mask[s : s + seq_len],
            "target_bytes": tbytes[s : s + seq_len],
        }
        for s in range(0, n, seq_len)
    ]


# -------------------------------------------------------------------------- mixer

def _mix64(x: int) -> int:
    """A 64-bit integer hash (splitmix64 finaliser): cheap, stateless, deterministic."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class _PieceMixDataset(grain.IterDataset):
    """Pieces of `cycle` files at a time, drawn in a seeded order.

    `files` is a random-access grain MapDataset whose element i is the list of
    pieces of the i-th file in (shuffled, repeated) order; it is read lazily. The
    iterator state is a few integers: which file each slot holds and how far into
    it, the next file index and the draw counter; restoring re-reads the open files.
    """

    def __init__(
        self, files: grain.MapDataset, *, cycle: int, seed: int, what: str, epoch: int
    ):
        super().__init__(files)
        self._files = files
        self._cycle = cycle
        self._seed = seed
        self._what = what
        self._epoch = epoch  # files per epoch: a whole epoch of empty files is an error

    def __iter__(self):
        return _PieceMixIterator(self._files, self._cycle, self._seed, self._what, self._epoch)

    def __str__(self):
        return f"_PieceMixDataset(cycle={self._cycle})"


class _PieceMixIterator(grain.DatasetIterator):
    def __init__(self, files: grain.MapDataset, cycle: int, seed: int, what: str, epoch: int):
        super().__init__()
        self._epoch = epoch
        self._files = files
        self._num_files = len(files)
        self._cycle = cycle
        self._seed_key = _mix64(seed & _M64)
        self._what = what
        self._next_file = 0
        self._draw = 0
        self._produced = 0
        self._slots = [[-1, 0] for _ in range(cycle)]  # [file index, next piece]
        self._pieces: list[list[dict] | None] = [None] * cycle

    def _fill(self) -> None:
        empty_run = 0
        for k in range(self._cycle):
            while self._slots[k][0] < 0 and self._next_file < self._num_files:
                i = self._next_file
                self._next_file += 1
                pieces = self._files[i]
                if pieces:
                    self._slots[k] = [i, 0]
                    self._pieces[k] = pieces
                    empty_run = 0
                else:
                    # Each epoch is every file once, so a corpus with any document has at
                    # most 2 * epoch - 2 empty files in a row (the end of one epoch and the
                    # start of the next); 2 * epoch - 1 in a row holds a whole empty epoch.
                    empty_run += 1
                    if empty_run >= 2 * self._epoch - 1:
                        raise ValueError(f"{self._what}: no documents with 2 or more tokens")

    def __next__(self) -> dict[str, np.ndarray]:
        self._fill()
        active = [k for k in range(self._cycle) if self._slots[k][0] >= 0]
        if not active:
            if self._produced == 0:
                raise ValueError(f"{self._what}: no documents with 2 or more tokens")
            raise StopIteration
        k = active[_mix64(self._seed_key ^ self._draw) % len(active)]
        self._draw += 1
        slot = self._slots[k]
        pieces = self._pieces[k]
        piece = pieces[slot[1]]
        slot[1] += 1
        if slot[1] >= len(pieces):
            self._slots[k] = [-1, 0]
            self._pieces[k] = None
        self._produced += 1
        return piece

    def get_state(self) -> dict[str, Any]:
        return {
            "next_file": self._next_file,
            "draw": self._draw,
            "produced": self._produced,
            "slots": [list(s) for s in self._slots],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        slots = [[int(i), int(o)] for i, o in state["slots"]]
        if len(slots) != self._cycle:
            raise ValueError(
                f"data iterator state has {len(slots)} slots, this pipeline has {self._cycle}"
            )
        self._next_file = int(state["next_file"])
        self._draw = int(state["draw"])
        self._produced = int(state["produced"])
        self._slots = slots
        self._pieces = [self._files[i] if i >= 0 else None for i, _ in slots]

    def __str__(self):
        return "_PieceMixIterator"


# ----------------------------------------------------------------------- pipeline


class _EpochOrder:
    """Index -> file over endless epochs, each epoch a fresh seeded permutation.

    (grain's MapDataset.shuffle costs ~3 ms per element on a few-element dataset;
    a numpy permutation per epoch costs microseconds.)
    """

    def __init__(self, files: Sequence[str], seed: int):
        self._files = list(files)
        self._seed = seed & _M64
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



def _finalize(batch: dict[str, np.ndarray], batch_size: int | None = None) -> dict[str, np.ndarray]:
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


def _pack(pieces: grain.IterDataset, seq_len: int, *, bins: int, seed: int | None) -> grain.IterDataset:
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
    corpus = _Corpus(parsed, vocab_size, spec)
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
        .map(_EpochOrder(files, seed))
        .map_with_index(corpus.loader(held_out=False, seq_len=seq_len, seed=seed))
    )
    # Never more open files than the shard has: slots would hold copies of one file.
    cycle = min(_TRAIN_CYCLE, len(files))
    ds = _PieceMixDataset(ds, cycle=cycle, seed=seed, what=f"data {spec!r} (train)",
                          epoch=len(files))
    ds = _pack(ds, seq_len, bins=max(_PACK_BINS, batch_size), seed=seed)
    ds = ds.batch(batch_size, drop_remainder=True).map(_finalize)
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
    corpus = _Corpus(parsed, vocab_size, spec)
    if not corpus.eval_files or (corpus.split_docs and parsed.holdout <= 0):
        raise ValueError(
            f"data {spec!r}: the held-out split is empty (holdout={parsed.holdout}); "
            "use a larger holdout= or eval=GLOB"
        )
    ds = grain.MapDataset.source(corpus.eval_files).map_with_index(
        corpus.loader(held_out=True, seq_len=seq_len)
    )
    ds = _PieceMixDataset(ds, cycle=1, seed=0, what=f"data {spec!r} (held-out)",
                          epoch=len(corpus.eval_files))
    ds = _pack(ds, seq_len, bins=_PACK_BINS, seed=None).batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda b: _finalize(b, batch_size))
    if max_batches is not None:
        ds = grain.experimental.LimitIterDataset(ds, count=max_batches)
    return ds
