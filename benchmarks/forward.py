"""Inference throughput of the network: Flax under jit, optionally the PyTorch reference.

Prints one JSON line per implementation:
  {"what": "forward", "impl": "jax"|"torch", "model", "width", "shape", "dtype", "device",
   "cubes_per_s", "s_per_step", "gflop_per_cube", "mfu"}
`gflop_per_cube` comes from XLA's cost analysis of the compiled forward; `mfu` is filled
when --peak-tflops gives the device's peak (left null otherwise, e.g. on CPU).

  python benchmarks/forward.py                       # YNet3D(44), width 32, batch 2, 64x64x32
  python benchmarks/forward.py --compare-torch       # also the PyTorch reference, alternating
  python benchmarks/forward.py --dtype bfloat16 --batch 32 --peak-tflops 989   # H100 bf16
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from transvw_jax import export, hostenv
from transvw_jax.models import build_model, init_variables


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ynet3d", choices=["unet3d", "ynet3d", "encoder_classifier"])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=44)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cube", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--compare-torch", action="store_true", help="also time the PyTorch reference")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for mfu")
    return p.parse_args()


def emit(args, impl: str, device: str, seconds: float, gflop: float | None) -> None:
    cubes_per_s = args.batch / seconds
    mfu = None
    if gflop is not None and args.peak_tflops:
        mfu = round(cubes_per_s * gflop / (args.peak_tflops * 1e3), 4)
    print(json.dumps({
        "what": "forward", "impl": impl, "model": args.model, "width": args.width,
        "shape": [args.batch, *args.cube, 1], "dtype": args.dtype, "device": device,
        "cubes_per_s": round(cubes_per_s, 4), "s_per_step": round(seconds, 4),
        "gflop_per_cube": None if gflop is None else round(gflop, 2), "mfu": mfu,
    }), flush=True)


def main() -> None:
    args = parse_args()
    model = build_model({"name": args.model, "width": args.width, "num_classes": args.num_classes,
                         "dtype": args.dtype})
    variables = init_variables(model, jax.random.key(0))
    x = np.random.default_rng(0).random((args.batch, *args.cube, 1), dtype=np.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled = forward.lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gflop = cost.get("flops", 0.0) / 1e9 / args.batch if cost else None
    x_dev = jax.device_put(x)
    jax.block_until_ready(compiled(variables, x_dev))  # warm
    device = jax.devices()[0].device_kind

    def time_jax() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, x_dev))
        return time.perf_counter() - start

    timers = {"jax": time_jax}
    if args.compare_torch:
        timers["torch"] = torch_timer(args, variables, x)
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(args.iters):  # alternate, so drifting machine load hits both alike
        for name, timer in timers.items():
            times[name].append(timer())
    for name, ts in times.items():
        dev = device if name == "jax" else "cpu (torch)"
        emit(args, name, dev, float(np.median(ts)), gflop)


def torch_timer(args, variables, x):
    import torch

    from transvw_jax import torch_reference

    if args.model == "unet3d":
        net = torch_reference.UNet3D(width=args.width)
    elif args.model == "ynet3d":
        net = torch_reference.YNet3D(args.num_classes, width=args.width)
    else:
        net = torch_reference.EncoderClassifier(args.num_classes, width=args.width)
    head = args.model != "unet3d"
    state = {k: torch.from_numpy(v) for k, v in export.to_torch_state_dict(variables, head=head).items()}
    net.load_state_dict(state, strict=True)
    net.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    def run() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            start = time.perf_counter()
            net(xt)
            return time.perf_counter() - start

    run()  # warm
    return run


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv)
    jnp.zeros(())  # initialise the backend before timing anything
    main()
