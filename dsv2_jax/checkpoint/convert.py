"""`dsv2 convert SRC DST --to orbax|hf`: checkpoints between HF safetensors and dsv2_jax Orbax.

Both directions stream one HF tensor at a time (see `orbax_io` for how stacked arrays are
written and read slice by slice), so host memory stays a small multiple of the largest tensor
whatever the checkpoint size. Nothing is cast unless `--dtype` asks, except exact widenings
the model needs (its router is always float32); the dtype every HF tensor had is recorded in
`dsv2_convert.json` and restored on the way back, so HF -> Orbax -> HF is bit-exact.

Bad input (damaged/missing shards, index/shard disagreement, unknown model_type, config vs
tensor shapes, missing/unexpected tensors, FP8 without usable scales, an existing DST) stops
before anything is written, with one line naming the file or tensor. Output goes to a
temporary sibling of DST, renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

import numpy as np

from dsv2_jax.checkpoint import CheckpointError, DamagedCheckpointWarning, path_problem
from dsv2_jax.checkpoint import fp8 as fp8_lib
from dsv2_jax.checkpoint import orbax_io
from dsv2_jax.checkpoint.hf import PARAM_DTYPES
from dsv2_jax.checkpoint.safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsDir, write_safetensors

DEFAULT_SHARD_BYTES = 5 * 10**9
# Orbax writes commit an OCDBT transaction every max(largest tensor, this) bytes (orbax_io).
MIN_COMMIT_BYTES = 16 << 20
_HF_NAMES = {v: k for k, v in PARAM_DTYPES.items()}
# (from, to) pairs where every value of `from` is exactly a value of `to`.
_EXACT = {("BF16", "F32"), ("F16", "F32"), ("F8_E4M3", "BF16"), ("F8_E4M3", "F16"),
          ("F8_E4M3", "F32"), ("F8_E5M2", "BF16"), ("F8_E5M2", "F16"), ("F8_E5M2", "F32")}
# Non-weight files that travel with a checkpoint.
_AUX_FILE = re.compile(r"tokenizer.*\.(json|model|txt)|vocab\.(json|txt)|merges\.txt|"
                       r"special_tokens_map\.json|added_tokens\.json|generation_config\.json|"
                       r"chat_template\.(json|jinja)|[\w\-]+\.py|README\.md|LICENSE.*")
_AUX_MAX_BYTES = 100 << 20


def exact_cast(src: str, dst: str) -> bool:
    return src == dst or (src, dst) in _EXACT


def _dtname(dt) -> str:
    return DTYPE_NAMES[np.dtype(dt)]


# --------------------------------------------------------------------------------------------
# Sources: each yields HF tensors (name, layout and dtype of the HF checkpoint).


def _read_config(path: str):
    from dsv2_jax.config import DeepseekV2Config

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing (an HF checkpoint directory needs its config.json)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    try:
        return DeepseekV2Config.from_hf(raw), raw
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


# config.json keys of an HF source that are not the model's and travel unchanged to an HF
# destination (e.g. `auto_map`, `use_cache`), except these: what the destination's own
# tensors and writer decide, and what would describe tensors that are no longer there.
_NOT_CARRIED = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
                "quantization_config", "rope_parameters", "dsv2_jax", "_name_or_path"}


def _config_extras(raw: dict) -> dict:
    from dsv2_jax.config import DeepseekV2Config

    ours = set(DeepseekV2Config.hf_field_names())
    return {k: v for k, v in raw.items() if k not in ours and k not in _NOT_CARRIED}


class HFSource:
    kind = "hf"

    def __init__(self, path: str):
        self.path = path
        self.cfg, raw = _read_config(path)
        self.config_extras = _config_extras(raw)
        self.st = SafetensorsDir(path)
        self.block = fp8_lib.block_size(raw)
        has_fp8 = any(fp8_lib.is_fp8(self.st.dtype_name(n)) or n.endswith(fp8_lib.SCALE_SUFFIX)
                      for n in self.st.keys())
        self.fp8 = fp8_lib.check_fp8(self.st, self.block) if has_fp8 else {}

    def default_param_dtype(self) -> str:
        if self.fp8:
            raise CheckpointError(
                f"{self.path}: {len(self.fp8)} tensors are FP8 with block-wise weight_scale_inv "
                f"({self.block[0]}x{self.block[1]}); pass --dtype bfloat16 or --dtype float32 to "
                f"dequantise them (w = fp8 * scale_inv per block, computed in float32)")
        dt = self.st.dominant_dtype()
        if dt not in PARAM_DTYPES:
            raise CheckpointError(f"{self.path}: most weights are {dt}; pass --dtype to choose a "
                                  f"parameter dtype")
        return PARAM_DTYPES[dt]

    def check(self, entries, abs_flat) -> None:
        from dsv2_jax.checkpoint.hf import check_tensors

        check_tensors(self.st, entries, allow_fp8=bool(self.fp8))

    def stored_dtype(self, e) -> str:
        return self.st.dtype_name(e.hf_name)

    def original_dtype(self, e) -> str:
        return "F32" if e.hf_name in self.fp8 else self.stored_dtype(e)

    def where(self, e) -> str:
        return self.st.file_of(e.hf_name).path

    def read(self, e, dtype: np.dtype) -> np.ndarray:
        """HF layout, cast to `dtype` (FP8 weights dequantised)."""
        arr = self.st.read(e.hf_name)
        if e.hf_name in self.fp8:
            scale = self.st.read(self.fp8[e.hf_name])
            try:
                return fp8_lib.dequantize(arr, scale, self.block, dtype)
            except CheckpointError as err:
                raise CheckpointError(f"{self.where(e)}: {e.hf_name!r}: {err}") from None
        return arr.astype(dtype, copy=False)


class OrbaxSource:
    kind = "orbax"

    def __init__(self, path: str):
        self.path = path
        self.cfg, _ = _read_config(path)
        self.dir, self.prefix = orbax_io.params_location(path)
        self.reader = orbax_io.OrbaxParams(self.dir, self.prefix)
        self.meta = orbax_io.read_meta(path)
        self.config_extras = self.meta.get("hf_config_extras") or {}
        hf = self.meta.get("hf_dtypes") or {}
        self._hf_default = hf.get("default")
        self._hf_except = hf.get("tensors") or {}

    def default_param_dtype(self) -> str:
        return self.cfg.param_dtype

    def check(self, entries, abs_flat) -> None:
        orbax_io.check_params(self.dir, {p: v.shape for p, v in abs_flat.items()}, self.prefix)
        for p in abs_flat:
            dt = self.reader.dtype(p)
            if dt not in DTYPE_NAMES:
                raise CheckpointError(f"{self.reader.dir}: parameter {orbax_io.param_name(p)!r} has "
                                      f"unsupported dtype {dt}")

    def stored_dtype(self, e) -> str:
        return _dtname(self.reader.dtype(e.path))

    def original_dtype(self, e) -> str:
        return self._hf_except.get(e.hf_name) or self._hf_default or self.stored_dtype(e)

    def where(self, e) -> str:
        return f"{self.reader.dir}:{orbax_io.param_name(e.path)}{list(e.index)}"

    def read(self, e, dtype: np.dtype) -> np.ndarray:
        arr = self.reader.read(e.path, e.index)
        if e.transpose:
            arr = np.ascontiguousarray(arr.T)
        return arr.astype(dtype, copy=False)


def open_source(path: str):
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if orbax_io.is_orbax_checkpoint(path) or orbax_io.is_training_workdir(path):
        return OrbaxSource(path)
    return HFSource(path)


# --------------------------------------------------------------------------------------------
# Progress.


class Progress:
    """A tqdm bar (tensors and bytes) on a terminal; a few plain lines otherwise."""

    def __init__(self, total_tensors: int, total_bytes: int, desc: str, enabled: bool = True):
        self.n, self.total, self.bytes, self.total_bytes = 0, total_tensors, 0, total_bytes
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.next_report = 0.1
        self.t0 = time.perf_counter()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc, file=sys.stderr, dynamic_ncols=True)
        elif enabled:
            print(f"{desc}: {total_tensors} tensors, {total_bytes / 1e9:.2f} GB", flush=True)

    def tensor(self, name: str, nbytes: int) -> None:
        self.n += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.n}/{self.total} tensors", refresh=False)
        elif self.enabled and self.total_bytes and self.bytes / self.total_bytes >= self.next_report:
            dt = time.perf_counter() - self.t0
            print(f"  {self.n}/{self.total} tensors, {self.bytes / 1e9:.2f}/"
                  f"{self.total_bytes / 1e9:.2f} GB, {self.bytes / 1e6 / max(dt, 1e-9):.0f} MB/s",
                  flush=True)
            while self.next_report <= self.bytes / self.total_bytes:
                self.next_report += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# Sinks.


def _write_orbax(tmp: str, cfg, entries, abs_flat, src, progress, commit_bytes: int) -> None:
    groups: dict[tuple, list] = {}
    for e in entries:
        groups.setdefault(e.path, []).append(e)
    tree = {}
    for path, es in groups.items():
        var = abs_flat[path]
        dt = np.dtype(var.dtype)

        def blocks(es=es, dt=dt):
            for e in es:
                a = src.read(e, dt)
                yield e.index, (a.T if e.transpose else a)
                progress.tensor(e.hf_name, a.nbytes)
                del a

        tree[path] = orbax_io.StreamedArray(tuple(var.shape), dt, len(es[0].index), blocks)
    orbax_io.save_streamed(os.path.join(tmp, orbax_io.PARAMS_DIR), orbax_io.nest(tree),
                           commit_bytes=commit_bytes)
    cfg.save(tmp)


def _write_hf(tmp: str, cfg, entries, targets: dict, src, progress, shard_bytes: int,
              verify_narrowing: set) -> None:
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = int(np.prod(e.shape, dtype=np.int64)) * DTYPES[targets[e.hf_name]].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    by_name = {e.hf_name: e for e in entries}
    weight_map, total = {}, 0

    def produce(name):
        e = by_name[name]
        dt = DTYPES[targets[name]]
        if name in verify_narrowing:
            wide = src.read(e, np.dtype(src.reader.dtype(e.path)))
            arr = wide.astype(dt)
            if not np.array_equal(arr.astype(wide.dtype).view(np.uint8), wide.view(np.uint8)):
                raise CheckpointError(
                    f"{src.where(e)}: tensor {name!r} holds values not exactly representable in "
                    f"{targets[name]}, the dtype it had at the HF source; pass --dtype to choose")
            return arr
        return src.read(e, dt)

    n = len(shards)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(tmp, fname),
                          [(e.hf_name, targets[e.hf_name], e.shape) for e in shard], produce,
                          metadata={"format": "pt"}, on_tensor=progress.tensor)
        for e in shard:
            weight_map[e.hf_name] = fname
            total += int(np.prod(e.shape, dtype=np.int64)) * DTYPES[targets[e.hf_name]].itemsize
    with open(os.path.join(tmp, SafetensorsDir.INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    d = {**src.config_extras, **cfg.to_hf_dict()}
    d["torch_dtype"] = written_dtype(entries, targets)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)


def written_dtype(entries, targets: dict) -> str:
    """The dtype most of the written bytes have, as config.json's `torch_dtype` names it."""
    by: dict[str, int] = {}
    for e in entries:
        t = targets[e.hf_name]
        by[t] = by.get(t, 0) + int(np.prod(e.shape, dtype=np.int64)) * DTYPES[t].itemsize
    return PARAM_DTYPES.get(max(by, key=by.get), "float32")


def _copy_aux_files(src: str, dst: str) -> list[str]:
    """The tokenizer and generation files of the source directory (known names only, regular
    files inside SRC: a symlink pointing elsewhere is not followed into DST)."""
    copied = []
    root = os.path.realpath(src)
    for name in sorted(os.listdir(src)):
        p = os.path.join(src, name)
        real = os.path.realpath(p)
        if (not _AUX_FILE.fullmatch(name) or not os.path.isfile(p)
                or (os.path.islink(p) and os.path.commonpath([root, real]) != root
                    and "/blobs/" not in real)  # the HF hub cache links into its blobs/
                or os.path.getsize(p) > _AUX_MAX_BYTES):
            continue
        shutil.copy2(p, os.path.join(dst, name))
        copied.append(name)
    return copied


def _install(tmp: str, dst: str, overwrite: bool) -> None:
    """Moves the finished output into place. Without --overwrite a DST that appeared while we
    ran is refused, never replaced; with it, the old DST is restored if the swap fails."""
    if not os.path.lexists(dst):
        try:
            os.rename(tmp, dst)
            return
        except OSError:
            if not os.path.lexists(dst):
                raise
    if not overwrite:
        raise CheckpointError(f"{dst}: appeared while converting; refusing to replace it "
                              f"without --overwrite")
    old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.dsv2-old-{os.getpid()}")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _remove(old)


def _remove_stale_temporaries(dst: str) -> None:
    """Temporary siblings left by conversions that were killed (their process is gone)."""
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    if not os.path.isdir(parent):
        return
    pattern = re.compile(rf"\.{re.escape(base)}\.dsv2-(?:tmp|old)-(\d+)")
    for name in os.listdir(parent):
        m = pattern.fullmatch(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if "-old-" in name and not os.path.lexists(dst):
            os.rename(os.path.join(parent, name), dst)  # a swap that died half-way: put it back
        else:
            _remove(os.path.join(parent, name))


# --------------------------------------------------------------------------------------------
# The conversion.


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rs == rd or rd.startswith(rs + os.sep) or rs.startswith(rd + os.sep):
        raise CheckpointError(f"{dst}: destination overlaps the source {src}")
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def convert(src: str, dst: str, to: str, *, dtype: str | None = None, overwrite: bool = False,
            shard_bytes: int = DEFAULT_SHARD_BYTES, commit_bytes: int | None = None,
            progress: bool = True) -> dict:
    """Converts checkpoint directory `src` (HF safetensors or dsv2_jax Orbax, detected) into
    `dst` in format `to` ('orbax' or 'hf'). Returns a few statistics. Raises
    `CheckpointError` on bad input, before writing anything."""
    from flax import nnx

    from dsv2_jax.checkpoint.hf import _flat, abstract_model, param_map

    if to not in ("orbax", "hf"):
        raise CheckpointError(f"--to {to!r}: expected 'orbax' or 'hf'")
    if dtype is not None and dtype not in _HF_NAMES:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of {sorted(_HF_NAMES)}")
    src, dst = (os.path.abspath(os.path.expanduser(os.fspath(p))) for p in (src, dst))
    for p in (src, dst):
        if why := path_problem(p):
            raise CheckpointError(f"{p}: {why}")
    _remove_stale_temporaries(dst)  # first: a half-done swap's DST comes back before the check
    _check_destination(src, dst, overwrite)
    source = open_source(src)
    pdt = dtype or source.default_param_dtype()
    cfg = source.cfg.replace(param_dtype=pdt)
    if source.kind == "hf" or dtype is not None:
        # The loaders' rule, so that both forms of one checkpoint compute alike: an HF
        # checkpoint, or one cast by --dtype, computes in its parameters' dtype (an Orbax
        # source otherwise keeps its own pair, e.g. float32 master weights, bfloat16 compute).
        cfg = cfg.replace(dtype=pdt)
    _, abs_state = nnx.split(abstract_model(cfg))
    abs_flat = _flat(abs_state)
    entries = param_map(cfg, abs_state)
    source.check(entries, abs_flat)

    # Target dtype of every tensor; refuse any cast nobody asked for that could change a value.
    targets: dict[str, str] = {}
    verify_narrowing: set = set()
    for e in entries:
        have = source.stored_dtype(e)
        if to == "orbax":
            want = _dtname(abs_flat[e.path].dtype)
            if dtype is None and not exact_cast(have, want):
                raise CheckpointError(
                    f"{source.where(e)}: tensor {e.hf_name!r} is {have} but would be stored as "
                    f"{want}; pass --dtype {PARAM_DTYPES.get(have, 'float32')} to keep it exact, "
                    f"or --dtype {pdt} to cast")
        else:
            want = _HF_NAMES[dtype] if dtype else source.original_dtype(e)
            if dtype is None and not exact_cast(have, want):
                if source.kind != "orbax":
                    raise CheckpointError(f"{source.where(e)}: tensor {e.hf_name!r}: cannot keep "
                                          f"{have} as {want}")
                verify_narrowing.add(e.hf_name)  # back to the source's dtype: check exactness
        targets[e.hf_name] = want
    total_bytes = sum(int(np.prod(e.shape, dtype=np.int64)) * DTYPES[targets[e.hf_name]].itemsize
                      for e in entries)
    largest = max(int(np.prod(e.shape, dtype=np.int64)) * DTYPES[targets[e.hf_name]].itemsize
                  for e in entries)
    commit_bytes = commit_bytes or max(largest, MIN_COMMIT_BYTES)

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.dsv2-tmp-{os.getpid()}")
    _remove(tmp)
    t0 = time.perf_counter()
    bar = Progress(len(entries), total_bytes, f"{os.path.basename(src)} -> {to}", enabled=progress)
    try:
        os.makedirs(tmp)
        if to == "orbax":
            _write_orbax(tmp, cfg, entries, abs_flat, source, bar, commit_bytes)
            originals = {e.hf_name: source.original_dtype(e) for e in entries}
            default = max(set(originals.values()), key=list(originals.values()).count)
            meta = {"format": "dsv2_jax orbax params", "version": 1, "source": src,
                    "source_format": source.kind, "hf_config_extras": source.config_extras,
                    "hf_dtypes": {"default": default,
                                  "tensors": {k: v for k, v in originals.items() if v != default}}}
            if getattr(source, "fp8", None):
                meta["fp8_dequantised"] = {"tensors": len(source.fp8), "block": list(source.block),
                                           "dtype": pdt}
            with open(os.path.join(tmp, orbax_io.META_FILE), "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
        else:
            _write_hf(tmp, cfg, entries, targets, source, bar, shard_bytes, verify_narrowing)
        _copy_aux_files(src, tmp)
        bar.close()
        _install(tmp, dst, overwrite)
    except BaseException:
        bar.close()
        _remove(tmp)
        raise
    seconds = time.perf_counter() - t0
    return {"tensors": len(entries), "bytes": total_bytes, "seconds": seconds,
            "mb_per_s": total_bytes / 1e6 / max(seconds, 1e-9), "src_format": source.kind,
            "param_dtype": pdt if to == "orbax" else written_dtype(entries, targets)}


# --------------------------------------------------------------------------------------------
# Command line.


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {s!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)


def add_cli(sub) -> None:
    import argparse

    from dsv2_jax.cli import HelpFormatter

    p = sub.add_parser(
        "convert", help="convert checkpoints between HF safetensors and Orbax (streaming)",
        formatter_class=HelpFormatter,
        description="Convert a DeepSeek-V2 checkpoint: HF safetensors directory -> dsv2_jax Orbax "
                    "checkpoint (--to orbax) or back (--to hf). Streams tensor by tensor; exact "
                    "unless --dtype asks for a cast. FP8 checkpoints (block-wise "
                    "weight_scale_inv) are dequantised when --dtype is given.")
    p.add_argument("src", help="source directory (HF safetensors or dsv2_jax Orbax; detected)")
    p.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=("orbax", "hf"), help="output format")
    p.add_argument("--dtype", choices=sorted(_HF_NAMES), default=None,
                   help="cast parameters to this dtype (default: keep the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--shard-size", default="5GB", type=_size_arg,
                   help="HF output: maximum shard size (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=run)
    del argparse


def _size_arg(s: str) -> int:
    import argparse

    try:
        n = parse_size(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: a shard size must be positive")
    return n


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if isinstance(e, CheckpointError) else f"{type(e).__name__}: {msg}"


def run(args) -> int:
    import warnings

    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore")  # library chatter; what the user must know is kept:
    warnings.filterwarnings("default", category=DamagedCheckpointWarning)
    import signal

    def on_term(signum, _frame):  # SIGTERM cleans up like Ctrl-C
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        stats = convert(args.src, args.dst, args.to, dtype=args.dtype, overwrite=args.overwrite,
                        shard_bytes=args.shard_size, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"dsv2 convert: interrupted; {args.dst} not written", file=sys.stderr)
        return 130
    except Exception as e:  # the command's boundary: one line, no traceback
        if os.environ.get("DSV2_DEBUG"):
            raise
        print(f"dsv2 convert: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if not args.no_progress:
        print(f"wrote {args.dst} ({args.to}, {stats['param_dtype']}): {stats['tensors']} tensors, "
              f"{stats['bytes'] / 1e9:.3f} GB in {stats['seconds']:.1f} s "
              f"({stats['mb_per_s']:.0f} MB/s)")
    return 0
