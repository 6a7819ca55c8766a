"""Forward time of one 3x3x3 'SAME' convolution in several formulations (issue 6).

A probe for the CPU convolution path: XLA:CPU runs 3D convolutions on a generic path
(~70-77 GFLOP/s on the 2-core Xeon), while its float32 matmul reaches ~290-315 GFLOP/s at
4096^3. Forms:
  xla3d     `lax.conv_general_dilated` (conv_impl "xla3d");
  matmul    the model's CPU path, `layers.conv3d_same(x, w, "matmul")`: patch matrices
            (27 shifted views on channels, K = 27 * C_in) of slabs of x-planes;
  outshift  a candidate not in the package: per slab of `--slab` x-planes, multiply by
            all 27 kernel taps at once (N = 27 * C_out) and add the 27 shifted slices of
            the product (fewer bytes than patches when C_in > C_out).
Each line checks the result against `lax.conv_general_dilated` (max error relative to the
largest output value) and prints JSON:
  {"what": "conv3d_forward", "impl", "shape", "dtype", "device", "cubes_per_s",
   "gflop_per_s", "s_per_call", "rel_err", "c_in", "c_out", "slab"}

  python benchmarks/conv_forms.py                      # 32->64 and 192->64 at 2x64x64x32
  python benchmarks/conv_forms.py --layer 64 64 --slab 4
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transvw_jax import hostenv
from transvw_jax.models.layers import conv3d_same

DIMS = ("NDHWC", "DHWIO", "NDHWC")


def xla3d(x, w):
    return lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=DIMS)


def _slabs(x, slab, fn):
    """fn(padded slab of `slab` + 2 x-planes of one cube) -> (slab, Y, Z, C_out), over
    batch x slabs."""
    b, n = x.shape[0], x.shape[1]
    if n % slab:
        raise SystemExit(f"--slab {slab} must divide the x size {n}")
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    per = n // slab

    def one(i):
        start = (i // per, (i % per) * slab, 0, 0, 0)
        return fn(lax.dynamic_slice(xp, start, (1, slab + 2, *xp.shape[2:]))[0])

    out = lax.map(one, jnp.arange(b * per))
    return out.reshape(b, n, *out.shape[2:])


def outshift(x, w, slab):
    c_in, c_out = w.shape[3], w.shape[4]
    y, z = x.shape[2], x.shape[3]
    taps = w.transpose(3, 0, 1, 2, 4).reshape(c_in, 27 * c_out)

    def fn(s):
        prod = (s.reshape(-1, c_in) @ taps).reshape(slab + 2, y + 2, z + 2, 3, 3, 3, c_out)
        return sum(
            prod[i : i + slab, j : j + y, k : k + z, i, j, k]
            for i in range(3)
            for j in range(3)
            for k in range(3)
        )

    return _slabs(x, slab, fn)


def timed(fn, args, iters):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--layer",
        type=int,
        nargs=2,
        action="append",
        metavar=("C_IN", "C_OUT"),
        help="channels of a layer to time (repeatable); default 32 64 and 192 64",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cube", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    p.add_argument("--slab", type=int, default=2, help="x-planes per chunk of the outshift form")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    for c_in, c_out in args.layer or [(32, 64), (192, 64)]:
        x = jnp.asarray(rng.random((args.batch, *args.cube, c_in)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, 3, c_in, c_out)) / np.sqrt(27 * c_in), jnp.float32)
        flop = 2.0 * args.batch * np.prod(args.cube) * 27 * c_in * c_out
        reference = jax.jit(xla3d)(x, w)
        scale = float(jnp.max(jnp.abs(reference)))
        forms = {
            "xla3d": xla3d,
            "matmul": lambda x, w: conv3d_same(x, w, "matmul"),
            "outshift": lambda x, w: outshift(x, w, args.slab),
        }
        for impl, fn in forms.items():
            run = jax.jit(fn)
            err = float(jnp.max(jnp.abs(run(x, w) - reference))) / scale
            s = timed(run, (x, w), args.iters)
            print(
                json.dumps(
                    {
                        "what": "conv3d_forward",
                        "impl": impl,
                        "shape": [args.batch, *args.cube, c_in],
                        "dtype": "float32",
                        "device": device,
                        "cubes_per_s": round(args.batch / s, 3),
                        "gflop_per_s": round(flop / s / 1e9, 1),
                        "s_per_call": round(s, 4),
                        "rel_err": float(f"{err:.2g}"),
                        "c_in": c_in,
                        "c_out": c_out,
                        "slab": args.slab if impl == "outshift" else None,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv)
    main()
