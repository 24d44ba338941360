"""Device meshes from `--mesh axis=n,...` specs.

Axes, outermost first: data, fsdp, expert, tensor (what each splits: `rules.py`). Any axis may
be larger than 1; one may be -1 ("the rest of the devices"); their product must equal the
device count. Axes left out have size 1.

The device order comes from `jax.make_mesh`, which knows the physical topology (TPU torus,
GPU NVLink islands), so the inner axes (tensor, expert, fsdp) land on the fastest links. With
several TPU slices (devices carrying `slice_index`), the mesh is hybrid: `data` is split
across slices (over the data-centre network, where only gradients cross) and every other axis
stays within a slice.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh(spec: str | None, n_devices: int | None = None, where: str = "") -> dict[str, int]:
    """'data=4,expert=2' -> {'data': 4, 'fsdp': 1, 'expert': 2, 'tensor': 1}; None -> all
    devices on data. -1 stands for the devices the other axes leave. `where` names the
    devices in an error (e.g. ' (cpu)')."""
    if spec is not None and not spec.strip():
        raise ValueError("--mesh '': empty; give axis=n,... or leave --mesh out for all devices on data")
    n_devices = jax.device_count() if n_devices is None else n_devices
    if n_devices < 1:
        raise ValueError(f"a mesh needs at least one device, got {n_devices}{where}")
    if not spec:
        return {a: (n_devices if a == "data" else 1) for a in AXES}
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"--mesh {spec!r}: an empty entry; expected axis=n,... (e.g. fsdp=4,expert=2)")
        name, _, n = item.partition("=")
        name = name.strip()
        if name not in AXES:
            raise ValueError(f"--mesh {spec!r}: unknown axis {name!r}; expected some of {AXES}")
        try:
            size = int(n)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} needs an integer size") from None
        if size < 1 and size != -1:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} must be >= 1 (or -1 for the rest)")
        if name in sizes:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} given twice")
        sizes[name] = size
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"--mesh {spec!r}: only one axis may be -1, got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % known:
            raise ValueError(f"--mesh {spec!r}: the other axes use {known} devices, which does not "
                             f"divide the {n_devices} available")
        sizes[rest[0]] = n_devices // known
    total = math.prod(sizes.values())
    if total != n_devices:
        raise ValueError(f"--mesh {spec!r} has {total} devices but {n_devices} are available{where}")
    return {a: sizes.get(a, 1) for a in AXES}


def _num_slices(devices) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(spec: str | None, devices=None) -> Mesh:
    """The (data, fsdp, expert, tensor) mesh of a spec over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices), f" ({devices[0].platform})")
    shape = tuple(sizes[a] for a in AXES)
    types = (AxisType.Auto,) * len(AXES)
    slices = _num_slices(devices)
    if slices > 1:
        if sizes["data"] % slices:
            raise ValueError(f"--mesh {spec!r}: the data axis ({sizes['data']}) must be a multiple "
                             f"of the {slices} slices (only data parallelism crosses slices)")
        from jax.experimental import mesh_utils

        ici = (sizes["data"] // slices,) + shape[1:]
        dcn = (slices,) + (1,) * (len(AXES) - 1)
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        return Mesh(arr, AXES, axis_types=types)
    if len(devices) == jax.device_count():
        try:
            return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # topologies make_mesh cannot map (e.g. an odd subset): plain order below
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=types)


def mesh_spec(mesh: Mesh) -> str:
    """The axes larger than 1, as a --mesh spec ('' on one device)."""
    return ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every axis that carries data."""
    from dsv2_jax.sharding.rules import batch_axes

    return NamedSharding(mesh, P(batch_axes(mesh)))
