"""Sliding-window inference throughput: voxels/s over a whole volume, JSON lines.

UNet3D (restoration head; the segmentation network has the same cost) on one volume,
64x64x32 windows, Gaussian blending, batched and jit-compiled once; the first call
(compile) is excluded. The design target is a 512x512x300 CT; on a 2-core CPU that takes
hours at width 32, so the defaults are smaller; pass --volume 512 512 300 on an
accelerator.

  python benchmarks/inference.py                                  # 128x128x64, width 8
  python benchmarks/inference.py --volume 512 512 300 --width 32 --batch 16
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import jax
import numpy as np

from transvw_jax import hostenv, inference
from transvw_jax.models import UNet3D, init_variables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volume", type=int, nargs=3, default=(128, 128, 64))
    p.add_argument("--window", type=int, nargs=3, default=(64, 64, 32))
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    print(json.dumps(measure(args.volume, args.window, width=args.width, batch=args.batch,
                             overlap=args.overlap, dtype=args.dtype)))


def measure(volume_shape: Sequence[int], window: Sequence[int], *, width: int, batch: int, overlap: float,
            dtype: str) -> dict:
    """Time `inference.sliding_window` over one random volume (compile excluded); the JSON line."""
    model = UNet3D(width=width, bn="standard", dtype=dtype)
    variables = init_variables(model, jax.random.key(0))

    def predict(v, x):  # the weights are a jit argument, as fine-tuning's evaluation passes them
        return model.apply(v, x[..., None], train=False)

    volume = np.random.default_rng(0).random(tuple(volume_shape), dtype=np.float32)
    small = volume[: window[0], : window[1], : window[2]]
    inference.sliding_window(predict, small, window, batch_size=batch, params=variables)  # compile
    t0 = time.perf_counter()
    out = inference.sliding_window(predict, volume, window, overlap=overlap, batch_size=batch,
                                   params=variables)
    dt = time.perf_counter() - t0
    windows = int(np.prod([len(inference.window_starts(s, w, overlap))
                           for s, w in zip(volume_shape, window, strict=True)]))
    assert out.shape[:3] == tuple(volume_shape)
    return {"what": "inference/sliding_window", "impl": "jax", "shape": list(volume_shape),
            "window": list(window), "dtype": dtype, "device": jax.devices()[0].device_kind,
            "width": width, "batch": batch, "overlap": overlap, "windows": windows,
            "seconds": round(dt, 2), "voxels_per_s": round(volume.size / dt, 1),
            "cubes_per_s": round(windows / dt, 3)}


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv)
    main()
