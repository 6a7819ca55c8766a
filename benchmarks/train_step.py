"""Training-step throughput of YNet3D (TransVW objective, Adam), optionally against PyTorch.

The step: restoration MSE + 0.01 * cross-entropy on visual-word logits, Adam 1e-3, one
jit with the old state donated; the cube batch is fixed (no augmentation: this measures
the network). `--compare-torch` runs the PyTorch reference network (transvw_jax.
torch_reference, same initial weights, same loss and optimiser) in the same process,
alternating with JAX step by step, both warm. `--layers` times every distinct 3x3x3
convolution of the network forward+backward, per implementation. JSON lines:
  {"what": "train_step" | "layer/<name>" | "ratio", "impl", "shape", "dtype", "device",
   "cubes_per_s", "s_per_step", "gflop_per_step", "mfu"}

  python benchmarks/train_step.py --compare-torch                # batch 2, width 32, float32
  python benchmarks/train_step.py --conv-impl depth2d --compare-torch
  python benchmarks/train_step.py --layers --width 32
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from transvw_jax import export
from transvw_jax.models import build_model, init_variables
from transvw_jax.models.layers import conv3d_same

LAMBDA_CLS = 0.01


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=44)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cube", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--conv-impl", default="xla3d", choices=["xla3d", "depth2d"])
    p.add_argument("--iters", type=int, default=3, help="timed steps per implementation")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--layers", action="store_true", help="per-layer conv timings instead")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for mfu")
    return p.parse_args()


def emit(args, what, impl, device, seconds, gflop=None, **extra) -> float:
    cubes_per_s = args.batch / seconds
    mfu = None
    if gflop and args.peak_tflops:
        mfu = round(gflop / seconds / (args.peak_tflops * 1e3), 4)
    print(json.dumps({"what": what, "impl": impl, "shape": [args.batch, *args.cube, 1],
                      "dtype": args.dtype, "device": device, "cubes_per_s": round(cubes_per_s, 4),
                      "s_per_step": round(seconds, 4),
                      "gflop_per_step": None if gflop is None else round(gflop, 1), "mfu": mfu,
                      **extra}), flush=True)
    return cubes_per_s


def jax_step(args):
    model = build_model({"name": "ynet3d", "width": args.width, "num_classes": args.num_classes,
                         "dtype": args.dtype, "conv_impl": args.conv_impl})
    variables = init_variables(model, jax.random.key(0))
    tx = optax.adam(1e-3)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt": tx.init(variables["params"])}

    def loss_fn(params, batch_stats, x, y):
        (restored, logits), updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        mse = jnp.mean(jnp.square(restored - x))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return mse + LAMBDA_CLS * ce, updates["batch_stats"]

    def step(state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], x, y)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                "opt": opt}, loss

    # The first step donates (frees) these arrays: keep a host copy for the PyTorch side.
    return jax.jit(step, donate_argnums=0), state, export.to_torch_state_dict(variables)


def torch_step(args, state_dict, x, y):
    import torch

    from transvw_jax import torch_reference

    net = torch_reference.YNet3D(args.num_classes, width=args.width)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    yt = torch.from_numpy(y.astype(np.int64))
    use_bf16 = args.dtype == "bfloat16"

    def run() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            restored, logits = net(xt)
            loss = torch.nn.functional.mse_loss(restored.float(), xt) + LAMBDA_CLS * \
                torch.nn.functional.cross_entropy(logits.float(), yt)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    run()  # warm
    return run


def main_step(args) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, *args.cube, 1), dtype=np.float32)
    y = rng.integers(0, args.num_classes, args.batch).astype(np.int32)
    step, state, state_dict = jax_step(args)
    xd, yd = jax.device_put(x), jax.device_put(y)
    compiled = step.lower(state, xd, yd).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gflop = cost.get("flops", 0.0) / 1e9 if cost else None
    state, loss = compiled(state, xd, yd)
    jax.block_until_ready(loss)
    device = jax.devices()[0].device_kind
    holder = {"state": state}

    def run_jax() -> float:
        start = time.perf_counter()
        holder["state"], loss = compiled(holder["state"], xd, yd)
        jax.block_until_ready(loss)
        return time.perf_counter() - start

    timers = {f"jax-{args.conv_impl}": run_jax}
    if args.compare_torch:
        timers["torch"] = torch_step(args, state_dict, x, y)
    times = {k: [] for k in timers}
    for _ in range(args.iters):  # alternate so that machine noise hits both
        for name, run in timers.items():
            times[name].append(run())
    rates = {}
    for name, ts in times.items():
        rates[name] = emit(args, "train_step", name, device if name != "torch" else "cpu (torch)",
                           float(np.median(ts)), gflop)
    if args.compare_torch:
        jax_name = f"jax-{args.conv_impl}"
        print(json.dumps({"what": "ratio", "impl": f"{jax_name}/torch", "shape": [args.batch, *args.cube, 1],
                          "dtype": args.dtype, "device": device,
                          "ratio": round(rates[jax_name] / rates["torch"], 3)}), flush=True)


def conv_layers(width: int, cube):
    """(name, C_in, C_out, spatial) of every 3x3x3 convolution of YNet3D."""
    w, (sx, sy, sz) = width, cube
    res = [(sx // 2**d, sy // 2**d, sz // 2**d) for d in range(4)]
    layers = []
    for d in range(4):
        c = w * 2**d
        layers += [(f"down_tr{64 * 2**d}.ops.0", 1 if d == 0 else c, c, res[d]),
                   (f"down_tr{64 * 2**d}.ops.1", c, 2 * c, res[d])]
    for d in reversed(range(3)):
        up, out = w * 2 ** (d + 2), w * 2 ** (d + 1)
        layers += [(f"up_tr{64 * 2**d}.ops.0", up + out, out, res[d]),
                   (f"up_tr{64 * 2**d}.ops.1", out, out, res[d])]
    layers.append(("clc_out.conv1", 16 * w, 32 * w, res[3]))
    return layers


def main_layers(args) -> None:
    device = jax.devices()[0].device_kind
    dtype = jnp.dtype(args.dtype)
    for name, cin, cout, spatial in conv_layers(args.width, args.cube):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((args.batch, *spatial, cin)), dtype)
        w = jnp.asarray(rng.standard_normal((3, 3, 3, cin, cout)) * 0.05, dtype)
        gflop = 3 * 2 * args.batch * int(np.prod(spatial)) * cin * cout * 27 / 1e9
        for impl in ("xla3d", "depth2d"):
            grad = jax.jit(jax.grad(lambda x, w, impl=impl: conv3d_same(x, w, impl).astype(jnp.float32).sum(),
                                    argnums=(0, 1)))
            jax.block_until_ready(grad(x, w))
            ts = []
            for _ in range(args.iters):
                start = time.perf_counter()
                jax.block_until_ready(grad(x, w))
                ts.append(time.perf_counter() - start)
            s = float(np.median(ts))
            emit(args, f"layer/{name}", impl, device, s, gflop, gflop_per_s=round(gflop / s, 1),
                 layer=[cin, cout, *spatial])
        if args.compare_torch:
            import torch

            conv = torch.nn.Conv3d(cin, cout, 3, padding=1)
            xt = torch.randn(args.batch, cin, *spatial, requires_grad=True)
            conv(xt).sum().backward()
            ts = []
            for _ in range(args.iters):
                start = time.perf_counter()
                conv(xt).sum().backward()
                ts.append(time.perf_counter() - start)
            s = float(np.median(ts))
            emit(args, f"layer/{name}", "torch", "cpu (torch)", s, gflop, gflop_per_s=round(gflop / s, 1),
                 layer=[cin, cout, *spatial])


if __name__ == "__main__":
    arguments = parse_args()
    main_layers(arguments) if arguments.layers else main_step(arguments)
