"""Whole-run checkpoints with orbax: params, optimizer state, step, RNG, data position, config.

    ckpt = Checkpointer("runs/x/checkpoints", keep=3)
    ckpt.save(step, state_pytree, meta={"data": loader_state, "config": config.to_dict()})
    state, meta = ckpt.restore(abstract_state)            # newest step; None if there is none

Saves are synchronous and atomic (orbax writes to a temporary directory and renames), so a
run killed at any moment resumes from the last complete checkpoint. Sharded arrays are saved
and restored with the shardings of `abstract_state`, so a run can resume on another mesh.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves `state` (a pytree of arrays) and JSON-serialisable `meta` as checkpoint `step`."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """The checkpoint `step` (default newest) as (state, meta), or None when there is none.

        `abstract_state`: a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings) giving
        the structure, dtypes and target shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def close(self) -> None:
        self._manager.close()
