"""Orbax checkpoints of model parameters, written and read one HF tensor's slice at a time.

A dsv2_jax Orbax checkpoint is a directory:

    DIR/config.json          the config, official HF form (`DeepseekV2Config.save`; param_dtype
                             among the `dsv2_jax` fields)
    DIR/params/              an Orbax PyTree checkpoint (OCDBT + zarr, what Orbax writes by
                             default) of `nnx.to_pure_dict(nnx.state(model, nnx.Param))` with
                             string keys: the model's own layout, stacked layers and experts
                             included, so `restore_params` (plain Orbax `StandardRestore`)
                             puts it onto any mesh
    DIR/dsv2_convert.json    written by `dsv2 convert`: the dtype each HF tensor had at the
                             source, so that Orbax -> HF gives back exactly what came in (the
                             router is float32 here whatever it was there)

Streaming. The stacked routed-expert arrays of the 236B model ([59, 160, 5120, 1536] each)
are ~150 GB; no step may hold one. `save_streamed` writes each array through tensorstore in
zarr chunks of exactly one HF tensor (chunk shape [1, 1, D, F] for experts, [1, ...] for other
stacked parameters, the whole array otherwise), handing tensors to OCDBT transactions that are
committed every `commit_bytes` (one commit at a time), so host memory is bounded by about
3 x max(commit_bytes, largest tensor) (the transaction, its compressed copy, the tensor being
read) plus a fixed ~100 MB, whatever the checkpoint size.
It is an Orbax `TypeHandler` (a `NumpyHandler` whose values arrive block by block), so Orbax
itself writes the tree metadata, merges the per-process OCDBT database and commits the
directory atomically; the result restores with plain Orbax APIs (as `np.ndarray` leaves, or
onto shardings with `StandardRestore`). `OrbaxParams` reads the same arrays back one slice at a
time (any Orbax checkpoint of this tree: a slice costs one chunk, which for checkpoints written
by Orbax's own array handler may be a whole device shard).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import numpy as np

from dsv2_jax.checkpoint import CheckpointError, DamagedCheckpointWarning

PARAMS_DIR = "params"
META_FILE = "dsv2_convert.json"
CONFIG_FILE = "config.json"


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.exists(os.path.join(path, CONFIG_FILE))


# A `dsv2 train` workdir keeps whole training states under checkpoints/STEP/state; the
# parameters are the subtree under this key.
TRAIN_PARAMS_PREFIX = ("params",)


def is_training_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(os.path.join(path, CONFIG_FILE))


def training_state_dirs(workdir: str) -> list[tuple[int, str]]:
    """(step, Orbax state directory) of every committed step of a training workdir, newest
    first. An unfinished save is no step (Orbax writes into a temporary sibling and renames
    it); a committed one whose state lacks its metadata is damaged, and `probe` says so, as
    `dsv2 train` does on resume."""
    ckdir = os.path.join(workdir, "checkpoints")
    steps = sorted((int(s) for s in os.listdir(ckdir) if s.isdigit()), reverse=True)
    return [(s, os.path.join(ckdir, str(s), "state")) for s in steps]


def training_state_dir(workdir: str) -> str:
    """The Orbax state directory of the newest step of a training workdir whose files are
    whole (`integrity.probe`), warning about newer damaged ones."""
    from dsv2_jax.checkpoint.integrity import probe

    skipped = []
    for step, d in training_state_dirs(workdir):
        damage = probe(d)
        if damage is None:
            _warn_skipped(workdir, step, skipped)
            return d
        skipped.append(f"step {step}: {damage}")
    _raise_none_good(workdir, skipped)


def _warn_skipped(workdir: str, step: int, skipped: list[str]) -> None:
    if skipped:
        import warnings

        warnings.warn(f"{workdir}: using checkpoint step {step}; newer ones are damaged ("
                      + "; ".join(skipped) + ")", DamagedCheckpointWarning, stacklevel=3)


def _raise_none_good(workdir: str, skipped: list[str]):
    ckdir = os.path.join(workdir, "checkpoints")
    if skipped:
        raise CheckpointError(f"{ckdir}: no checkpoint restores (" + "; ".join(skipped) + ")")
    raise CheckpointError(f"{ckdir}: no complete training checkpoint")


def params_location(path: str) -> tuple[str, tuple]:
    """(Orbax PyTree directory, key prefix of the parameters) of a converted checkpoint or a
    training workdir."""
    if is_training_workdir(path):
        return training_state_dir(path), TRAIN_PARAMS_PREFIX
    return params_dir(path), ()


def params_dir(path: str) -> str:
    """The Orbax PyTree directory of a checkpoint directory (or the directory itself)."""
    path = os.fspath(path)
    sub = os.path.join(path, PARAMS_DIR)
    return sub if os.path.isdir(sub) else path


def param_name(path: Iterable) -> str:
    """Orbax's name for a leaf: its dict keys joined by '.'."""
    return ".".join(str(k) for k in path)


def nest(flat: dict) -> dict:
    """{(k1, k2, ...): leaf} -> nested dicts with string keys."""
    out: dict = {}
    for path, leaf in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(str(k), {})
        d[str(path[-1])] = leaf
    return out


# --------------------------------------------------------------------------------------------
# Writing, slice by slice.


@dataclasses.dataclass(eq=False)
class StreamedArray:
    """An array Orbax saves without it ever existing in memory: `blocks()` yields
    (index, block) pairs, `index` a tuple of `block_ndim` leading integer indices and `block`
    the array `full[index]`; together they must cover the array exactly once."""

    shape: tuple
    dtype: np.dtype
    block_ndim: int
    blocks: Callable[[], Iterable[tuple[tuple, np.ndarray]]]

    @property
    def chunk_shape(self) -> tuple:
        return (1,) * self.block_ndim + tuple(self.shape[self.block_ndim:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def _streamed_handler_class():
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from orbax.checkpoint import future as ocp_future
    from orbax.checkpoint import type_handlers
    # Orbax's own spec builder (not re-exported publicly in 0.12.8): using it makes the arrays
    # land exactly where and how Orbax's NumpyHandler would put them (per-process OCDBT
    # subdirectory, zarr driver and compression, OCDBT write options).
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    class StreamedArrayHandler(type_handlers.NumpyHandler):
        """Saves `StreamedArray`s; reads back as Orbax's NumpyHandler does (same typestr)."""

        def __init__(self, commit_bytes: int):
            super().__init__(deepcopy_host_arrays=False)
            self.commit_bytes = int(commit_bytes)
            self._ctx = None

        def _context(self):
            # Not Orbax's context: it caches up to 100 MB of OCDBT b-tree nodes, and every
            # commit writes a new root whose size grows with the number of chunks, so over
            # thousands of commits that cache fills to its cap (measured: peak RSS growing
            # ~60 KB per tensor converted). Without it each commit re-reads the root (~50 bytes
            # per chunk written so far) from the page cache.
            if self._ctx is None:
                self._ctx = ts.Context({"file_io_concurrency": {"limit": 128},
                                        "cache_pool#ocdbt": {"total_bytes_limit": 0}})
            return self._ctx

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                spec = ts_utils.build_array_write_spec(
                    info=info, arg=arg, global_shape=tuple(value.shape),
                    local_shape=value.chunk_shape, dtype=np.dtype(value.dtype),
                    use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=ocdbt_utils.get_process_index_for_subdir(
                        use_ocdbt=info.is_ocdbt_checkpoint),
                ).json
                store = await ts.open(ts.Spec(spec), create=True, open=True, context=self._context())
                await self._write(store, value, info.name)
            # Everything is on disk when serialize returns.
            return [ocp_future.NoopFuture()]

        async def _write(self, store, value: StreamedArray, name: str):
            txn, pending, covered = ts.Transaction(), 0, 0
            for index, block in value.blocks():
                if len(index) != value.block_ndim or tuple(block.shape) != value.chunk_shape[value.block_ndim:]:
                    raise CheckpointError(f"{name}: block {index} has shape {block.shape}, "
                                          f"expected {value.chunk_shape[value.block_ndim:]}")
                await store.with_transaction(txn)[index].write(block).copy
                pending += block.nbytes
                covered += block.size
                del block
                if pending >= self.commit_bytes:
                    # Sequential commits: overlapping the next transaction with this commit
                    # measured no faster on 2 cores and holds one more batch in memory.
                    await txn.commit_async()
                    txn, pending = ts.Transaction(), 0
            await txn.commit_async()
            if covered != value.size:
                raise CheckpointError(f"{name}: blocks covered {covered} of {value.size} elements")

    return StreamedArrayHandler


def save_streamed(directory: str, tree: dict, *, commit_bytes: int = 64 << 20,
                  use_compression: bool = True) -> None:
    """Saves a nested dict of `StreamedArray` leaves as an Orbax PyTree checkpoint at
    `directory` (which must not exist). Orbax writes into a temporary sibling and renames it
    when complete."""
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (StreamedArray, _streamed_handler_class()(commit_bytes)),
        (np.ndarray, type_handlers.NumpyHandler()),
        (jax.Array, type_handlers.get_type_handler(jax.Array)),
    )
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                         use_compression=use_compression))
    try:
        ckptr.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))
    finally:
        ckptr.close()


# --------------------------------------------------------------------------------------------
# Reading.


class OrbaxParams:
    """Random access to the arrays of an Orbax PyTree checkpoint, one slice at a time."""

    def __init__(self, path: str, prefix: tuple = ()):
        self.dir = os.path.abspath(params_dir(path))
        meta_path = os.path.join(self.dir, "_METADATA")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            tree = meta["tree_metadata"]
        except FileNotFoundError:
            raise CheckpointError(f"{meta_path}: missing; {self.dir} is not a complete Orbax "
                                  f"checkpoint") from None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{meta_path}: corrupted Orbax tree metadata") from None
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.use_ocdbt = os.path.exists(os.path.join(self.dir, "manifest.ocdbt"))
        # Our trees are plain dicts; a checkpoint of `nnx.state(...)` itself has a trailing
        # '.value' key per leaf: accept both.
        self.names: dict[tuple, str] = {}
        # Only leaves under `prefix` (e.g. the params of a whole training state), addressed
        # without it.
        n = len(prefix)
        for entry in tree.values():
            full = tuple(str(k["key"]) for k in entry["key_metadata"])
            if full[:n] != tuple(prefix):
                continue
            keys = full[n:]
            if keys and keys[-1] == "value":
                self.names.setdefault(keys[:-1], param_name(full))
            self.names[keys] = param_name(full)
        self._stores: dict[str, Any] = {}
        self._ctx = None

    def _context(self):
        import tensorstore as ts

        if self._ctx is None:
            # No chunk cache (each slice is read once); a bounded one for OCDBT b-tree nodes.
            self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                    "cache_pool#ocdbt": {"total_bytes_limit": 64 << 20},
                                    "file_io_concurrency": {"limit": 16}})
        return self._ctx

    def has(self, path: tuple) -> bool:
        return tuple(str(k) for k in path) in self.names

    def store(self, path: tuple):
        import tensorstore as ts

        key = tuple(str(k) for k in path)
        if key not in self.names:
            raise CheckpointError(f"{self.dir}: Orbax checkpoint has no parameter {param_name(key)!r}")
        name = self.names[key]
        if name not in self._stores:
            if self.use_ocdbt:
                kv = {"driver": "ocdbt", "base": {"driver": "file", "path": self.dir + "/"}, "path": name,
                      "cache_pool": "cache_pool#ocdbt"}
            else:
                kv = {"driver": "file", "path": os.path.join(self.dir, name)}
            spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv,
                    "recheck_cached_data": False, "recheck_cached_metadata": False}
            try:
                self._stores[name] = ts.open(spec, open=True, read=True, context=self._context()).result()
            except Exception as e:  # tensorstore raises ValueError / RuntimeError variants
                raise CheckpointError(f"{self.dir}: cannot open parameter {name!r}: "
                                      f"{first_line(e)}") from None
        return self._stores[name]

    def shape(self, path: tuple) -> tuple:
        return tuple(self.store(path).shape)

    def dtype(self, path: tuple) -> np.dtype:
        return np.dtype(self.store(path).dtype.numpy_dtype)

    def read(self, path: tuple, index: tuple = ()) -> np.ndarray:
        try:
            return self.store(path)[tuple(index)].read().result()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.dir}: cannot read {param_name(path)}{list(index)}: "
                                  f"{first_line(e)}") from None


def first_line(e: BaseException) -> str:
    """The first line of the innermost error behind `e`: Orbax wraps TensorStore's precise
    reason (which file, which parameter, what is wrong) in a generic message whose first
    line names neither."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if inner is None:
            break
        e = inner
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def read_meta(path: str) -> dict:
    p = os.path.join(path, META_FILE)
    if not os.path.exists(p):
        return {}
    try:
        with open(p) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise CheckpointError(f"{p}: not valid JSON") from None


# --------------------------------------------------------------------------------------------
# Restoring into a model.


def _leaf_target(leaf):
    """An abstract leaf for Orbax: ShapeDtypeStruct with a sharding (default: one device)."""
    import jax
    from flax import nnx

    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    sharding = getattr(value, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(tuple(value.shape), value.dtype, sharding=sharding)


def check_params(path: str, expected: dict, prefix: tuple = ()) -> None:
    """Every expected {path: shape} is in the checkpoint with that shape, and nothing else
    is; otherwise a `CheckpointError` naming the parameter."""
    reader = OrbaxParams(path, prefix)
    want = {tuple(str(k) for k in p) for p in expected}
    for p, shape in expected.items():
        if not reader.has(p):
            raise CheckpointError(f"{reader.dir}: missing parameter {param_name(p)!r}")
        got = reader.shape(p)
        if got != tuple(shape):
            raise CheckpointError(f"{reader.dir}: parameter {param_name(p)!r} has shape {got}, "
                                  f"config expects {tuple(shape)}")
    extra = sorted(k for k in reader.names if k not in want and k[:-1] not in want)
    if extra:
        raise CheckpointError(f"{reader.dir}: unexpected parameter {param_name(extra[0])!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def restore_params(path: str, abstract_state, prefix: tuple = ()):
    """Restores the parameters of a checkpoint directory (or its `params/` directory) onto the
    shardings of `abstract_state`, with plain Orbax (`StandardRestore`): any mesh works, each
    device reading only its part.

    abstract_state: an `nnx.State` (e.g. `nnx.state(nnx.eval_shape(...), nnx.Param)`, values
    `jax.ShapeDtypeStruct`s with a `.sharding`, e.g. from `jax.eval_shape` under a mesh), or a
    flat {path tuple: ShapeDtypeStruct} dict. Leaves without a sharding go to the first
    device; dtypes are cast to the abstract ones on restore. Returns the same kind of object
    holding `jax.Array`s. `prefix`: the key path of the parameters inside a larger tree (a
    training state), restored alone.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    is_state = isinstance(abstract_state, nnx.State)
    flat = (list(nnx.to_flat_state(abstract_state)) if is_state else list(abstract_state.items()))
    targets = {tuple(p): _leaf_target(v) for p, v in flat}
    check_params(path, {p: t.shape for p, t in targets.items()}, prefix)
    directory = os.path.abspath(params_dir(path))
    reader = OrbaxParams(directory, prefix)
    names = {p: reader.names[tuple(str(k) for k in p)] for p in targets}
    # Restore by the checkpoint's own key paths (plain dicts, or nnx.State's '.value' leaves).
    tree = nest({tuple(names[p].split(".")): t for p, t in targets.items()})
    if prefix:  # a subtree of a larger checkpoint: a partial restore
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(
            sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), tree)
        args = ocp.args.PyTreeRestore(tree, restore_args=restore_args, partial_restore=True)
    else:
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        args = ocp.args.StandardRestore(tree)
    try:
        restored = ckptr.restore(directory, args=args)
    except Exception as e:
        raise CheckpointError(f"{directory}: Orbax restore failed: {first_line(e)}") from None
    finally:
        ckptr.close()

    def get(p):
        d = restored
        for k in names[p].split("."):
            d = d[k]
        return d

    if is_state:
        return nnx.from_flat_state([(p, v.replace(get(tuple(p)))) for p, v in flat])
    return {tuple(p): get(tuple(p)) for p, _ in flat}


def load_model(path, dtype=None, compute_dtype=None, mesh=None, rules=None, **overrides):
    """A `DeepseekV2ForCausalLM` from a dsv2_jax Orbax checkpoint directory or a training
    workdir (its newest step that restores; damaged newer ones are skipped with a warning).

    dtype: parameter dtype (default: the checkpoint's param_dtype); the router stays float32.
    compute_dtype: activation dtype (default: the checkpoint's when no dtype is given, else
    the parameter dtype).
    mesh: restore every parameter onto its sharding under this mesh (the rules table, or
    `rules`); each device reads only its part. Default: the first device.
    """
    import jax.numpy as jnp
    from flax import nnx

    from dsv2_jax.checkpoint.hf import abstract_model
    from dsv2_jax.config import DeepseekV2Config

    path = os.fspath(path)
    try:
        cfg = DeepseekV2Config.from_hf(os.path.join(path, CONFIG_FILE))
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)}: {e}") from None
    pdt = jnp.dtype(dtype or cfg.param_dtype).name
    # Without either dtype, the checkpoint's own pair (e.g. f32 master weights, bf16 compute).
    cdt = compute_dtype or (cfg.dtype if dtype is None else pdt)
    cfg = cfg.replace(param_dtype=pdt, dtype=jnp.dtype(cdt).name, **overrides)
    import jax

    from dsv2_jax.checkpoint.hf import flat_shardings

    abstract = abstract_model(cfg)
    graphdef, abs_state = nnx.split(abstract)
    shardings = flat_shardings(abstract, mesh, rules)
    abs_state = nnx.from_flat_state([
        (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[tuple(p)])))
        for p, v in nnx.to_flat_state(abs_state)])
    if is_training_workdir(path):
        return nnx.merge(graphdef, _newest_good_params(path, abs_state))
    return nnx.merge(graphdef, restore_params(params_dir(path), abs_state))


def _newest_good_params(workdir: str, abs_state):
    """The parameters of a training workdir's newest checkpoint that restores, skipping
    damaged ones (found by `integrity.probe`, or by the restore failing) with a warning, as
    `dsv2 train` falls back on resume (it also moves them aside; loading for use does not)."""
    from dsv2_jax.checkpoint.integrity import is_damage, probe

    skipped = []
    for step, d in training_state_dirs(workdir):
        damage = probe(d)
        if damage is None:
            try:
                params = restore_params(d, abs_state, TRAIN_PARAMS_PREFIX)
            except CheckpointError as e:
                if not is_damage(e):
                    raise
                damage = str(e)
        if damage is not None:
            skipped.append(f"step {step}: {damage}")
            continue
        _warn_skipped(workdir, step, skipped)
        return params
    _raise_none_good(workdir, skipped)
