"""End-to-end pretraining throughput: store -> Grain loader -> global batch -> the real train step.

Writes a temporary visual-word store of random-ish uint16 cubes (smooth blocks plus noise,
enough for a few batches beyond the warm-up and timed ones), then in one process:

1. compiles the project's train step (`pretraining.build_run(config, mesh).steps.train`:
   TransVW objective, YNet3D, Adam with the default schedule, the cubes decoded and
   transformed on the device with the TransVW policy) and warms it up with batches from
   the loader;
2. "step_only": times `--steps` steps on ONE fixed device batch (no loader, no transfer);
3. "end_to_end": times `--steps` steps where every batch comes from `loader.train_dataset`
   (global shuffle, `--threads` read threads, `--prefetch` batches read ahead) and
   `parallel.global_batch` (host -> device) before the step.

Both loops dispatch the steps without waiting (JAX runs them asynchronously) and block
once at the end, so while the device computes step i, the Python loop already reads and
transfers batch i+1 and the loader's threads read ahead. "overhead" is the ratio of the
two times per step: 1.0 means loading is completely hidden behind compute.

Caveats:
- On a CPU-only machine compute and loading compete for the same cores (here 2 of them),
  and XLA's thread pool, Grain's read threads and the Python loop all share them: the
  overhead measured there is an upper bound on what an accelerator would see, where the
  step runs on the device and the host cores only load.
- The prefetch buffer is full when the end-to-end loop starts (the loader reads ahead
  during warm-up and step_only), which is its steady state when loading is faster than
  the step. If loading were the bottleneck, the first `--prefetch` batches would come for
  free: use `--steps` well above `--prefetch` to measure a loader-bound device.
- The store is written to a temporary directory just before, so reads come from the page
  cache (see benchmarks/loader.py --cold for disk reads).

JSON lines:
  {"what": "step_only" | "end_to_end", "impl": "jax", "shape", "dtype", "device",
   "cubes_per_s", "s_per_step", "batch", "width", "steps", ...}
  {"what": "overhead", ..., "ratio": end_to_end s_per_step / step_only s_per_step}

  python benchmarks/end_to_end.py                          # width 32, batch 2 on CPU
  python benchmarks/end_to_end.py --width 8 --batch 2 --steps 4
  python benchmarks/end_to_end.py --batch 64 --dtype bfloat16 --steps 50   # an accelerator
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from train_step import real_config  # the same step config as train_step.py (same folder)

from transvw_jax import hostenv, parallel
from transvw_jax.data import loader, store
from transvw_jax.models.layers import CONV_IMPLS
from transvw_jax.tasks import pretraining


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=44)
    p.add_argument("--batch", type=int, default=None,
                   help="global batch; default 2 on CPU, 16 per device on accelerators")
    p.add_argument("--cube", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    p.add_argument("--steps", type=int, default=10, help="timed steps, per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps from the loader (1st compiles)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--conv-impl", default="xla3d", choices=CONV_IMPLS)
    p.add_argument("--threads", type=int, default=loader.DEFAULT_THREADS, help="loader read threads")
    p.add_argument("--prefetch", type=int, default=loader.DEFAULT_PREFETCH, help="batches read ahead")
    p.add_argument("--extra-batches", type=int, default=4,
                   help="the store holds (warmup + steps + 1 + this) batches of cubes")
    p.add_argument("--tmpdir", default=None, help="where to write the temporary store")
    return p.parse_args()


def write_store(path: Path, cubes: int, shape: tuple[int, int, int], num_classes: int) -> None:
    """`cubes` smooth random cubes in [0, 1] (8^3-voxel blocks + noise), labels i % num_classes."""
    rng = np.random.default_rng(0)
    coarse = tuple(max(1, s // 8) for s in shape)
    block = np.ones(tuple(s // c for s, c in zip(shape, coarse, strict=True)), np.float32)
    with store.StoreWriter(path, cube_shape=shape, dtype="uint16") as w:
        for i in range(cubes):
            cube = np.kron(rng.random(coarse, dtype=np.float32), block)
            cube = np.clip(cube + 0.05 * rng.standard_normal(shape, dtype=np.float32), 0.0, 1.0)
            w.add("train", cube, i % num_classes)
        w.commit(num_classes=num_classes)


def build(args, batch: int):
    """(train step, TrainState, batch sharding), as `pretraining.train_and_evaluate` sets them up."""
    mesh = parallel.make_mesh(1)
    run = pretraining.build_run(real_config(args, batch, args.dtype), mesh)
    return run.steps.train, run.init(0), parallel.batch_sharding(mesh)


def open_loader(path: Path, local: int, threads: int, prefetch: int):
    """An iterator of this process's training batches from the store at `path`."""
    source = store.open_store(path).source("train")
    dataset = loader.train_dataset(source, batch_size=local, seed=0, num_threads=threads, prefetch=prefetch)
    return iter(dataset)


def time_loops(step, state, sharding, it, *, warmup: int, steps: int) -> dict:
    """Warm up with `warmup` loader batches (the first call compiles), then time `steps`
    steps on one fixed device batch ("step_s") and `steps` steps fed by the loader
    ("e2e_s"), both dispatched without waiting. Returns seconds per step, the warm-up
    seconds, the final loss and the last TrainState, "state" (the step donates its input state)."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):  # the first call compiles
        state, m = step(state, parallel.global_batch(next(it), sharding))
        jax.block_until_ready(m["loss"])
    warm_s = time.perf_counter() - start

    fixed = parallel.global_batch(next(it), sharding)
    jax.block_until_ready(fixed)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, fixed)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - start) / steps

    start = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, parallel.global_batch(next(it), sharding))
    jax.block_until_ready((state, m))
    e2e_s = (time.perf_counter() - start) / steps
    return {"step_s": step_s, "e2e_s": e2e_s, "warm_s": warm_s, "loss": float(jax.device_get(m["loss"])),
            "state": state}


def main() -> None:
    args = parse_args()
    device = jax.devices()[0]
    batch = args.batch or (2 if device.platform == "cpu" else 16 * jax.device_count())
    local = parallel.local_batch_size(batch)
    shape = tuple(args.cube)
    base = {"impl": "jax", "shape": [batch, *shape, 1], "dtype": args.dtype, "device": device.device_kind,
            "batch": batch, "width": args.width}

    step, state, sharding = build(args, batch)
    with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="e2e-store-") as tmp:
        path = Path(tmp) / "store"
        cubes = local * (args.warmup + args.steps + 1 + args.extra_batches)
        start = time.perf_counter()
        write_store(path, cubes, shape, args.num_classes)
        write_s = time.perf_counter() - start
        it = open_loader(path, local, args.threads, args.prefetch)
        timed = time_loops(step, state, sharding, it, warmup=args.warmup, steps=args.steps)
        close = getattr(it, "close", None)
        if close is not None:
            close()
    step_s, e2e_s, warm_s, loss = timed["step_s"], timed["e2e_s"], timed["warm_s"], timed["loss"]

    common = {"steps": args.steps, "threads": args.threads, "prefetch": args.prefetch,
              "conv_impl": args.conv_impl, "store_dtype": "uint16"}
    print(json.dumps({"what": "step_only", **base, "cubes_per_s": round(batch / step_s, 4),
                      "s_per_step": round(step_s, 4), **common}), flush=True)
    print(json.dumps({"what": "end_to_end", **base, "cubes_per_s": round(batch / e2e_s, 4),
                      "s_per_step": round(e2e_s, 4), **common, "store_cubes": cubes,
                      "store_write_s": round(write_s, 2), "warmup_s": round(warm_s, 2),
                      "final_loss": round(loss, 5)}), flush=True)
    print(json.dumps({"what": "overhead", **base, "ratio": round(e2e_s / step_s, 4)}), flush=True)


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv)
    main()
