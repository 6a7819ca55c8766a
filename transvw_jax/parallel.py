"""Devices, mesh and shardings: the one place that knows how work is spread.

- A 2D mesh ("data", "fsdp") over every device of every process. The batch is split over
  both axes (all devices do data parallelism); with fsdp > 1, large parameters and their
  optimiser state are also split along "fsdp" (each device keeps 1/fsdp of them, XLA
  gathers them for the convolutions), which is what lets a wide model fit. fsdp = 1 (the
  default) replicates the state: right for the 19-33M-parameter reference networks.
- Per-process host batches become one global `jax.Array` with
  `jax.make_array_from_process_local_data`: process p contributes its rows, in process
  order, so the global batch is the same whichever way it is split.
- `initialize` joins the processes of a multi-host job with `jax.distributed`, from the
  environment (TPU pods, SLURM: JAX detects both) or from explicit settings (coordinator
  address, process count and id: any launcher, `launch/local.sh`). It must run before
  anything touches a JAX backend; `stages.run` calls it right after the config (checked
  without side effects) and before resolving the config's automatic values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transvw_jax.errors import ConfigError

DATA, FSDP = "data", "fsdp"
DISTRIBUTED_MODES = ("auto", "off", "explicit", "environment")
# Parameters smaller than this stay replicated under fsdp: sharding them saves little
# memory and costs a collective each.
FSDP_MIN_SIZE = 1 << 16


def default_config() -> ml_collections.ConfigDict:
    """config.parallel for a config that has none (a library caller's); configs/default.py
    holds the same values with their meanings and is the source of truth (a test keeps them equal)."""
    c = ml_collections.ConfigDict()
    c.fsdp = 1  # devices per parameter shard; 1 = replicate the state (pure data parallel)
    # auto: join a multi-process job when the environment describes one (TPU pod, SLURM,
    # JAX_COORDINATOR_ADDRESS), else run alone (config.json records which: environment |
    # off); environment: join from the environment or fail; off: single process;
    # explicit: the three values below.
    c.distributed = "auto"
    c.coordinator_address = ""  # host:port of process 0
    c.num_processes = 1
    c.process_id = 0
    # A process that sends no heartbeat for this long is lost: the others stop with a line
    # naming it (transvw_jax/multihost.py) instead of waiting in a collective.
    c.heartbeat_timeout_s = 60
    # Where compiled XLA programs are kept between runs (a restart, a resumed job, the
    # next stage compile nothing they compiled before): "workdir" = <workdir>/xla_cache
    # (shared storage on a pod: process 0 writes, every process reads), "off", or a
    # directory. JAX_COMPILATION_CACHE_DIR in the environment takes precedence.
    c.compilation_cache = "workdir"
    return c


def _cluster_in_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if env.get("TPU_WORKER_HOSTNAMES") and "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True  # GKE
    return _on_cloud_tpu_vm()


def _on_cloud_tpu_vm() -> bool:
    """TPU chips on this host and the TPU runtime installed: a Cloud TPU VM. Its workers
    (started with `gcloud compute tpus tpu-vm ssh --worker=all`) publish the pod's layout
    through the metadata server, which only `jax.distributed.initialize()` reads, so it
    must be called (even on a one-host slice, where it finds one process: Orbax's async
    checkpointer also needs the distributed client). Reads /sys, starts no backend."""
    platforms = _requested_platforms()
    if platforms and "tpu" not in platforms:
        return False
    try:
        import importlib.util

        from jax._src import hardware_utils  # what JAX itself checks before touching libtpu

        if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
            return False
        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # noqa: BLE001 - a private JAX module: when it moves, do not guess
        return False
    return chips > 0


def initialize(cfg: ml_collections.ConfigDict) -> str:
    """Join the multi-process job described by `cfg` (config.parallel). Returns the mode
    that applied: "explicit" or "environment" (joined) or "off" (a single process).

    Must run before anything touches a JAX backend. Joins with recoverability on, so that
    a lost process is reported to the others rather than aborting them (see multihost.py).
    """
    if cfg.distributed not in DISTRIBUTED_MODES:
        raise ConfigError(
            f"parallel.distributed: {cfg.distributed!r} is not one of {', '.join(DISTRIBUTED_MODES)}"
        )
    if jax.distributed.is_initialized():
        return "explicit" if cfg.distributed == "explicit" else "environment"
    if cfg.distributed == "off":
        return "off"
    heartbeat = int(cfg.get("heartbeat_timeout_s", 60))
    if heartbeat < 1:
        raise ConfigError(f"parallel.heartbeat_timeout_s must be >= 1, got {heartbeat}")
    if cfg.distributed == "explicit":
        if (
            not cfg.coordinator_address
            or cfg.num_processes < 1
            or not 0 <= cfg.process_id < cfg.num_processes
        ):
            raise ConfigError(
                "parallel.distributed='explicit' needs parallel.coordinator_address (host:port), "
                "parallel.num_processes >= 1 and 0 <= parallel.process_id < num_processes"
            )
        _before_joining()
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                                   heartbeat_timeout_seconds=heartbeat)
        mode = "explicit"
    elif _cluster_in_environment() or cfg.distributed == "environment":
        _before_joining()
        try:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
        except ValueError as e:
            raise ConfigError(f"parallel.distributed={cfg.distributed!r}: no multi-process job found in the "
                              f"environment ({e})") from None
        mode = "environment"
    else:
        return "off"
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return mode


def _before_joining() -> None:
    _cpu_collectives()
    jax.config.update("jax_enable_recoverability", True)


def _cpu_collectives() -> None:
    """CPU-only jobs (tests, laptops) need a cross-process collective library: gloo."""
    platforms = _requested_platforms()
    if platforms and platforms[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _requested_platforms() -> list[str]:
    """The platforms JAX was told to use (JAX_PLATFORMS or jax_platforms), [] = any."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
    return [p for p in platforms.split(",") if p]


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(f"parallel.fsdp={fsdp} must divide the device count ({len(devices)})")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, (DATA, FSDP))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P((DATA, FSDP)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _param_spec(shape: Sequence[int], fsdp: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    # Shard the largest axis that divides evenly (for a conv kernel: usually channels).
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, state: Any) -> Any:
    """A NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs): fsdp or replicated."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(np.shape(x), fsdp)), state)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the mesh (rows ordered by process)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def local_batch_size(global_size: int, mesh: Mesh | None = None, key: str = "train.batch_size") -> int:
    """Rows each process loads for a global batch of `global_size` split over `mesh`
    (default: every device); `key` names the setting in the error."""
    count = jax.process_count()
    devices = jax.device_count() if mesh is None else mesh.size
    if global_size % count or global_size % devices:
        raise ConfigError(
            f"{key}={global_size} must be divisible by the device count "
            f"({devices} devices in {count} processes)"
        )
    return global_size // count
