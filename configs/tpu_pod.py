"""TransVW pretraining on a TPU pod slice (or any multi-host job): configs/luna16_transvw.py
scaled out.

Launch the same command on every worker (`launch/tpu_pod.sh setup`, once, then
`launch/tpu_pod.sh run` do it, with a Python 3.11 venv and per-worker logs):
  python -m transvw_jax.main --config configs/tpu_pod.py --workdir /mnt/disks/shared/runs/pod
jax.distributed is joined from the environment (parallel.distributed = "auto" detects TPU
pods and SLURM), so no process count or coordinator address is needed.

Discovery is NOT run here: most of it is host-side work (reading, resizing and cropping
the volumes on process 0 while the other workers wait; only its small auto-encoder trains
on every worker). Run it once beforehand on one machine, e.g.
  python -m transvw_jax.main --config configs/luna16_transvw.py --workdir /mnt/disks/data \\
      --config.stages="('discover',)" --config.discovery.volumes_dir=/path/to/LUNA16
which writes /mnt/disks/data/store, the store this config reads.

Shared storage: every worker reads the store and writes checkpoints into the workdir, so
both must be on storage mounted at the same path on every worker (a Filestore/NFS mount,
a persistent disk attached read-only to every worker for the store, gcsfuse). gs:// URLs
are NOT supported: the store and the workdir are read and written as local paths.

Large-batch recipe (a recipe to VALIDATE, not the paper's): the reference trains with Adam
at 1e-3 on batches of 64. At 1024 (16x) an epoch holds 16x fewer updates, so the same
learning rate would make far less progress per epoch. This config scales the peak learning
rate with the square root of the batch ratio (train.lr_scaling = "sqrt": 1e-3 x sqrt(1024 /
64) = 4e-3, the usual rule for Adam) and ramps up to it linearly over the first
WARMUP_EPOCHS epochs; the step decay, patience and epoch limit stay the reference's, in
epochs. Nothing in the papers was trained this way: before relying on it, compare its
validation loss per epoch with a batch-64 run of configs/luna16_transvw.py on the same
store (pretrain_summary.json and the metrics), and fall back to lr_scaling="none" (the
reference learning rate) or "linear" with a longer warm-up if it is worse.
"""

from pathlib import Path

import ml_collections

from transvw_jax.fileio import load_module

WARMUP_EPOCHS = 5  # linear warm-up to the scaled learning rate (125 steps of 1024 on a full store)
# One evaluation and checkpoint every 4 epochs: at 25 steps per epoch, one per epoch would
# stop the pod every 25 steps (an evaluation pass and a checkpoint write each time).
EVAL_EPOCHS = 4


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

    # parallel.distributed: the base's "auto", which detects a TPU pod or SLURM from the
    # environment. parallel.fsdp: the base's 1 = pure data parallelism, the state replicated
    # on every chip: right for the 19-33M parameter reference networks. Raise it (2, 4, 8:
    # it must divide the device count) only when parameters + Adam state no longer fit one
    # chip, e.g. a much wider model (width >= 128);
    # each chip then holds 1/fsdp of the large ones. (Activations scale with the per-chip
    # batch and cube size instead: lower those when they are what runs out of memory.)

    t = config.train
    # GLOBAL batch: split over all chips, so it must be divisible by the device count
    # (1024 = 4 cubes per chip on 256 chips, 32 per chip on a v4-64's 32 chips).
    t.batch_size = 1024
    t.log_every = 10
    # The base config's schedule is in epochs (train.schedule_unit = "epochs"), converted to
    # steps of the store at this batch when training starts (a full 26,400-cube store:
    # 26,400 // 1024 = 25 steps per epoch), for "released" as well.
    # The large-batch recipe (module docstring; to validate, not the paper's): peak learning
    # rate 1e-3 x sqrt(1024 / 64) = 4e-3, reached by a linear warm-up over WARMUP_EPOCHS
    # epochs (warmup_steps is in the schedule's unit, epochs), which steadies the first
    # large-batch Adam steps. lr_scaling scales from reference_batch_size (the base's 64),
    # so a batch override rescales the learning rate by itself.
    t.lr_scaling = "sqrt"
    t.warmup_steps = WARMUP_EPOCHS
    # Evaluate and checkpoint every EVAL_EPOCHS epochs (sample_every stays 10 epochs).
    # patience stays 50 EPOCHS: with schedule_unit = "epochs" it is converted to the
    # evaluations those epochs hold (ceil(50 / 4) = 13), so early stopping waits as long as
    # the reference's. decay_every (40 epochs) stays a multiple of the cadence.
    t.eval_every = t.checkpoint_every = EVAL_EPOCHS
    return config
