"""Whether an Orbax checkpoint's files are damaged: judged from a failed restore's error
(`is_damage`), or probed without a restore (`probe`).

Damage means files missing, cut short or not decodable, as opposed to a failure of the
environment (out of memory, a storage error, a mesh that does not fit the arrays). Training
moves a damaged step aside and falls back to an earlier one; loading for use skips it.
"""

from __future__ import annotations

import os

# What tensorstore / Orbax / the OS say about files that are missing, cut short or not
# decodable, lower-cased. Checked against truncated array files, deleted data and manifest
# files and corrupted metadata (tests/test_multihost.py, tests/test_train_resume.py).
_DAMAGE_MARKERS = ("out_of_range", "data_loss", "not_found", "no such file", "not found",
                   "truncat", "corrupt", "error decoding", "failed to decode", "unexpected end",
                   "jsondecodeerror", "expecting value", "expecting property name",
                   "checksum", "unterminated string")


def is_damage(e: BaseException) -> bool:
    """True when a restore failed because the checkpoint's files are damaged (missing,
    truncated, undecodable), as opposed to a transient or environmental failure."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    if isinstance(e, (MemoryError, PermissionError, TimeoutError, ConnectionError)):
        return False
    if type(e) is OSError:  # EIO and friends: the storage, not the files, may be at fault
        return False
    # Orbax wraps tensorstore's precise reason in a generic message: read the whole chain.
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__}: {e}".lower())
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return any(m in t for t in texts for m in _DAMAGE_MARKERS)


def probe(path: str) -> str | None:
    """Why the Orbax PyTree checkpoint at `path` (a directory holding `_METADATA`) cannot be
    restored, or None when no damage is found. Reads the tree metadata and, of an OCDBT
    checkpoint, the last byte of every stored value (array chunks and their metadata): a
    data file that is missing reads as an empty value and one cut short fails the read, in
    milliseconds where a restore would read and decompress everything. Bytes damaged inside
    a data file that is whole are only found by reading them."""
    import json

    import tensorstore as ts

    path = os.path.abspath(path)  # tensorstore refuses "." and ".." in a file path
    meta = os.path.join(path, "_METADATA")
    try:
        with open(meta) as f:
            json.load(f)
    except FileNotFoundError:
        return f"{meta}: missing"
    except (OSError, ValueError) as e:
        return f"{meta}: {e}"
    if not os.path.exists(os.path.join(path, "manifest.ocdbt")):
        return None  # one file per chunk: a missing one fails its restore
    try:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": path + "/"}}).result()
        keys = kv.list().result()
        reads = [(k, kv.read(k, byte_range=slice(-1, None))) for k in keys]
        for key, fut in reads:
            if len(fut.result().value) != 1:
                return f"{path}: the data of {key.decode()} is missing"
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError / RuntimeError variants
        text = str(e).strip().splitlines()
        return f"{path}: {text[0] if text else type(e).__name__}"
    return None
