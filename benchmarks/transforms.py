"""Throughput of the restoration transforms on the default backend (jit-compiled, warm) vs numpy.

The numpy/scipy side is `transvw_jax.transforms.reference_numpy`, the per-cube statement
of the same procedures the way the original code does them (a Python loop over shuffle
blocks, a 100,000-point Bezier curve with np.interp, scipy's gaussian_filter +
map_coordinates), run in this one process on one core. Prints JSON lines:
  {"what": "transform/<name>" | "policy/<name>", "impl": "jax" | "numpy", "shape", "batch",
   "dtype", "device", "cubes_per_s"}
and one line per policy with "what": "speedup/<policy>" and "ratio" (jax / numpy). The
elastic and TransVW lines also say which elastic implementation ran ("elastic_impl": xla,
or native, the CPU custom call that "auto" picks on a one-device CPU backend).

  python benchmarks/transforms.py                      # batch 64 of 64x64x32, float32
  python benchmarks/transforms.py --only policy --numpy-cubes 10
  python benchmarks/transforms.py --only elastic --elastic-impl xla --no-numpy
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transvw_jax import hostenv
from transvw_jax import transforms as T
from transvw_jax.transforms import reference_numpy as R


# --------------------------------------------------------------------------- cases
def cases(chunk: int, elastic_impl: str = "auto"):
    """(what, batch function (keys, cubes) -> outputs, numpy per-cube function). Single
    transforms are a jit(vmap) of the per-cube function; the policies run as the train
    step runs them (`transforms.batch_policy`, all three outputs, `chunk` cubes at a time)."""
    transvw_cfg, genesis_cfg = T.default_config("transvw"), T.default_config("genesis")
    transvw_cfg.batch_chunk = genesis_cfg.batch_chunk = chunk
    transvw_cfg.elastic.impl = elastic_impl
    flip_only = lambda k, x: T.flip(k, x, x, 0.4)[0]  # noqa: E731
    single = [
        ("transform/nonlinear", T.nonlinear, R.nonlinear),
        ("transform/local_shuffle_5", functools.partial(T.local_shuffle, num_blocks=5),
         functools.partial(R.local_shuffle, num_blocks=5)),
        ("transform/local_shuffle_10000", functools.partial(T.local_shuffle, num_blocks=10_000),
         functools.partial(R.local_shuffle, num_blocks=10_000)),
        ("transform/in_paint_1", functools.partial(T.in_paint, max_blocks=1),
         functools.partial(R.in_paint, max_blocks=1)),
        ("transform/out_paint_1+4", functools.partial(T.out_paint, max_extra_blocks=4),
         functools.partial(R.out_paint, max_extra_blocks=4)),
        ("transform/flip", flip_only, lambda rng, x: R.flip(rng, x, x)[0]),
        ("transform/elastic", functools.partial(T.elastic, impl=elastic_impl), R.elastic),
    ]
    return [(what, jax.vmap(fn), np_fn) for what, fn, np_fn in single] + [
        ("policy/transvw", functools.partial(T.batch_policy, cfg=transvw_cfg), R.transvw),
        ("policy/genesis", functools.partial(T.batch_policy, cfg=genesis_cfg), R.genesis),
    ]


def time_jax(fn, batch, shape, iters, dtype) -> float:
    run = jax.jit(fn)
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).random((batch, *shape)), dtype))
    keys = jax.random.split(jax.random.key(0), batch)
    jax.block_until_ready(run(keys, x))  # compile + warm
    times = []
    for i in range(iters):
        k = jax.random.split(jax.random.key(i + 1), batch)
        start = time.perf_counter()
        jax.block_until_ready(run(k, x))
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def time_numpy(fn, shape, cubes) -> float:
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    fn(rng, x)  # warm
    start = time.perf_counter()
    for _ in range(cubes):
        fn(rng, x)
    return cubes / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cube", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5, help="timed jax steps (median)")
    p.add_argument("--numpy-cubes", type=int, default=60,
                   help="cubes timed for numpy (20 gave a ~15%% run-to-run spread on a 2-core VM)")
    p.add_argument("--only", default="", help="substring filter on 'what'")
    p.add_argument("--no-numpy", action="store_true")
    p.add_argument("--chunk", type=int, default=-1,
                   help="transforms.batch_chunk for the policies: -1 auto (transforms.CPU_BATCH_CHUNK on "
                        "the CPU), 0 whole batch")
    p.add_argument("--elastic-impl", default="auto", choices=T.ELASTIC_IMPLS,
                   help="transforms.elastic.impl for the elastic transform and the TransVW policy")
    args = p.parse_args()
    shape, device = tuple(args.cube), jax.devices()[0].device_kind
    common = {"shape": list(shape), "batch": args.batch, "dtype": args.dtype,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    chunks = {p: T.resolve_batch_chunk(ml_collections.ConfigDict({"batch_chunk": args.chunk, "policy": p}))
              for p in T.POLICIES}
    elastic_impl = T.resolve_elastic_impl(args.elastic_impl, shape)
    rates = {}
    for what, jax_fn, np_fn in cases(args.chunk, args.elastic_impl):
        if args.only not in what:
            continue
        rate = time_jax(jax_fn, args.batch, shape, args.iters, jnp.dtype(args.dtype))
        extra = {"chunk": chunks[what.split("/")[1]]} if what.startswith("policy/") else {}
        if what in ("transform/elastic", "policy/transvw"):
            extra["elastic_impl"] = elastic_impl
        print(json.dumps({"what": what, "impl": "jax", **common, **extra, "device": device,
                          "cubes_per_s": round(rate, 1)}), flush=True)
        if args.no_numpy:
            continue
        np_rate = time_numpy(np_fn, shape, args.numpy_cubes)
        print(json.dumps({"what": what, "impl": "numpy", **common, "batch": 1, "dtype": "float32",
                          "device": "cpu (1 core)", "cubes_per_s": round(np_rate, 2)}), flush=True)
        rates[what] = (rate, np_rate)
    for what, (rate, np_rate) in rates.items():
        if what.startswith("policy/"):
            print(json.dumps({"what": "speedup/" + what.split("/")[1], "impl": "jax/numpy", **common,
                              "device": device, "ratio": round(rate / np_rate, 1)}), flush=True)


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv)
    main()
