"""TransVW pretraining on a TPU pod slice (or any multi-host job): configs/luna16_transvw.py
scaled out.

Launch the same command on every worker (launch/tpu_pod.sh does it):
  python -m transvw_jax.main --config configs/tpu_pod.py --workdir /mnt/disks/shared/runs/pod
jax.distributed is joined from the environment (parallel.distributed = "auto" detects TPU
pods and SLURM), so no process count or coordinator address is needed.

Discovery is NOT run here: it is a single-host job (process 0 would do all of it while the
other workers wait). Run it once beforehand on one machine, e.g.
  python -m transvw_jax.main --config configs/luna16_transvw.py --workdir /mnt/disks/data \\
      --config.stages="('discover',)" --config.discovery.volumes_dir=/path/to/LUNA16
which writes /mnt/disks/data/store, the store this config reads.

Shared storage: every worker reads the store and writes checkpoints into the workdir, so
both must be on storage mounted at the same path on every worker (a Filestore/NFS mount,
a persistent disk attached read-only to every worker for the store, gcsfuse). gs:// URLs
are NOT supported: the store and the workdir are read and written as local paths.
"""

from pathlib import Path

import ml_collections

from transvw_jax.fileio import load_module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: None (the store written by discovery) or "released" (the released cubes)."""
    base = load_module(Path(__file__).with_name("luna16_transvw.py"))
    config = base.get_config(arg)
    config.stages = ("pretrain", "export")

    config.model.dtype = "bfloat16"  # bf16 compute on the MXUs; float32 weights and BN statistics

    # The store, on storage every worker can read (placeholder: override).
    config.data.store_dir = "/mnt/disks/data/store"
    if arg == "released":
        config.data.released_dir = "/mnt/disks/data/TransVW_data"  # placeholder: override
    config.data.num_threads = 16  # parallel reads per worker (process)
    config.data.prefetch = 8  # read-ahead, in per-process batches (1024 / workers cubes each)

    config.parallel.distributed = "auto"  # TPU pod / SLURM detected from the environment
    # 1 = pure data parallelism, the state replicated on every chip: right for the 19-33M
    # parameter reference networks. Raise it (2, 4, 8: it must divide the device count) only
    # when parameters + Adam state no longer fit one chip, e.g. a much wider model (width >= 128);
    # each chip then holds 1/fsdp of the large ones. (Activations scale with the per-chip
    # batch and cube size instead: lower those when they are what runs out of memory.)
    config.parallel.fsdp = 1

    t = config.train
    # GLOBAL batch: split over all chips, so it must be divisible by the device count
    # (1024 = 4 cubes per chip on 256 chips, 32 per chip on a v4-64's 32 chips).
    t.batch_size = 1024
    t.log_every = 10
    # The base config's schedule is in epochs (train.schedule_unit = "epochs"), converted to
    # steps of the store at this batch when training starts (a full 26,400-cube store:
    # 26,400 // 1024 = 25 steps per epoch), for "released" as well.
    # Same learning rate as at batch 64; a short linear warmup (2 epochs, in the schedule's
    # unit) steadies the first large-batch Adam steps (0 = the reference).
    t.warmup_steps = 2
    return config
