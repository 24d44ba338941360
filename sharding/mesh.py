"""Device meshes from `--mesh axis=n,...` specs.

Axes, outermost first: data (batch), fsdp, expert, tensor. `data` and `expert` may be larger
than 1: the batch is split over data x expert (every device holds its own sequences);
parameters are replicated except the routed experts, sharded over `expert` (see `rules.py`
and `moe.routed_experts_ep`). fsdp and tensor parallelism are refused clearly.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")
SUPPORTED = ("data", "expert")


def parse_mesh(spec: str | None) -> dict[str, int]:
    """'data=4,expert=2' -> {'data': 4, 'expert': 2}; None or '' -> {'data': all devices}."""
    if not spec:
        return {"data": jax.device_count()}
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, n = item.partition("=")
        name = name.strip()
        if name not in AXES:
            raise ValueError(f"--mesh {spec!r}: unknown axis {name!r}; expected some of {AXES}")
        try:
            size = int(n)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} needs an integer size") from None
        if size < 1:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} must be >= 1")
        if name in sizes:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} given twice")
        sizes[name] = size
    for name, size in sizes.items():
        if size > 1 and name not in SUPPORTED:
            raise ValueError(f"--mesh: a {name!r} axis larger than 1 is not supported yet "
                             f"(only {', '.join(SUPPORTED)} parallelism so far)")
    total = math.prod(sizes.values())
    if total != jax.device_count():
        raise ValueError(f"--mesh {spec!r} has {total} devices but {jax.device_count()} are "
                         f"available ({jax.devices()[0].platform})")
    return sizes


def make_mesh(spec: str | None) -> Mesh:
    sizes = parse_mesh(spec)
    shape = tuple(sizes.get(a, 1) for a in AXES)
    return Mesh(np.asarray(jax.devices()).reshape(shape), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every axis that carries data."""
    from dsv2_jax.sharding.rules import BATCH_AXES

    return NamedSharding(mesh, P(BATCH_AXES))
