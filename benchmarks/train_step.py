"""Training-step throughput of YNet3D (TransVW objective, Adam), optionally against PyTorch.

The step: restoration MSE + 0.01 * cross-entropy on visual-word logits, Adam 1e-3, one
jit with the old state donated; the cube batch is fixed (no augmentation: this measures
the network). `--compare-torch` runs the PyTorch reference network (transvw_jax.
torch_reference, same initial weights, same loss and optimiser) in the same process,
alternating with JAX in blocks of two steps, both warm: the first step of a block follows
the other framework's and runs slower for either side (reported as `after_switch_s`), the
second is timed. `--layers` times every distinct 3x3x3
convolution of the network forward+backward, per implementation. JSON lines:
  {"what": "train_step" | "layer/<name>" | "ratio", "impl", "shape", "dtype", "device",
   "cubes_per_s", "s_per_step", "gflop_per_step", "mfu"}

  python benchmarks/train_step.py --compare-torch                # batch 2, width 32, float32
  python benchmarks/train_step.py --conv-impl xla3d --compare-torch
  python benchmarks/train_step.py --layers --width 32
  python benchmarks/train_step.py --sweep --width 32             # float32, bfloat16 x batch 1, 2, 4
  python benchmarks/train_step.py --real-step --steps 3          # the project's train step

`--real-step` times the project's actual step instead (`pretraining.build_run(config,
mesh).steps.train`, (TrainState, batch) -> (TrainState, metrics): uint16 cubes in, decoded
and transformed on the device with the TransVW policy, YNet3D, Adam with the default step
schedule; "what": "train_step/real"), so that the bare step and the real one can be
compared (with `--compare-torch` the PyTorch side stays the bare step, without
transforms). `--sweep` runs float32 and bfloat16 at batches 1, 2 and 4 (one line
each, impl "jax"); with `--real-step` it sweeps the real step.

MFU = FLOPs of one step (XLA's cost analysis of the compiled step, `gflop_per_step`) / step
time / peak FLOP/s of the device for the compute dtype. Peaks: `--peak-tflops` if given;
else the table PEAK_TFLOPS for accelerators (matched on `jax.devices()[0].device_kind`);
on CPU the best time of a jitted 4096x4096 @ 4096x4096 float32 matmul, printed as its own
line {"what": "peak", "impl": "matmul", ...} and used for BOTH dtypes (XLA:CPU has no
faster bf16 path to measure against). Every line says which peak it used
(`peak_tflops`, `peak_basis`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from transvw_jax import export, hostenv, parallel
from transvw_jax import transforms as T
from transvw_jax.fileio import load_module
from transvw_jax.models import build_model, init_variables
from transvw_jax.models.layers import CONV_IMPLS, conv3d_same, default_conv_impl
from transvw_jax.tasks import pretraining

LAMBDA_CLS = 0.01
SWEEP_BATCHES = (1, 2, 4)
SWEEP_DTYPES = ("float32", "bfloat16")
BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"  # its train section

# Dense peak TFLOP/s (no structured sparsity: datasheet "with sparsity" figures halved), per
# compute mode; the first device_kind substring (lower case) that matches wins.
#  - NVIDIA H100 SXM5, H100 Tensor Core GPU datasheet: BF16 989.4, TF32 494.7, FP32 66.9 (CUDA
#    cores); H100 PCIe: 756 / 378 / 51. H200 SXM (H200 datasheet): the same compute as the
#    H100 SXM. A100 (A100 datasheet): 312 / 156 / 19.5.
#  - TPU (Google Cloud TPU system-architecture pages), BF16 per chip: v4 275, v5e 197,
#    v5p 459, v6e (Trillium) 918.
# float32 on GPUs: JAX's default precision computes float32 convolutions and dots with TF32
# on Ampere and newer ("Matmul precision" in the JAX docs: "bfloat16 on TPU, TF32 on recent
# GPUs"), so the float32 peak is the TF32 one unless jax_default_matmul_precision asks for
# float32/highest, when it is the CUDA-core FP32 one. On TPU, default float32 = one bf16
# pass (the bf16 peak); high = 3 passes, highest = 6 (peak / 3, / 6: approximate).
_H100_SXM = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("h100 pcie", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("h100", _H100_SXM),
    ("h200", _H100_SXM),
    ("a100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("v5 lite", {"tpu_bf16": 197.0}),
    ("v5e", {"tpu_bf16": 197.0}),
    ("v5p", {"tpu_bf16": 459.0}),
    ("v5", {"tpu_bf16": 459.0}),
    ("v6 lite", {"tpu_bf16": 918.0}),
    ("v6e", {"tpu_bf16": 918.0}),
    ("v4", {"tpu_bf16": 275.0}),
]
_FULL_F32 = ("float32", "highest", "f32_f32_f32")
_THREE_PASS = ("tensorfloat32", "high", "bf16_bf16_f32_x3")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=44)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cube", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--conv-impl", default="auto", choices=["auto", *CONV_IMPLS],
                   help="model.conv_impl; auto: onednn (or matmul) on CPU, xla3d on GPU/TPU")
    p.add_argument("--iters", "--steps", dest="iters", type=int, default=3,
                   help="timed steps per implementation (--steps and --iters are the same)")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--layers", action="store_true", help="per-layer conv timings instead")
    p.add_argument("--loss-steps", type=int, default=0, metavar="N",
                   help="train N steps in float32 and in bfloat16 from the same init on the same "
                        "random batches; report both restoration losses and their difference")
    p.add_argument("--sweep", action="store_true",
                   help=f"float32 and bfloat16 at batches {SWEEP_BATCHES}, one line each (no torch)")
    p.add_argument("--real-step", action="store_true",
                   help="time pretraining.build_run(...).steps.train (transforms included, uint16 cubes in)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for mfu (overrides the table / the CPU matmul measurement)")
    args = p.parse_args()
    if args.conv_impl == "auto":
        args.conv_impl = default_conv_impl()
    return args


# --------------------------------------------------------------------------- peak FLOP/s


def measure_matmul_tflops(dtype: str, n: int = 4096, repeats: int = 5) -> tuple[float, float]:
    """(TFLOP/s, best seconds) of a jitted n x n @ n x n matmul, best of `repeats`."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e12, best


class Peaks:
    """Peak TFLOP/s per compute dtype for this device, and how it was obtained.

    `matmul_n`: the size of the CPU's measured matmul (benchmarks/accelerator.py --smoke
    measures a smaller one); `report`: where the {"what": "peak"} line goes (default: printed
    as JSON)."""

    def __init__(self, override: float | None, matmul_n: int = 4096,
                 report: Callable[[dict], None] | None = None):
        self.override = override
        self.matmul_n = matmul_n
        self.report = report or (lambda line: print(json.dumps(line), flush=True))
        self.device = jax.devices()[0]
        self.kind = self.device.device_kind
        self._cache: dict[str, tuple[float | None, str]] = {}

    def __call__(self, dtype: str) -> tuple[float | None, str]:
        if dtype not in self._cache:
            self._cache[dtype] = self._resolve(dtype)
        return self._cache[dtype]

    def _resolve(self, dtype: str) -> tuple[float | None, str]:
        if self.override:
            return self.override, "--peak-tflops"
        if self.device.platform == "cpu":
            # One measurement serves both dtypes: bf16 is not faster than f32 on XLA:CPU.
            if "cpu" not in self._cache:
                n = self.matmul_n
                tflops, seconds = measure_matmul_tflops("float32", n)
                self.report({"what": "peak", "impl": "matmul", "shape": [n, n, n],
                             "dtype": "float32", "device": self.kind, "tflops": round(tflops, 4),
                             "s": round(seconds, 4), "used_for": list(SWEEP_DTYPES)})
                basis = f"measured: float32 {n}^3 matmul, best of 5, used for both dtypes"
                self._cache["cpu"] = (tflops, basis)
            return self._cache["cpu"]
        kind = self.kind.lower()
        precision = str(jax.config.jax_default_matmul_precision or "default").lower()
        for key, peaks in PEAK_TFLOPS:
            if key not in kind:
                continue
            if "tpu_bf16" in peaks:
                passes = 1 if dtype == "bfloat16" else 6 if precision in _FULL_F32 else (
                    3 if precision in _THREE_PASS else 1)
                return peaks["tpu_bf16"] / passes, f"table: {key} bf16 / {passes} pass(es)"
            if dtype == "bfloat16":
                return peaks["bf16"], f"table: {key} bf16 dense"
            mode = "fp32" if precision in _FULL_F32 else "tf32"
            return peaks[mode], f"table: {key} {mode} dense (matmul precision {precision})"
        tflops, _ = measure_matmul_tflops(dtype, self.matmul_n)
        return tflops, f"measured: {dtype} {self.matmul_n}^3 matmul ({self.kind} not in the table)"


# --------------------------------------------------------------------------- output


def emit(args, what, impl, device, seconds, gflop=None, *, batch=None, dtype=None, peak=(None, None),
         **extra) -> float:
    batch = args.batch if batch is None else batch
    dtype = args.dtype if dtype is None else dtype
    cubes_per_s = batch / seconds
    peak_tflops, basis = peak
    mfu = None
    if gflop and peak_tflops:
        mfu = round(gflop / seconds / (peak_tflops * 1e3), 4)
    print(json.dumps({"what": what, "impl": impl, "shape": [batch, *args.cube, 1],
                      "dtype": dtype, "device": device, "cubes_per_s": round(cubes_per_s, 4),
                      "s_per_step": round(seconds, 4),
                      "gflop_per_step": None if gflop is None else round(gflop, 1), "mfu": mfu,
                      "batch": batch, "width": args.width,
                      "peak_tflops": None if peak_tflops is None else round(peak_tflops, 4),
                      "peak_basis": basis, **extra}), flush=True)
    return cubes_per_s


# --------------------------------------------------------------------------- steps


def jax_step(args, dtype=None):
    model = build_model({"name": "ynet3d", "width": args.width, "num_classes": args.num_classes,
                         "dtype": dtype or args.dtype, "conv_impl": args.conv_impl})
    variables = init_variables(model, jax.random.key(0))
    tx = optax.adam(1e-3)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt": tx.init(variables["params"])}

    def loss_fn(params, batch_stats, x, y):
        (restored, logits), updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        mse = jnp.mean(jnp.square(restored.astype(jnp.float32) - x))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return mse + LAMBDA_CLS * ce, (updates["batch_stats"], mse)

    def step(state, x, y):
        (loss, (stats, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], x, y)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                "opt": opt}, {"loss": loss, "restoration_mse": mse}

    # The first step donates (frees) these arrays: keep a host copy for the PyTorch side.
    return jax.jit(step, donate_argnums=0), state, export.to_torch_state_dict(variables)


def real_config(args, batch: int, dtype: str) -> ml_collections.ConfigDict:
    """The sections of a run config that `pretraining.build_run` reads (TransVW; the train
    section is the base config's, configs/default.py)."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({
        "name": "ynet3d", "width": args.width, "num_classes": args.num_classes, "bn": "reference",
        "dtype": dtype, "conv_impl": args.conv_impl})
    config.train = load_module(BASE_CONFIG, "_benchmark_base_config").get_config().train
    config.train.objective = "transvw"
    config.train.batch_size = batch
    config.transforms = T.default_config("transvw")
    return config


def real_step(args, batch: int, dtype: str):
    """(train step, TrainState, mesh, torch state dict) of the project's step."""
    mesh = parallel.make_mesh(1)
    run = pretraining.build_run(real_config(args, batch, dtype), mesh)
    state = run.init(0)
    # The first step donates (frees) the state: keep a host copy for the PyTorch side.
    return run.steps.train, state, mesh, export.to_torch_state_dict(jax.device_get(state.variables))


def model_gflop(args, batch: int, dtype: str) -> float | None:
    """FLOPs of the model's step as XLA counts them with its 3D convolutions (lowered, not
    compiled): the matmul form runs its convolutions in loops, whose bodies a cost
    analysis counts once, so every conv_impl is charged the same work."""
    ref = argparse.Namespace(**{**vars(args), "conv_impl": "xla3d"})
    step, state, _ = jax_step(ref, dtype)
    x = jax.ShapeDtypeStruct((batch, *args.cube, 1), jnp.float32)
    cost = step.lower(state, x, jax.ShapeDtypeStruct((batch,), jnp.int32)).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("flops", 0.0) / 1e9 if cost else None


def compiled_gflop(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("flops", 0.0) / 1e9 if cost else None


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


def run_case(args, batch: int, dtype: str, peaks: Peaks, *, compare_torch: bool, impl: str | None = None
             ) -> None:
    """Compile and time one (batch, dtype) case; prints its line(s)."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, *args.cube, 1), dtype=np.float32)
    y = rng.integers(0, args.num_classes, batch).astype(np.int32)
    device = jax.devices()[0].device_kind
    if args.real_step:
        what = "train_step/real"
        step, state, mesh, state_dict = real_step(args, batch, dtype)
        local = parallel.local_batch_size(batch)
        cubes = np.rint(x[:local, ..., 0] * 65535.0).astype(np.uint16)  # what the store holds
        inputs = (parallel.global_batch({"cube": cubes, "label": y[:local]}, parallel.batch_sharding(mesh)),)
        holder = {"state": state}
        compiled = step.lower(state, *inputs).compile()

        def call():
            holder["state"], m = compiled(holder["state"], *inputs)
            return m["loss"]
    else:
        what = "train_step"
        step, state, state_dict = jax_step(args, dtype)
        inputs = (jax.device_put(x), jax.device_put(y))
        holder = {"state": state}
        compiled = step.lower(state, *inputs).compile()

        def call():
            holder["state"], metrics = compiled(holder["state"], *inputs)
            return metrics["loss"]

    gflop = compiled_gflop(compiled) if args.conv_impl == "xla3d" else model_gflop(args, batch, dtype)
    jax.block_until_ready(call())  # warm

    def run_jax() -> float:
        start = time.perf_counter()
        jax.block_until_ready(call())
        return time.perf_counter() - start

    jax_name = impl or f"jax-{args.conv_impl}"
    timers = {jax_name: run_jax}
    if compare_torch:
        timers["torch"] = torch_step(args, state_dict, x, y)
    times = {k: [] for k in timers}
    after_switch = {k: [] for k in timers}
    for _ in range(args.iters):  # alternate so that machine noise hits both
        for name, run in timers.items():
            if compare_torch:
                # A step right after the other framework's runs slow, whichever side it
                # is (measured: JAX 8.5-9.3 s after a torch step, 7.8-8.1 s after its own;
                # torch 7.8-8.4 s after a JAX step, 8.7-9.2 s after its own): both sides
                # run a block of two, and the timed step is the one after their own.
                after_switch[name].append(run())
            times[name].append(run())
    rates = {}
    cpu = jax.devices()[0].platform == "cpu"
    for name, ts in times.items():
        is_torch = name == "torch"
        # torch runs on this host's CPU: its mfu is only meaningful against a CPU peak
        peak = peaks(dtype) if (not is_torch or cpu) else (None, None)
        if is_torch:  # the PyTorch side is always the bare step (fixed batch, no transforms)
            line, dev, extra = "train_step", "cpu (torch)", {}
        else:
            line, dev, extra = what, device, {"conv_impl": args.conv_impl}
        if after_switch[name]:
            extra["after_switch_s"] = round(float(np.median(after_switch[name])), 4)
        rates[name] = emit(args, line, name, dev, float(np.median(ts)), gflop, batch=batch, dtype=dtype,
                           peak=peak, steps=len(ts), **extra)
    if compare_torch:
        print(json.dumps({"what": "ratio", "impl": f"{jax_name}/torch", "shape": [batch, *args.cube, 1],
                          "dtype": dtype, "device": device,
                          "ratio": round(rates[jax_name] / rates["torch"], 3)}), flush=True)


def main_step(args) -> None:
    peaks = Peaks(args.peak_tflops)
    if args.sweep:
        for dtype in SWEEP_DTYPES:
            for batch in SWEEP_BATCHES:
                run_case(args, batch, dtype, peaks, compare_torch=False, impl="jax")
    else:
        run_case(args, args.batch, args.dtype, peaks, compare_torch=args.compare_torch)


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
    peaks = Peaks(args.peak_tflops)
    cpu = jax.devices()[0].platform == "cpu"
    dtype = jnp.dtype(args.dtype)
    for name, cin, cout, spatial in conv_layers(args.width, args.cube):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((args.batch, *spatial, cin)), dtype)
        w = jnp.asarray(rng.standard_normal((3, 3, 3, cin, cout)) * 0.05, dtype)
        gflop = 3 * 2 * args.batch * int(np.prod(spatial)) * cin * cout * 27 / 1e9
        for impl in CONV_IMPLS:
            grad = jax.jit(jax.grad(lambda x, w, impl=impl: conv3d_same(x, w, impl).astype(jnp.float32).sum(),
                                    argnums=(0, 1)))
            jax.block_until_ready(grad(x, w))
            ts = []
            for _ in range(args.iters):
                start = time.perf_counter()
                jax.block_until_ready(grad(x, w))
                ts.append(time.perf_counter() - start)
            s = float(np.median(ts))
            emit(args, f"layer/{name}", impl, device, s, gflop, peak=peaks(args.dtype),
                 gflop_per_s=round(gflop / s, 1), layer=[cin, cout, *spatial])
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
            emit(args, f"layer/{name}", "torch", "cpu (torch)", s, gflop,
                 peak=peaks("float32") if cpu else (None, None), gflop_per_s=round(gflop / s, 1),
                 layer=[cin, cout, *spatial])


def main_loss_steps(args) -> None:
    """The bf16-vs-float32 check: the restoration MSE after N steps of each (noise-like
    random cubes in [0, 1], a new batch every step, the same sequence for both dtypes)."""
    final = {}
    for dtype in ("float32", "bfloat16"):
        step, state, _ = jax_step(args, dtype)
        rng = np.random.default_rng(1)
        mses, times = [], []
        for _ in range(args.loss_steps):
            x = jax.device_put(rng.random((args.batch, *args.cube, 1), dtype=np.float32))
            y = jax.device_put(rng.integers(0, args.num_classes, args.batch).astype(np.int32))
            start = time.perf_counter()
            state, metrics = step(state, x, y)
            mses.append(float(metrics["restoration_mse"]))
            times.append(time.perf_counter() - start)
        final[dtype] = float(np.mean(mses[-5:]))
        emit(args, "loss_steps", f"jax-{args.conv_impl}", jax.devices()[0].device_kind,
             float(np.median(times[1:])), dtype=dtype, steps=args.loss_steps, conv_impl=args.conv_impl,
             restoration_mse_last5=round(final[dtype], 6), restoration_mse_first=round(mses[0], 6))
    diff = final["bfloat16"] - final["float32"]
    print(json.dumps({"what": "loss_difference", "impl": f"jax-{args.conv_impl}",
                      "shape": [args.batch, *args.cube, 1], "dtype": "bfloat16 - float32",
                      "device": jax.devices()[0].device_kind, "steps": args.loss_steps, "width": args.width,
                      "restoration_mse_difference": round(diff, 6),
                      "relative": round(diff / final["float32"], 4)}), flush=True)


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv)
    arguments = parse_args()
    if arguments.layers:
        main_layers(arguments)
    elif arguments.loss_steps:
        main_loss_steps(arguments)
    else:
        main_step(arguments)
