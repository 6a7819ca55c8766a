"""Host loader throughput: cubes/s from a visual-word store on local disk into batches.

Writes a store of random cubes (default 4,096 cubes of 64x64x32 uint16 = 1 GiB) in a
temporary directory (or reuses --store), then times the training pipeline
(`loader.train_dataset`: global shuffle, random reads, batching) for several thread counts,
and the released-layout source (memory-mapped .npy) for comparison. Reads come from the
page cache ("warm"); with --cold the OS page cache is dropped before each timed run
(needs root: /proc/sys/vm/drop_caches), so every read goes to the disk, and the timed
batches stay within the first epoch.

Prints JSON lines {"what", "impl", "shape", "dtype", "device", "cubes_per_s", "threads", ...}.

  python benchmarks/loader.py                         # 4,096 cubes, batch 64, threads 1,2,4,8
  python benchmarks/loader.py --cubes 1024 --batches 20 --threads 2
  sudo python benchmarks/loader.py --cold                # reads from disk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from transvw_jax import hostenv
from transvw_jax.data import loader, store


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _write_store(path: Path, cubes: int, shape: tuple[int, ...], dtype: str) -> None:
    rng = np.random.default_rng(0)
    base = rng.random((16,) + shape, dtype=np.float32)
    with store.StoreWriter(path, cube_shape=shape, dtype=dtype) as w:
        for i in range(cubes):
            w.add("train", base[i % 16], i % 50)
        w.commit(num_classes=50)


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _time(ds, batches: int) -> tuple[float, float]:
    it = iter(ds)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return first, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cubes", type=int, default=4096)
    p.add_argument("--cube", type=int, nargs=3, default=(64, 64, 32))
    p.add_argument("--dtype", default="uint16", choices=store.CUBE_DTYPES)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=60, help="timed batches per configuration")
    p.add_argument("--threads", type=int, nargs="+", default=(1, 2, 4, 8))
    p.add_argument("--store", type=Path, help="an existing store to read instead of a temporary one")
    p.add_argument("--cold", action="store_true", help="drop the OS page cache before each run (root)")
    args = p.parse_args()
    if args.cold and not _drop_page_cache():
        p.error("--cold needs write access to /proc/sys/vm/drop_caches (root)")

    tmp = Path(tempfile.mkdtemp(prefix="transvw-loader-bench-"))
    try:
        path = args.store
        if path is None:
            path = tmp / "store"
            t0 = time.perf_counter()
            _write_store(path, args.cubes, tuple(args.cube), args.dtype)
            dt = time.perf_counter() - t0
            print(json.dumps({"what": "store/write", "impl": "array_record", "shape": list(args.cube),
                              "dtype": args.dtype, "device": _cpu_name(),
                              "cubes_per_s": round(args.cubes / dt, 1)}))
        s = store.open_store(path)
        src = s.source("train")
        common = {"shape": [args.batch, *s.cube_shape], "dtype": s.dtype, "device": _cpu_name()}
        if args.cold and (args.batches + 1) * args.batch > len(src):
            p.error(f"--cold: {args.batches + 1} batches of {args.batch} exceed the {len(src)} cubes of one "
                    "epoch (later reads would come from the cache)")
        for threads in args.threads:
            ds = loader.train_dataset(src, batch_size=args.batch, seed=0, process_index=0, process_count=1,
                                      num_threads=threads)
            if args.cold:
                _drop_page_cache()
            first, dt = _time(ds, args.batches)
            print(json.dumps({"what": "loader/train", "impl": "grain+array_record", **common,
                              "cache": "cold" if args.cold else "warm", "threads": threads,
                              "cubes_per_s": round(args.batches * args.batch / dt, 1),
                              "first_batch_s": round(first, 3), "cubes": len(src)}))

        released_dir = tmp / "released"
        released_dir.mkdir()
        n = min(len(src), 1024)
        data = np.lib.format.open_memmap(released_dir / "train_data1_vwGen_ex_ref_fold1.0.npy", "w+",
                                         np.float32, (n, *s.cube_shape))
        for i in range(n):
            data[i] = store.decode_cubes(src[i]["cube"])
        data.flush()
        del data
        np.save(released_dir / "train_label1_vwGen_ex_ref_fold1.0.npy", np.zeros((n, 1)))
        rel = store.ReleasedSource(released_dir, resolutions=(1,))
        for threads in args.threads:
            ds = loader.train_dataset(rel, batch_size=args.batch, seed=0, process_index=0, process_count=1,
                                      num_threads=threads)
            if args.cold:
                _drop_page_cache()
            timed = min(args.batches, n // args.batch - 1)
            first, dt = _time(ds, timed)
            print(json.dumps({"what": "loader/train", "impl": "grain+released_npy", "shape": common["shape"],
                              "dtype": "float32", "device": common["device"],
                              "cache": "cold" if args.cold else "warm", "threads": threads,
                              "cubes_per_s": round(timed * args.batch / dt, 1),
                              "cubes": n}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv)
    main()
