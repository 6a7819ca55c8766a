"""Orbax checkpoints behind two calls, so that an Orbax API change is a one-file change.

Layout of `<workdir>/checkpoints/<step>/`: the item `variables` holds the model's
`{'params', 'batch_stats'}`; later items (optimiser state, RNG, data iterator) sit beside
it, so export and fine-tuning read the weights without knowing the training state.
Orbax writes each step to a temporary directory and renames it when complete, so a
half-written step is never listed, never restored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from transvw_jax.errors import CheckpointError

VARIABLES = "variables"


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def _manager(directory: Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        directory, options=options, item_handlers={VARIABLES: ocp.StandardCheckpointHandler()}
    )


def save(workdir: str | os.PathLike, step: int, variables: Mapping[str, Any],
         max_to_keep: int | None = None) -> None:
    """Save the model variables as checkpoint `step` under `<workdir>/checkpoints`."""
    with _manager(checkpoint_dir(workdir), max_to_keep) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardSave(dict(variables))}))
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
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dict(like))
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
DATA_STATE = "data"


def best_dir(workdir: str | os.PathLike) -> Path:
    """The best checkpoint by validation loss (variables only): `<workdir>/best`."""
    return Path(workdir).absolute() / "best"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class RunCheckpointer:
    """Checkpoints of a training run: keep the last N complete states, plus the best.

    `<workdir>/checkpoints/<step>/` holds `variables` (params, batch_stats: what export and
    fine-tuning read), `train_state` (optimiser state, step, RNG) and `data` (the Grain
    iterator state, JSON); together they resume a run exactly. Saves are asynchronous
    (training continues while the arrays are written); Orbax writes each step under a
    temporary name and renames it when complete, so a kill mid-save leaves the previous
    step as the latest. `<workdir>/best/<step>/` keeps the variables of the best
    validation loss (one step).
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 3):
        handlers = {VARIABLES: ocp.StandardCheckpointHandler(), TRAIN_STATE: ocp.StandardCheckpointHandler(),
                    DATA_STATE: ocp.JsonCheckpointHandler()}
        self._latest = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers=handlers)
        self._best = ocp.CheckpointManager(
            best_dir(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_handlers={VARIABLES: ocp.StandardCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, variables: Mapping[str, Any], train_state: Mapping[str, Any],
             data_state: Mapping[str, Any]) -> None:
        self._latest.save(step, args=ocp.args.Composite(**{
            VARIABLES: ocp.args.StandardSave(dict(variables)),
            TRAIN_STATE: ocp.args.StandardSave(dict(train_state)),
            DATA_STATE: ocp.args.JsonSave(dict(data_state)),
        }))

    def save_best(self, step: int, variables: Mapping[str, Any]) -> None:
        self._best.save(step, args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardSave(dict(variables))}),
                        force=True)

    def best_step(self) -> int | None:
        return self._best.latest_step()

    def restore(self, step: int, variables_like: Mapping[str, Any],
                train_state_like: Mapping[str, Any]) -> tuple[dict, dict, dict]:
        """(variables, train_state, data_state) of `step`, placed like the given trees."""
        _check_stored_variables(self._latest, step, variables_like)
        restored = self._latest.restore(step, args=ocp.args.Composite(**{
            VARIABLES: ocp.args.StandardRestore(_abstract(dict(variables_like))),
            TRAIN_STATE: ocp.args.StandardRestore(_abstract(dict(train_state_like))),
            DATA_STATE: ocp.args.JsonRestore(),
        }))
        return dict(restored[VARIABLES]), dict(restored[TRAIN_STATE]), dict(restored[DATA_STATE])

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
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
