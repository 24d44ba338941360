"""Orbax checkpoints of the whole training state (params, optimizer, step, counters) and the
data iterator, with fallback past damaged steps.

Orbax itself never treats a committed-but-damaged step as bad: restoring it raises. Here the
newest step that restores cleanly wins. A step is moved to `damaged/` in the workdir (kept
for inspection, by process 0 only) when its failure says the files are damaged: missing,
truncated or undecodable (`is_damage`). Any other failure (out of memory, a storage blip, a
mesh that does not fit the arrays) stops the run with its cause and leaves the checkpoint
where it is.
"""

from __future__ import annotations

import os
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp

from dsv2_jax.checkpoint.integrity import is_damage, probe
from dsv2_jax.checkpoint.orbax_io import first_line
from dsv2_jax.errors import UserError


class CheckpointMismatch(UserError, RuntimeError):
    """No checkpoint of the workdir can be restored into this run; the message says why."""


class RestoreFailed(UserError, RuntimeError):
    """A checkpoint could not be restored for a reason other than damaged files; it is left
    in place."""


def checkpoint_steps(directory: str) -> list[int]:
    """The committed steps under a checkpoints directory, without opening a manager (which
    would create the directory). Unfinished saves are `N.orbax-checkpoint-tmp*` folders."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(s) for s in os.listdir(directory)
                  if s.isdigit() and os.path.isdir(os.path.join(directory, s)))


def unreadable(directory: str, step: int) -> str | None:
    """Why checkpoint `step` under `directory` cannot be restored, or None when its files
    look whole (`integrity.probe` of its training state: no array data is decompressed)."""
    return probe(os.path.join(directory, str(step), "state"))


_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__)) + os.sep


def _orphaned_read_echo(u) -> bool:
    """Whether an unraisable exception is an echo of a failed restore's abandoned reads:
    - Orbax has closed the asyncio loop of that restore while tensorstore still completes the
      reads it had in flight; each completion tries to schedule a callback on the closed loop
      (`RuntimeError: Event loop is closed`, no object);
    - the read coroutines left suspended on that loop are closed when the garbage collector
      reaches them, at any later moment; Orbax's read catches the `GeneratorExit` of the close
      and raises its own exception from it, so Python prints 'Exception ignored in: <coroutine
      object _read_array_index_and_device_put ...>' with the array's whole TensorStore spec,
      once per abandoned read, in the middle of whatever runs then (training, a later test)."""
    if (u.object is None and isinstance(u.exc_value, RuntimeError)
            and str(u.exc_value) == "Event loop is closed"):
        return True
    code = getattr(u.object, "cr_code", None)
    return (code is not None and isinstance(u.exc_value, Exception)
            and isinstance(u.exc_value.__cause__, GeneratorExit)
            and os.path.abspath(code.co_filename).startswith(_ORBAX_DIR))


def _quiet_orphaned_reads() -> None:
    """Drops the echoes of a failed restore (`_orphaned_read_echo`): the failure itself is
    reported by us; every other unraisable exception still goes to the previous hook.
    Installed once, before a process's first restore (the echoes can come before the failure
    reaches the caller, and long after it)."""
    previous = sys.unraisablehook
    if getattr(previous, "_dsv2_quiet", False):
        return

    def hook(u):
        if not _orphaned_read_echo(u):
            previous(u)

    hook._dsv2_quiet = True
    sys.unraisablehook = hook


def _is_structure_mismatch(e: Exception) -> bool:
    msg = str(e).lower()
    return "tree structures do not match" in msg


class TrainCheckpoints:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, log=print,
                 primary: bool = True):
        self.directory = os.path.abspath(directory)
        self.keep, self.async_save, self.log, self.primary = keep, async_save, log, primary
        self._open()

    def _open(self):
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                            enable_async_checkpointing=self.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter) -> None:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state, data_iter):
        """Restores the newest good step into (state, data_iter). Returns (step, state) or
        (None, None) when there is no checkpoint at all."""
        steps = self.steps()
        if not steps:
            return None, None
        # Before the first try: a failing restore's orphaned reads can hit Orbax's closed loop
        # while the failure is still on its way up, before the except clause below runs.
        _quiet_orphaned_reads()
        for step in reversed(steps):
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
                state = restored["state"]
                jax.block_until_ready(state)
            except Exception as e:  # noqa: BLE001 - judged below
                reason = first_line(e)[:300]
                if _is_structure_mismatch(e):
                    # The files are fine; the run asks for a differently shaped state.
                    raise CheckpointMismatch(
                        f"{self.directory}/{step} holds a training state of another shape than "
                        f"this run builds ({reason}); rerun with the run's original settings "
                        f"(see run.json) or use a new --workdir") from None
                if not is_damage(e):
                    raise RestoreFailed(
                        f"restoring {self.directory}/{step} failed ({type(e).__name__}: {reason}); "
                        f"the checkpoint is left in place; rerun once the cause is fixed") from e
                self._quarantine(step)
                self.log(f"warning: checkpoint step {step} is damaged ({type(e).__name__}: {reason}); "
                         f"moved to {self._damaged_dir()}, falling back to an earlier step")
                continue
            return step, state
        raise CheckpointMismatch(f"{self.directory}: no checkpoint restores cleanly (damaged steps "
                                 f"moved to {self._damaged_dir()}); remove the workdir to start afresh")

    def _damaged_dir(self) -> str:
        return os.path.join(os.path.dirname(self.directory), "damaged")

    def _quarantine(self, step: int) -> None:
        from dsv2_jax.sharding.hosts import barrier

        # Every process found the same damage; process 0 moves it, the others wait for it.
        barrier(f"dsv2_quarantine_{step}_start")
        if self.primary:
            src = os.path.join(self.directory, str(step))
            os.makedirs(self._damaged_dir(), exist_ok=True)
            dst = os.path.join(self._damaged_dir(), str(step))
            if os.path.exists(dst):
                shutil.rmtree(dst)
            if os.path.exists(src):
                shutil.move(src, dst)
        barrier(f"dsv2_quarantine_{step}_done")
        self.manager.close()
        self._open()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
