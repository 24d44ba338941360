"""A corpus: its files, the held-out split, and files read into documents and pieces.

A document is a token array with the UTF-8 bytes each token stands for (for bits per
byte); a piece is <= seq_len tokens of one document with its next-token targets, so a
target never crosses a document's end.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import hashlib
import json
import os
import sysconfig
from typing import Callable, Sequence

import numpy as np

from dsv2_jax.train.data.spec import DataSpec

M64 = (1 << 64) - 1  # seeds are taken modulo 2**64


def is_held_out(key: str, fraction: float) -> bool:
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


def utf8_char_byte_ends(text: str) -> np.ndarray:
    """ends[i] = number of UTF-8 bytes in text[:i] (length len(text) + 1)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lens = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    ends = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(lens, out=ends[1:])
    return ends


@dataclasses.dataclass
class Doc:
    tokens: np.ndarray  # int32 [n]
    nbytes: np.ndarray  # int32 [n]: UTF-8 bytes token i stands for (0 when unknown)


class Corpus:
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
            eval_set = {os.path.realpath(f) for f in eval_files}  # the same file by any name
            self.train_files = [f for f in files if os.path.realpath(f) not in eval_set]
            self.eval_files = eval_files
            self.split_docs = False
        elif self.doc_per_file:
            held = [is_held_out(self.key(f), spec.holdout) for f in files]
            self.train_files = [f for f, h in zip(files, held) if not h]
            self.eval_files = [f for f, h in zip(files, held) if h]
            self.split_docs = False
        else:  # many documents per file: split by document key inside each file
            self.train_files = self.eval_files = files
            self.split_docs = True

    def key(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    # -- loading ---------------------------------------------------------------

    def load(self, path: str, held_out: bool) -> list[Doc]:
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
            if self.split_docs and is_held_out(key, self.spec.holdout) != held_out:
                continue
            doc = make()
            if len(doc.tokens) >= 2:  # a document needs at least one target
                out.append(doc)
        return out

    def _encode(self, texts: Sequence[str]) -> list[Doc]:
        # JSON can carry lone surrogates ("\ud800"), which have no UTF-8 form: they become '?'.
        texts = [t if t.isascii() else t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        if self._tok is None:  # byte-level
            out = []
            for t in texts:
                b = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32)
                out.append(Doc(b, np.ones(len(b), np.int32)))
            return out
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for text, enc in zip(texts, encs):
            ids = np.asarray(enc.ids, dtype=np.int32)
            out.append(Doc(ids, token_bytes(text, enc.offsets)))
        return out

    def _read_text_doc(self, path: str) -> Callable[[], Doc]:
        def make():
            with open(path, "rb") as f:
                raw = f.read()
            if self.byte_level:
                b = np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
                return Doc(b, np.ones(len(b), np.int32))
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
                if self.split_docs and is_held_out(key, self.spec.holdout) != held_out:
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
            return [(rel, lambda p=pieces[0]: Doc(p, zeros(p)))]
        return [(f"{rel}#{i}", lambda p=p: Doc(p, zeros(p))) for i, p in enumerate(pieces)]

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
                pieces.extend(doc_pieces(d, seq_len))
            if seed is not None and len(pieces) > 1:
                order = np.random.default_rng([seed & M64, index]).permutation(len(pieces))
                pieces = [pieces[i] for i in order]
            return pieces

        return load_pieces


def token_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes each token stands for; sums to the text's UTF-8 length.

    Token i covers the bytes from the end of the furthest span seen so far to the
    end of its own span (char offsets from `tokenizers`, mapped to bytes). Bytes a
    pre-tokenizer dropped (e.g. whitespace) go to the next token, trailing ones to
    the last token, and a character split over several tokens counts once.
    """
    ends = utf8_char_byte_ends(text)
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


def doc_pieces(doc: Doc, seq_len: int) -> list[dict[str, np.ndarray]]:
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
