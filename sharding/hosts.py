"""Joining a multi-process run: every host runs the same command; they meet at a coordinator
before JAX touches a device.

    explicit    --coordinator HOST:PORT --num-processes N --process-id I (any cluster, two
                local processes on 127.0.0.1 included)
    TPU pod     detected from the TPU VM environment (TPU_WORKER_HOSTNAMES / MEGASCALE_*);
                JAX reads the worker list itself
    SLURM       detected from SLURM_JOB_ID with more than one task; JAX reads the node list.
                With one task per node, the task drives every GPU the node gives it (JAX's
                own SLURM default is one GPU per task: its local id)

Nothing happens in a single-process run. After `initialize`, `jax.devices()` lists every
process's devices and `sharding.mesh.make_mesh` lays them out so that only the data axis
crosses TPU slices.
"""

from __future__ import annotations

import os

import jax


def _multi_host_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _multi_task_slurm() -> bool:
    if "SLURM_JOB_ID" not in os.environ:
        return False
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1) > 1
    except ValueError:
        return False


def slurm_local_device_ids() -> list[int] | None:
    """The GPUs a SLURM task drives when it is the only task on its node: every visible one
    (CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE). None (JAX's default: the GPU of the
    task's local id) with several tasks per node, or when no GPU count is known."""
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
    try:
        if int(per_node.split("(")[0].split(",")[0]) != 1:
            return None
    except ValueError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = len([d for d in visible.split(",") if d.strip()])
    else:
        try:
            n = int(os.environ.get("SLURM_GPUS_ON_NODE", ""))
        except ValueError:
            return None
    return list(range(n)) if n > 0 else None


def detected_cluster() -> str | None:
    """'tpu' or 'slurm' when the environment describes a multi-process run, else None."""
    if _multi_host_tpu():
        return "tpu"
    if _multi_task_slurm():
        return "slurm"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the run's processes (see the module docstring); True when this is a
    multi-process run. Must come before any other JAX call that touches a device; calling
    it again is harmless."""
    if jax.distributed.is_initialized():
        return True
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given):
        if not all(given):
            raise ValueError("--coordinator, --num-processes and --process-id go together "
                             "(or none of them, on a TPU pod or under SLURM)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is not in [0, --num-processes "
                             f"{num_processes})")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    cluster = detected_cluster()
    if cluster == "slurm":
        if "SLURM_STEP_NODELIST" not in os.environ:  # what JAX reads the tasks' nodes from
            raise ValueError(f"a SLURM allocation of {os.environ.get('SLURM_NTASKS')} tasks, but this "
                             f"process is not in a job step: run it under srun (as "
                             f"scripts/launch/slurm_train.sbatch does), or pass --coordinator, "
                             f"--num-processes and --process-id")
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids())
        return True
    if cluster:
        jax.distributed.initialize()
        return True
    return False


def is_primary() -> bool:
    """Process 0: the one that writes run files, metrics and plots, and moves checkpoints."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
