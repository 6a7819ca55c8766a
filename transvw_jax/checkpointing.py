"""Orbax checkpoints behind two calls, so that an Orbax API change is a one-file change.

Layout of `<workdir>/checkpoints/<step>/`: the item `variables` holds the model's
`{'params', 'batch_stats'}`; later items (optimiser state, RNG, data iterator) sit beside
it, so export and fine-tuning read the weights without knowing the training state.
Orbax writes each step to a temporary directory and renames it when complete, so a
half-written step is never listed, never restored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transvw_jax import multihost
from transvw_jax.data.loader import TrainIterator
from transvw_jax.errors import CheckpointError

VARIABLES = "variables"


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def _manager(directory: Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    # These variable-only checkpoints are written and read by one process on its own (export,
    # convert, fine-tuning's weight import): Orbax must not wait for the job's other
    # processes, which are not there.
    local = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()},
        barrier_sync_key_prefix=f"local{jax.process_index()}")
    directory.mkdir(parents=True, exist_ok=True)  # Orbax's create=True needs all processes
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False,
                                           multiprocessing_options=local)
    return ocp.CheckpointManager(
        directory, options=options, item_handlers={VARIABLES: ocp.StandardCheckpointHandler()}
    )


def save(workdir: str | os.PathLike, step: int, variables: Mapping[str, Any],
         max_to_keep: int | None = None) -> None:
    """Save the model variables as checkpoint `step` under `<workdir>/checkpoints`."""
    with _manager(checkpoint_dir(workdir), max_to_keep) as mngr:
        # Host copies: in a multi-process job Orbax refuses process-local device arrays.
        host = jax.device_get(dict(variables))
        mngr.save(step, args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardSave(host)}))
        mngr.wait_until_finished()


def restore_variables(workdir: str | os.PathLike, like: Mapping[str, Any],
                      step: int | None = None, best: bool = False) -> tuple[int, dict] | None:
    """Restore the model variables of checkpoint `step` (default: the latest).

    Args:
      workdir: the run directory holding `checkpoints/`.
      like: variables (or `jax.eval_shape` structs) of the model the config describes.
      best: read `<workdir>/best` (the best validation loss) instead of the latest step.

    Returns:
      (step, variables), or None when the directory holds no complete checkpoint.

    Raises:
      CheckpointError naming the first parameter whose shape differs (a checkpoint of
      another architecture, width or class count) or a missing/unreadable item.
    """
    directory = best_dir(workdir) if best else checkpoint_dir(workdir)
    if not directory.is_dir():
        return None
    with _manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        _check_stored_variables(mngr, step, like)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), dict(like))
        restored = mngr.restore(
            step, args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardRestore(abstract)})
        )
        return step, dict(restored[VARIABLES])


def _stored_metadata(mngr: ocp.CheckpointManager, step: int) -> tuple[Path, Any]:
    """(step directory, metadata tree of its variables), or CheckpointError naming it."""
    where = Path(mngr.directory) / str(step)
    try:
        stored = mngr.item_metadata(step)[VARIABLES]
    except Exception as e:  # noqa: BLE001 - Orbax raises various types
        raise CheckpointError(f"{where}: unreadable checkpoint ({e})") from None
    if stored is None:
        raise CheckpointError(f"{where}: no '{VARIABLES}' item in this checkpoint")
    return where, getattr(stored, "tree", stored)


def _check_stored_variables(mngr: ocp.CheckpointManager, step: int, like: Mapping[str, Any]) -> None:
    """CheckpointError naming the file and key when step's variables cannot become `like`."""
    where, stored = _stored_metadata(mngr, step)
    _check_shapes(where, stored, like)


def _check_shapes(where: Path, stored: Any, like: Mapping[str, Any]) -> None:
    have = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(dict(stored)).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(dict(like)).items()}
    for key, shape in sorted(want.items(), key=lambda kv: (not kv[0].startswith("params/"), kv[0])):
        if key not in have:
            raise CheckpointError(f"{where}: checkpoint has no {key}: another architecture?")
        if have[key] != shape:
            raise CheckpointError(
                f"{where}: {key} has shape {have[key]}, the configured model needs {shape}"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{where}: checkpoint has {extra[0]}, which the configured model lacks")


# --- the full training state ----------------------------------------------------------------

TRAIN_STATE = "train_state"
DATA_STATE = "data"  # JSON, written by process 0: run state and the global data position
ITERATOR = "iterator"  # each process's iterator state: its own rows of an int32 array


def _saveable(tree: Mapping[str, Any]) -> dict[str, Any]:
    """What a job's checkpoint save hands to Orbax: in one process, host copies. Orbax
    splits each replicated device array into one slice per device and dispatches every
    slice as its own device operation (replica-parallel saving, which spreads the writes
    of replicated arrays over hosts): with one process there is no other host to spread to,
    and those dispatches were most of a small model's save. Several processes keep device
    arrays (Orbax refuses a host copy of a sharded array there)."""
    return jax.device_get(dict(tree)) if jax.process_count() == 1 else dict(tree)


def best_dir(workdir: str | os.PathLike) -> Path:
    """The best checkpoint by validation loss (variables only): `<workdir>/best`."""
    return Path(workdir).absolute() / "best"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


_ROW = ("position_low", "position_high", "global_batch_size", "process_index", "process_count")


def _rows_sharding() -> NamedSharding:
    """One row per device, devices ordered by process: each process owns its own rows."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return NamedSharding(Mesh(np.asarray(devices), ("rows",)), P("rows"))


def _state_array(state: Mapping[str, int]) -> jax.Array:
    """This process's iterator state as its rows of a global int32 array (the position in
    two 30-bit halves: int64 needs jax_enable_x64). Saved through Orbax's array path, which
    writes every process's shard in step with the others."""
    position = int(state["position"])
    row = np.asarray([position % (1 << 30), position >> 30, state["global_batch_size"],
                      state["process_index"], state["process_count"]], np.int32)
    local = np.tile(row, (jax.local_device_count(), 1))
    return jax.make_array_from_process_local_data(_rows_sharding(), local)


def _state_of_row(row: np.ndarray) -> dict[str, int]:
    values = dict(zip(_ROW, (int(v) for v in row), strict=True))
    return {"position": values["position_low"] + (values["position_high"] << 30),
            **{k: values[k] for k in _ROW[2:]}}


class RunCheckpointer:
    """Checkpoints of a training run: keep the last N complete states, plus the best.

    `<workdir>/checkpoints/<step>/` holds `variables` (params, batch_stats: what export and
    fine-tuning read), `train_state` (optimiser state, step, RNG), `iterator` (each
    process's Grain iterator state, as that process's rows of an array) and
    `data` (JSON from process 0: best eval, patience count, and the data position: global
    cube, global batch size, process count); together they resume a run exactly, on the
    same or another number of processes. Saves are asynchronous (training continues while
    the arrays are written); Orbax writes each step under a temporary name and renames it
    when complete, so a kill mid-save leaves the previous step as the latest.
    `<workdir>/best/<step>/` keeps the variables of the best validation loss.

    Best and latest stay consistent across a kill (see `open_best`): a new best is saved
    only when every earlier latest save is complete, and a latest checkpoint of the same
    step follows it (`fit` does both), so at most one best step can be newer than the
    latest checkpoint; `best/` keeps two steps, so the best before it survives when a
    resumed run removes it.
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 3):
        handlers = {VARIABLES: ocp.StandardCheckpointHandler(), TRAIN_STATE: ocp.StandardCheckpointHandler(),
                    DATA_STATE: ocp.JsonCheckpointHandler(), ITERATOR: ocp.StandardCheckpointHandler()}
        # Both managers save the same step after an evaluation, and Orbax names its
        # cross-process barriers after the step directory ("4.orbax-checkpoint-tmp"): distinct
        # prefixes keep the two saves' barriers apart (the same name deadlocked two processes).
        def options(keep: int, prefix: str) -> ocp.CheckpointManagerOptions:
            return ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix))

        self._options = options
        self._best_dir = best_dir(workdir)
        self._latest = ocp.CheckpointManager(checkpoint_dir(workdir), options=options(keep, "latest"),
                                             item_handlers=handlers)
        self._best: ocp.CheckpointManager | None = None

    def latest_step(self) -> int | None:
        """The step every process resumes from: process 0's latest complete checkpoint.

        Each process reading its own view of the directory could resume from different steps
        (per-host disks, a stale network file system) and then wait for each other forever:
        process 0 decides, and all stop with the same line when one cannot see that step.
        """
        mine = self._latest.latest_step()
        agreed = multihost.from_process_zero("resume-step", str(-1 if mine is None else mine))
        step = None if int(agreed) < 0 else int(agreed)
        visible = step is None or step in self._latest.all_steps(read=True)
        blind = multihost.processes_failing("resume-visible", visible, str(mine))
        if blind:
            who = ", ".join(f"process {i} (its latest: {latest})" for i, latest in blind)
            raise CheckpointError(
                f"{self._latest.directory}: process 0 resumes from step {step}, which {who} cannot see: "
                "every process must see one shared directory (a per-host disk, or a network file "
                "system that is not yet in sync?)")
        return step

    def open_best(self, resume_step: int | None, best_step: int | None,
                  variables: Mapping[str, Any] | None = None) -> None:
        """Open `best/` consistent with the latest checkpoint the run resumes from.

        `best_step` is the best step recorded in that checkpoint. Steps of `best/` newer than
        `resume_step` were saved by a run killed before its next latest checkpoint: the
        resumed run redoes them, so they go (else Orbax would refuse to save the same step
        again). When the recorded best is the resume step itself but its best save never
        completed, the resumed variables are that best, and are saved.
        """
        if jax.process_index() == 0 and self._best_dir.is_dir():
            for child in self._best_dir.iterdir():
                step = child.name.split(".", 1)[0]
                newer = step.isdigit() and resume_step is not None and int(step) > resume_step
                unfinished = "tmp" in child.name
                if newer or unfinished or (resume_step is None and step.isdigit()):
                    logging.info("checkpoints: removing %s (unfinished, or after the resume step)", child)
                    shutil.rmtree(child, ignore_errors=True)
        multihost.barrier("best-cleaned")
        self._best = ocp.CheckpointManager(self._best_dir, options=self._options(2, "best"),
                                           item_handlers={VARIABLES: ocp.StandardCheckpointHandler()})
        if (best_step is not None and best_step == resume_step and variables is not None
                and best_step not in self._best.all_steps()):
            logging.info("checkpoints: saving the best variables of step %d (their save did not complete)",
                         best_step)
            self.save_best(best_step, variables)

    def save(self, step: int, variables: Mapping[str, Any], train_state: Mapping[str, Any],
             data_state: Mapping[str, Any], iterator: TrainIterator | None = None) -> None:
        """Save `step`; with `iterator`, also its per-process state and its global position.

        Grain's handler reads the iterator's state before this returns (Orbax runs
        synchronous handlers in the blocking part of an async save), so advancing the
        iterator afterwards does not change what is written.
        """
        data = dict(data_state)
        items = {
            VARIABLES: ocp.args.StandardSave(_saveable(variables)),
            TRAIN_STATE: ocp.args.StandardSave(_saveable(train_state)),
        }
        if iterator is not None:
            data.update(position=iterator.position, global_batch_size=iterator.global_batch_size,
                        num_processes=jax.process_count(), num_devices=jax.device_count())
            items[ITERATOR] = ocp.args.StandardSave(_saveable({"state": _state_array(iterator.get_state())}))
        items[DATA_STATE] = ocp.args.JsonSave(data)
        self._latest.save(step, args=ocp.args.Composite(**items))

    def save_best(self, step: int, variables: Mapping[str, Any]) -> None:
        """Save the best variables as `best/<step>`; the caller saves the latest checkpoint of
        the same step right after (see the class doc)."""
        assert self._best is not None, "open_best first"
        self._latest.wait_until_finished()
        item = ocp.args.StandardSave(_saveable(variables))
        self._best.save(step, args=ocp.args.Composite(**{VARIABLES: item}), force=True)

    def best_step(self) -> int | None:
        return None if self._best is None else self._best.latest_step()

    def restore(self, step: int, variables_like: Mapping[str, Any], train_state_like: Mapping[str, Any],
                iterator: TrainIterator | None = None) -> tuple[dict, dict, dict]:
        """(variables, train_state, data_state) of `step`, placed like the given trees.

        With `iterator`, also sets it to the checkpoint's data position (before the arrays
        are read, so its first batches load meanwhile); see `_restore_iterator`.
        """
        where = Path(self._latest.directory) / str(step)
        if not (where / TRAIN_STATE).is_dir() or not (where / DATA_STATE).is_dir():
            raise CheckpointError(
                f"{where}: holds the weights only (an export, a conversion or an older auto-encoder "
                "checkpoint), not a training run to resume: use another workdir, or read it as "
                "finetune.pretrained / predict.weights")
        _check_stored_variables(self._latest, step, variables_like)
        data_state = dict(self._latest.restore(
            step, args=ocp.args.Composite(**{DATA_STATE: ocp.args.JsonRestore()}))[DATA_STATE])
        if iterator is not None:
            self._restore_iterator(step, data_state, iterator)
        restored = self._latest.restore(step, args=ocp.args.Composite(**{
            VARIABLES: ocp.args.StandardRestore(_abstract(dict(variables_like))),
            TRAIN_STATE: ocp.args.StandardRestore(_abstract(dict(train_state_like))),
        }))
        return dict(restored[VARIABLES]), dict(restored[TRAIN_STATE]), data_state

    def _restore_iterator(self, step: int, data_state: Mapping[str, Any], iterator: TrainIterator) -> None:
        """Put `iterator` where the checkpointed run's next global batch starts.

        Same process count and global batch: each process reads its own state and checks it
        against the recorded global position. Otherwise the per-process states describe
        another sharding and are not read: the global position (a cube index, exact for any
        sharding, see `loader`) is enough to re-shard. A checkpoint without a recorded
        position (written before per-process states) resumes at step x global batch: the
        same cubes if one process wrote it with this batch size.
        """
        where = Path(self._latest.directory) / str(step)
        count, batch = jax.process_count(), iterator.global_batch_size
        if "position" not in data_state:
            position = step * batch
            logging.warning("data: %s has no recorded data position (an older checkpoint): resuming at "
                            "global cube %d = step x global batch", where, position)
            iterator.seek(position)
            return
        try:
            position = int(data_state["position"])
            written_by, written_batch = int(data_state["num_processes"]), int(data_state["global_batch_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: unreadable data position in '{DATA_STATE}' ({e!r})") from None
        if position < 0:
            raise CheckpointError(f"{where}: data position {position} is negative")
        if (written_by, written_batch) != (count, batch):
            written = f"written by {written_by} processes, now {count}" if written_by != count else "written"
            if written_batch != batch:
                comma = "," if written_by != count else ""
                written += f"{comma} with global batch {written_batch}, now {batch}"
            logging.info("data: checkpoint %s: re-sharded at global cube %d", written, position)
            iterator.seek(position)
            return
        index = jax.process_index()
        if int(data_state.get("num_devices", jax.device_count())) != jax.device_count():
            # Same processes, other devices: the rows are laid out differently; the global
            # position alone is exact.
            iterator.seek(position)
            return
        like = {"state": jax.ShapeDtypeStruct((jax.device_count(), len(_ROW)), np.int32,
                                              sharding=_rows_sharding())}
        try:
            restored = self._latest.restore(step, args=ocp.args.Composite(
                **{ITERATOR: ocp.args.StandardRestore(like)}))
            state = _state_of_row(np.asarray(restored[ITERATOR]["state"].addressable_data(0))[0])
        except Exception as e:  # noqa: BLE001 - Orbax raises various types
            raise CheckpointError(f"{where}: no readable data state for process {index} of {count} "
                                  f"({' '.join(str(e).split())[:200]})") from None
        if (state.get("position"), state.get("process_index"), state.get("process_count")) != (
                position, index, count):
            raise CheckpointError(
                f"{where}: process {index}'s data state {json.dumps(state)} disagrees with the "
                f"checkpoint's position (global cube {position}, {count} processes)")
        iterator.set_state(state)

    def wait(self) -> None:
        self._latest.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        if self._best is not None:
            self._best.close()


def read_stored_variables(workdir: str | os.PathLike) -> tuple[Path, int, dict] | None:
    """The variables of a run's best checkpoint (else its latest), whatever model wrote them.

    For fine-tuning from a pretraining workdir without knowing its model config: the
    stored shapes come from the checkpoint's metadata, and the arrays are read onto the
    first local device (the caller picks what it needs and places it).

    Returns:
      (checkpoint directory, step, {"params", "batch_stats"}), or None when `workdir` holds
      neither `best/` nor `checkpoints/` with a complete step.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for directory in (best_dir(workdir), checkpoint_dir(workdir)):
        if not directory.is_dir():
            continue
        with _manager(directory) as mngr:
            step = mngr.latest_step()
            if step is None:
                continue
            where, stored = _stored_metadata(mngr, step)
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                                    dict(stored))
            restored = mngr.restore(step, args=ocp.args.Composite(
                **{VARIABLES: ocp.args.StandardRestore(abstract)}))
            return where, step, jax.device_get(dict(restored[VARIABLES]))
    return None
