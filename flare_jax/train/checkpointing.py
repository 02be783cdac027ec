"""Training checkpoints with Orbax ``CheckpointManager``: the train state (step, fp32 parameters,
optimizer state; saved asynchronously, restorable onto any mesh) and each process's grain
iterator state, so that a resumed run continues the same data order.

A save is written under a temporary ``<step>.orbax-checkpoint-tmp-*`` directory and renamed to
``<step>`` only once every process has finished writing, so a run killed mid-save leaves no
step that :meth:`Checkpointer.latest_step` would return; the stale directory is removed when the
next run opens the checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from flare_jax.train.step import TrainState

STATE_ITEM = "state"
DATA_ITEM = "data"


class _IteratorSnapshot:
    """The iterator state taken when a save starts (the live iterator keeps advancing)."""

    def __init__(self, state: dict[str, Any]):
        self._state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Save/restore of train state + data iterator under ``directory/<step>``, keeping the last
    ``keep`` checkpoints."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           DATA_ITEM: grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
        """Start saving ``state`` and this process's iterator state as ``step``."""
        self.manager.save(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_ITEM: grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
        }), force=True)

    def restore(self, step: int, abstract_state: TrainState, iterator: Any = None) -> TrainState:
        """Restore ``step`` onto the shardings of ``abstract_state`` (``ShapeDtypeStruct``s, any
        mesh); ``iterator`` (if given) is moved to the saved position in place."""
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))[STATE_ITEM]

    def reached_preemption(self, step: int) -> bool:
        """True on every process once one of them got SIGTERM (JAX's preemption service of a
        ``jax.distributed`` run): all stop at this same ``step``. Always False otherwise."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: TrainState, shardings: TrainState) -> TrainState:
    """``ShapeDtypeStruct`` tree of ``state`` (concrete or abstract) with the given shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
