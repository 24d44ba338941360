"""A small reader and streaming writer for the safetensors format.

Why not the `safetensors` package: its numpy front end cannot represent bfloat16 or FP8, and
its writers take whole shards in memory. Here a tensor is a zero-copy `np.memmap` view
(bfloat16 / float8 via ml_dtypes) and a shard is written tensor by tensor, so host memory stays
bounded by the largest tensor.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data,
offsets relative to the data start, covering it exactly.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from dsv2_jax.checkpoint import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file, validated at open; tensors come back as read-only memmaps."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (header too small)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: corrupted or truncated safetensors header "
                                          f"(header length {n}, file size {size})")
                raw = f.read(n)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: shard file is missing") from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupted safetensors header (invalid JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype or a bad "
                                      f"header entry: {info}") from None
            if (any(d < 0 for d in shape) or begin < 0
                    or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize):
                raise CheckpointError(f"{path}: tensor {name!r} offsets {begin}..{end} do not "
                                      f"match shape {shape} {info['dtype']}")
            self.entries[name] = (info["dtype"], shape, begin, end)
            end_max = max(end_max, end)
        # The tensors must tile the data exactly: no overlap, no gap.
        pos = 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: kv[1][2:]):
            if begin != pos:
                raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, "
                                      f"expected {pos} (overlapping or gapped tensors)")
            pos = end
        if self.data_start + end_max != size:
            raise CheckpointError(
                f"{path}: truncated or corrupted safetensors file: data needs "
                f"{self.data_start + end_max} bytes, file has {size}")
        self._mm = None

    def keys(self):
        return self.entries.keys()

    def dtype_name(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: file does not contain tensor {name!r}")
        dt, shape, begin, end = self.entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.data_start + begin: self.data_start + end]
        return raw.view(DTYPES[dt]).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """Like `get`, but a private copy read with plain file I/O instead of a view of a
        memory map: a converter streaming a whole checkpoint then holds one tensor in memory at
        a time, where touched memmap pages would stay mapped (and counted) until the file is
        closed."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: file does not contain tensor {name!r}")
        dt, shape, begin, end = self.entries[name]
        buf = np.empty(end - begin, np.uint8)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin)
                view, got = memoryview(buf), 0
                while got < len(buf):  # one read() returns at most ~2 GiB on Linux
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: shard file is missing") from None
        if got != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return buf.view(DTYPES[dt]).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the leading dimension (elements of a 1-D tensor), read with
        plain file I/O: only their bytes are read, and nothing stays mapped. How a sharded
        load reads just the part of a tensor one device holds."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: file does not contain tensor {name!r}")
        dt, shape, begin, end = self.entries[name]
        dtype = DTYPES[dt]
        shape = shape or (1,)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        start, stop = max(0, start), min(shape[0], stop)
        buf = np.empty(max(0, stop - start) * row, np.uint8)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin + start * row)
                view, got = memoryview(buf), 0
                while got < len(buf):
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: shard file is missing") from None
        if got != len(buf):
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        out = buf.view(dtype).reshape((max(0, stop - start),) + tuple(shape[1:]))
        return out if self.entries[name][1] else out.reshape(())

    def close(self):
        self._mm = None


class SafetensorsDir:
    """An HF model directory: one `model.safetensors`, or shards named by
    `model.safetensors.index.json`. Maps tensor name -> file, checked against the index."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        index_path = os.path.join(path, self.INDEX)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index "
                                      f"({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: 'weight_map' is not an object")
            for name, fname in weight_map.items():
                # Shards are plain file names inside the directory: no paths, no links out.
                if (not isinstance(fname, str) or os.path.basename(fname) != fname
                        or fname in ("", ".", "..")):
                    raise CheckpointError(f"{index_path}: tensor {name!r} names shard {fname!r}, "
                                          f"which is not a file name inside {path}")
                self.where[name] = fname
            for fname in sorted(set(weight_map.values())):
                self.files[fname] = SafetensorsFile(os.path.join(path, fname))
            for name, fname in self.where.items():
                if name not in self.files[fname].entries:
                    raise CheckpointError(f"{os.path.join(path, fname)}: the index names tensor "
                                          f"{name!r} but the shard does not contain it")
            for fname, sf in self.files.items():
                for name in sf.keys():
                    if self.where.get(name) != fname:
                        raise CheckpointError(f"{os.path.join(path, fname)}: tensor {name!r} is not "
                                              f"listed for this shard in {self.INDEX}")
        elif os.path.exists(os.path.join(path, self.SINGLE)):
            sf = SafetensorsFile(os.path.join(path, self.SINGLE))
            self.files[self.SINGLE] = sf
            self.where = {name: self.SINGLE for name in sf.keys()}
        else:
            raise CheckpointError(f"{path}: no {self.SINGLE} or {self.INDEX}")
        if not self.where:
            raise CheckpointError(f"{path}: the checkpoint holds no tensors")

    def keys(self):
        return self.where.keys()

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor {name!r}")
        return self.files[self.where[name]]

    def get(self, name: str) -> np.ndarray:
        return self.file_of(name).get(name)

    def read(self, name: str) -> np.ndarray:
        """A private copy of one tensor (see `SafetensorsFile.read`)."""
        return self.file_of(name).read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.file_of(name).read_rows(name, start, stop)

    def shape(self, name: str) -> tuple:
        return self.file_of(name).shape(name)

    def dtype_name(self, name: str) -> str:
        return self.file_of(name).dtype_name(name)

    def dominant_dtype(self) -> str:
        """The safetensors dtype name most bytes of the checkpoint are stored in."""
        sizes: dict[str, int] = {}
        for sf in self.files.values():
            for dt, _, b, e in sf.entries.values():
                sizes[dt] = sizes.get(dt, 0) + e - b
        return max(sizes, key=sizes.get)

    def total_bytes(self) -> int:
        return sum(e[3] - e[2] for sf in self.files.values() for e in sf.entries.values())


def write_safetensors(path: str, tensors: Iterable[tuple[str, str, tuple]], produce,
                      metadata: dict | None = None, on_tensor=None) -> None:
    """Writes one file streaming: `tensors` lists (name, dtype_name, shape) in file order,
    `produce(name)` returns each array when its turn comes."""
    tensors = list(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dt, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dt, shape in tensors:
            arr = np.ascontiguousarray(produce(name))
            if arr.dtype != DTYPES[dt] or tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name!r} is {arr.dtype}{arr.shape}, "
                                      f"expected {dt}{tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            if on_tensor is not None:
                on_tensor(name, arr.nbytes)
            del arr

