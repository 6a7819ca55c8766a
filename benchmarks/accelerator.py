"""One accelerator check: the project's real pretraining step, its transforms, loader and inference.

Sections (every measurement is one JSON line, printed and flushed as soon as it is measured):
  train_step  the project's real step (`pretraining.build_run(config, mesh).steps.train`,
              (TrainState, batch) -> (TrainState, metrics): uint16 cubes in, decoded and transformed
              on the device with the TransVW policy, YNet3D, Adam with the default schedule) in
              bfloat16 and float32 at batch 8, 16, 32, 64 (width 32, 64x64x32), with MFU against the
              device's dense peak
  end_to_end  the same step fed by the Grain loader from a temporary uint16 store, over the bare
              step on one fixed device batch (benchmarks/end_to_end.py's loops)
  profile     with --profile DIR only: a jax.profiler trace of a few bf16 batch-64 steps, and the
              ten most expensive ops in it
  transforms  the two transform policies alone (TransVW, Models Genesis), cubes/s
  inference   sliding-window inference, voxels/s over a 512x512x300 volume (UNet3D width 32)

  python benchmarks/accelerator.py                              # the full check on one GPU/TPU, < 8 min
  python benchmarks/accelerator.py --profile /tmp/accel-prof    # ... and a trace + its ten costliest ops
  python benchmarks/accelerator.py --only train_step --budget-s 300
  python benchmarks/accelerator.py --smoke --profile /tmp/prof  # CPU, tiny sizes: every section

Order. The units run most important first, so that a run cut short by the budget still has
the goals' figures: the bf16 batch-64 step, then the loader over that same compiled step, the
profile of it, the policies, inference, then the rest of the batch/dtype sweep. The bf16
batch-64 step is compiled once and shared by those three sections.

Robustness (the accelerator run happens once, under a hard time limit): every unit runs in a
try/except (a failure prints a line with an "error" field and the next unit runs); before a
unit starts, the time left of `--budget-s` (default 420 s, measured from the start) is checked
against how long the last unit of the same kind took, and the unit is skipped with a line that
says so if it would not fit. The exit status is 1 if a unit failed, else 0.

Every line has "what", "section", "impl", "shape", "dtype", "device" (jax.devices()[0].device_kind),
"cubes_per_s" (null where not applicable), and "t_s" (seconds since the start). Train-step
lines (benchmarks/train_step.py's `emit`) also carry "mfu", "peak_tflops", "peak_basis" and
"gflop_per_step" with "flops_source":
  MFU = FLOPs per step / seconds per step / peak FLOP/s of the device for the compute dtype.
  FLOPs: XLA's cost analysis of the compiled real step when the convolutions are XLA's own
  (conv_impl xla3d, what "auto" picks on GPU/TPU; the transforms' few FLOPs are included); on
  the CPU the convolutions are custom calls whose FLOPs XLA cannot see, so the same step is
  lowered (not compiled) with conv_impl xla3d and its count scaled by batch. At width 32 the
  lines also carry "gflop_reference" / "mfu_reference": the reference 0.70 TFLOP per 64x64x32
  cube per training step (benchmarks/RESULTS.md: 1394.5 GFLOP for a batch of 2), scaled to the
  cube size, as a cross-check.
  Peak: train_step.Peaks: --peak-tflops, else its table of dense peaks by device_kind (H100 SXM /
  H200: 989.4 bf16, 494.7 TF32), else a measured matmul. float32 is charged the dense TF32 peak
  on NVIDIA GPUs: with JAX's default matmul precision XLA runs float32 convolutions and dots in
  TF32 there (Peaks uses the FP32 peak when jax_default_matmul_precision asks for full float32).

--profile DIR: the ten ops are read from the trace's *.xplane.pb (jax.profiler.ProfileData):
device-plane events with an "hlo_op" stat on an accelerator, the XLA:CPU thunk events with one
on the CPU; time is inclusive (a loop's op includes its body) and summed over threads on the
CPU. Should that fail, the *.trace.json.gz is read instead, and failing that the compiled
step's HLO is ranked by output bytes (no timing); the lines say which ("source").

--smoke runs every section at tiny sizes (width 4, 16x16x8 cubes, batch 2 and 4 in bfloat16 and
float32, a 32x32x16 volume in 27 windows, a few steps), and compiles everything at XLA's optimisation level 0
(XLA_FLAGS, before the backend starts; --full-compile keeps the default): its timings mean
nothing, it checks that every section runs. On a small CPU it is bound by compiling the real
step (benchmarks/RESULTS.md); tests/test_accelerator_benchmark.py runs it with `--batches 2
--dtypes bfloat16`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import end_to_end
import inference as inference_bench
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import train_step
import transforms as transforms_bench

from transvw_jax import hostenv, parallel, resolve, training
from transvw_jax import transforms as T
from transvw_jax.data import loader, store
from transvw_jax.tasks import pretraining

SECTIONS = ("train_step", "end_to_end", "profile", "transforms", "inference")
POLICIES = ("transvw", "genesis")
# The reference cost of one training step per cube at width 32 (benchmarks/RESULTS.md: XLA's count
# of the 64x64x32 YNet3D step, 1394.5 GFLOP for a batch of 2).
REF_GFLOP_PER_CUBE = 700.0
REF_CUBE = (64, 64, 32)
REF_WIDTH = 32
TOP_OPS = 10
LINE_KEYS = ("what", "section", "impl", "shape", "dtype", "device", "cubes_per_s")  # on every line
ERROR_CHARS = 2000
# --smoke compiles at XLA's optimisation level 0 (what models.init_variables already does for the
# init on the CPU): the real step takes 10-20 s per case to compile on a 2-core CPU otherwise.
SMOKE_XLA_FLAG = "--xla_backend_optimization_level=0"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the sections run at: the accelerator check, or the CPU smoke test."""

    width: int
    num_classes: int
    cube: tuple[int, int, int]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    steps: int  # timed train steps per case (more if they take under min_time_s)
    min_time_s: float
    e2e_steps: int
    e2e_warmup: int
    e2e_store_batches: int  # the store holds this many batches; the loader repeats it (reshuffled)
    policy_batch: int
    policy_iters: int
    volume: tuple[int, int, int]
    window: tuple[int, int, int]
    infer_width: int
    infer_batch: int
    infer_dtype: str
    profile_steps: int
    matmul_n: int  # the CPU peak's measured matmul (Peaks)


FULL = Sizes(width=32, num_classes=44, cube=(64, 64, 32), batches=(8, 16, 32, 64),
             dtypes=("bfloat16", "float32"), steps=20, min_time_s=2.0, e2e_steps=30, e2e_warmup=2,
             e2e_store_batches=12, policy_batch=64, policy_iters=10, volume=(512, 512, 300),
             window=(64, 64, 32), infer_width=32, infer_batch=32, infer_dtype="bfloat16", profile_steps=3,
             matmul_n=4096)
SMOKE = Sizes(width=4, num_classes=44, cube=(16, 16, 8), batches=(2, 4), dtypes=("bfloat16", "float32"),
              steps=2, min_time_s=0.0, e2e_steps=3, e2e_warmup=1, e2e_store_batches=3, policy_batch=4,
              policy_iters=2, volume=(32, 32, 16), window=(16, 16, 8), infer_width=4, infer_batch=4,
              infer_dtype="float32", profile_steps=2, matmul_n=1024)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU (see above)")
    p.add_argument("--only", default="", metavar="SECTION[,SECTION]",
                   help=f"run only these sections, of: {', '.join(SECTIONS)} (profile needs --profile)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the units that would start or end past this many seconds from the start")
    p.add_argument("--profile", default=None, metavar="DIR", help="write a jax.profiler trace here")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="train-step batches (global)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=None, help="timed steps per train-step case")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak for mfu")
    p.add_argument("--tmpdir", default=None, help="where the end-to-end section writes its store")
    p.add_argument("--full-compile", action="store_true",
                   help=f"with --smoke: compile at XLA's default optimisation level (not {SMOKE_XLA_FLAG})")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if only == ["profile"] and not args.profile:
        p.error("--only profile needs --profile DIR")
    args.sections = tuple(s for s in SECTIONS if (not only or s in only) and (s != "profile" or args.profile))
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.smoke else FULL
    changes = {k: tuple(v) if isinstance(v, list) else v
               for k, v in (("batches", args.batches), ("dtypes", args.dtypes), ("steps", args.steps))
               if v is not None}
    return dataclasses.replace(sizes, **changes)


# --------------------------------------------------------------------------- config


def finalize_config(config: ml_collections.ConfigDict, mesh) -> ml_collections.ConfigDict:
    """Every "auto" value of `config` resolved once for `mesh`, as the command does after the
    processes joined (`transvw_jax.resolve`); the lines report what they came to."""
    resolve.resolve(config, resolve.Platform.of_mesh(mesh))
    return config


def step_config(sizes: Sizes, batch: int, dtype: str, mesh, **model: Any) -> ml_collections.ConfigDict:
    """The real step's config (train_step.real_config: YNet3D, the train section of the base
    config configs/default.py, TransVW's default transforms), finalised for `mesh`."""
    ns = argparse.Namespace(width=sizes.width, num_classes=sizes.num_classes, conv_impl="auto")
    config = train_step.real_config(ns, batch, dtype)
    config.model.update(model)
    config.data = ml_collections.ConfigDict({"cube_shape": tuple(sizes.cube)})
    return finalize_config(config, mesh)


def resolved(config: ml_collections.ConfigDict, run: training.Run | None, cube: Sequence[int]) -> dict:
    """What the "auto" values of `config` came to (reported on every line that depends on them)."""
    t = config.transforms
    out = {"batch_chunk": T.resolve_batch_chunk(t)}
    out["elastic_impl"] = T.resolve_elastic_impl(t.elastic.impl, tuple(cube), t.elastic.sigma) \
        if t.elastic.enabled else None
    if run is not None:
        out = {"conv_impl": run.model.conv_impl, **out}
    return out


# --------------------------------------------------------------------------- output and budget


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class Runner:
    """Prints the JSON lines, runs the units within the time budget, and survives their failures."""

    def __init__(self, budget_s: float, device: str):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.device = device
        self.last_s: dict[str, float] = {}  # unit kind -> seconds its last unit took
        self.errors = 0
        self.skipped = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def emit(self, line: dict) -> None:
        """Print one line now, the common fields first (device and cubes_per_s filled in if absent)."""
        line = {"device": self.device, "cubes_per_s": None, **line, "t_s": round(self.elapsed(), 1)}
        first = {k: line.pop(k, None) for k in LINE_KEYS}
        print(json.dumps({**first, **line}, default=_jsonable), flush=True)

    def unit(self, section: str, base: dict, fn: Callable[[], Any]) -> Any:
        """Run fn() unless the budget is spent; a failure becomes a line with "error"."""
        left = self.budget_s - self.elapsed()
        estimate = self.last_s.get(section)
        if left <= 0 or (estimate is not None and estimate > left):
            self.skipped += 1
            why = "budget spent" if left <= 0 else f"the last {section} unit took {estimate:.0f} s"
            self.emit({**base, "section": section, "skipped": f"{why}; {max(left, 0):.0f} s of "
                                                              f"--budget-s {self.budget_s:.0f} left"})
            return None
        start = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # one failing unit must not stop the others
            self.errors += 1
            message = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc()
            self.emit({**base, "section": section, "error": message[:ERROR_CHARS],
                       "traceback": tb[-ERROR_CHARS:]})
            return None
        finally:
            self.last_s[section] = time.perf_counter() - start


# --------------------------------------------------------------------------- train step


@dataclasses.dataclass
class Case:
    """One compiled real step (batch, dtype) with its live TrainState (the step donates it)."""

    batch: int
    dtype: str
    config: ml_collections.ConfigDict
    run: training.Run
    compiled: Any
    inputs: dict
    state: training.TrainState | None
    compile_s: float
    gflop: float | None
    flops: dict  # flops_source and the cross-checks

    def step(self) -> dict:
        """One step on the fixed batch; the new state replaces the donated one."""
        self.state, metrics = self.compiled(self.state, self.inputs)
        return metrics

    def time(self, steps: int) -> float:
        """Seconds per step over `steps` steps dispatched without waiting (as the train loop does)."""
        start = time.perf_counter()
        for _ in range(steps):
            metrics = self.step()
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def _gflop(cost: Any) -> float | None:
    cost = cost[0] if isinstance(cost, list) else cost
    flops = cost.get("flops", 0.0) if cost else 0.0
    return flops / 1e9 if flops and flops > 0 else None


def _quietly(fn: Callable[[], Any]) -> Any:
    """fn(), or None if it raises (a cost analysis some backend does not offer)."""
    try:
        return fn()
    except Exception:
        return None


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


class Bench:
    """The sections, sharing one mesh, one peak lookup and the compiled primary step."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, runner: Runner):
        self.args, self.sizes, self.runner = args, sizes, runner
        # One device: this is a check of one accelerator, and MFU is against one device's peak.
        self.mesh = parallel.make_mesh(1, jax.devices()[:1])
        self.sharding = parallel.batch_sharding(self.mesh)
        self.emit_args = argparse.Namespace(cube=sizes.cube, width=sizes.width, batch=None, dtype=None)
        self.peaks = train_step.Peaks(args.peak_tflops, matmul_n=sizes.matmul_n, report=self._peak_line)
        self.primary = (max(sizes.batches), "bfloat16" if "bfloat16" in sizes.dtypes else sizes.dtypes[0])
        self.cases: dict[tuple[int, str], Case] = {}
        self.failed: dict[tuple[int, str], str] = {}
        self._initial: tuple[Any, training.TrainState] | None = None  # (abstract, state), never donated
        self._gflop_per_cube: float | None = None

    def _peak_line(self, line: dict) -> None:
        self.runner.emit({**line, "section": "peak"})

    def base(self, what: str, shape: Sequence[int] | None, dtype: str | None, **extra: Any) -> dict:
        return {"what": what, "impl": "jax", "shape": None if shape is None else list(shape), "dtype": dtype,
                **extra}

    # ---- building

    def initial_state(self, run: training.Run) -> training.TrainState:
        """A fresh TrainState for `run`: `Run.init` once, then copies of it for every case whose
        state has the same shapes (all of them: the master weights are float32 whatever the
        compute dtype), which saves an init compile per case on the CPU."""
        abstract = _abstract(run.like_state)
        if self._initial is None or self._initial[0] != abstract:
            self._initial = (abstract, run.init(0))
        _, state = self._initial
        # The step donates its input state: each case gets its own buffers.
        return jax.tree.map(lambda a, s: jax.device_put(a, s.sharding, may_alias=False), state,
                            run.like_state)

    def build(self, batch: int, dtype: str) -> Case:
        sizes = self.sizes
        config = step_config(sizes, batch, dtype, self.mesh)
        run = pretraining.build_run(config, self.mesh)
        state = self.initial_state(run)
        local = parallel.local_batch_size(batch)
        rng = np.random.default_rng(batch)
        cubes = store.encode_cubes(rng.random((local, *sizes.cube), dtype=np.float32), "uint16")  # as stored
        labels = rng.integers(0, sizes.num_classes, local).astype(np.int32)
        inputs = parallel.global_batch({"cube": cubes, "label": labels}, self.sharding)
        start = time.perf_counter()
        lowered = run.steps.train.lower(state, inputs)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        gflop, flops = self.step_gflop(lowered, compiled, run, batch)
        return Case(batch=batch, dtype=dtype, config=config, run=run, compiled=compiled, inputs=inputs,
                    state=state, compile_s=compile_s, gflop=gflop, flops=flops)

    def case(self, batch: int, dtype: str, keep: bool) -> Case:
        """The compiled case, from the cache or built (and cached when `keep`)."""
        key = (batch, dtype)
        if key in self.cases:
            return self.cases[key]
        if key in self.failed:  # e.g. out of memory: do not spend the compile time again
            raise RuntimeError(f"building the batch-{batch} {dtype} step failed earlier: {self.failed[key]}")
        try:
            case = self.build(batch, dtype)
        except Exception as e:
            self.failed[key] = f"{type(e).__name__}: {e}"[:300]
            raise
        if keep:
            self.cases[key] = case
        return case

    def step_gflop(self, lowered, compiled, run: training.Run, batch: int) -> tuple[float | None, dict]:
        """FLOPs of one step and where they came from (see the module docstring)."""
        sizes = self.sizes
        lowered_g = _quietly(lambda: _gflop(lowered.cost_analysis()))
        compiled_g = _quietly(lambda: train_step.compiled_gflop(compiled))
        flops: dict[str, Any] = {}
        gflop = None
        if run.model.conv_impl == "xla3d":
            if compiled_g and (not lowered_g or compiled_g >= 0.5 * lowered_g):
                gflop = compiled_g
                flops["flops_source"] = "xla cost analysis of the compiled real step (transforms included)"
            elif lowered_g:
                gflop = lowered_g
                flops["flops_source"] = ("xla cost analysis of the lowered real step (the compiled step's "
                                         f"count, {compiled_g} GFLOP, is under half of it)")
        else:
            per_cube = self.gflop_per_cube_xla3d()
            if per_cube:
                gflop = per_cube * batch
                flops["flops_source"] = (
                    f"xla cost analysis of the real step lowered with conv_impl xla3d at batch "
                    f"{min(sizes.batches)}, scaled by batch (conv_impl {run.model.conv_impl} hides the "
                    "convolutions' FLOPs from XLA)")
        reference = None
        if sizes.width == REF_WIDTH:
            reference = REF_GFLOP_PER_CUBE * batch * math.prod(sizes.cube) / math.prod(REF_CUBE)
            flops["gflop_reference"] = round(reference, 1)
        if gflop is None and reference:
            gflop = reference
            flops["flops_source"] = "reference: 0.70 TFLOP per 64x64x32 cube at width 32, scaled to the cube"
        if gflop is None:
            flops["flops_source"] = "unavailable (no XLA count, width is not the reference's 32)"
        flops["gflop_compiled"] = None if compiled_g is None else round(compiled_g, 3)
        flops["gflop_lowered"] = None if lowered_g is None else round(lowered_g, 3)
        return gflop, flops

    def gflop_per_cube_xla3d(self) -> float | None:
        """GFLOP per cube of the real step as XLA counts it with its own 3D convolutions: lowered
        (not compiled) once at the smallest batch, from abstract values (no init)."""
        if self._gflop_per_cube is None:
            batch = min(self.sizes.batches)
            config = step_config(self.sizes, batch, "float32", self.mesh, conv_impl="xla3d")
            run = pretraining.build_run(config, self.mesh)
            local = parallel.local_batch_size(batch)
            sharded = functools.partial(jax.ShapeDtypeStruct, sharding=self.sharding)
            spec = {"cube": sharded((local, *self.sizes.cube), jnp.uint16),
                    "label": sharded((local,), jnp.int32)}
            gflop = _gflop(run.steps.train.lower(run.like_state, spec).cost_analysis())
            self._gflop_per_cube = gflop / batch if gflop else 0.0
        return self._gflop_per_cube or None

    # ---- sections

    def train_step(self, batch: int, dtype: str) -> None:
        sizes = self.sizes
        case = self.case(batch, dtype, keep=(batch, dtype) == self.primary)
        jax.block_until_ready(case.step())  # warm: the first call of an executable does one-off work
        steps = sizes.steps
        seconds = case.time(steps)
        if sizes.min_time_s and seconds * steps < sizes.min_time_s:  # short steps: time more of them
            steps = min(200, math.ceil(sizes.min_time_s / seconds))
            seconds = case.time(steps)
        peak = self.peaks(dtype)
        extra = dict(case.flops)
        if extra.get("gflop_reference") and peak[0] and "reference" not in extra["flops_source"]:
            extra["mfu_reference"] = round(extra["gflop_reference"] / seconds / (peak[0] * 1e3), 4)
        train_step.emit(self.emit_args, "train_step/real", "jax", self.runner.device, seconds, case.gflop,
                        batch=batch, dtype=dtype, peak=peak, section="train_step", steps=steps,
                        compile_s=round(case.compile_s, 1), **resolved(case.config, case.run, sizes.cube),
                        **extra, t_s=round(self.runner.elapsed(), 1))

    def end_to_end(self, batch: int, dtype: str) -> None:
        sizes = self.sizes
        case = self.case(batch, dtype, keep=True)
        local = parallel.local_batch_size(batch)
        base = self.base("", [batch, *sizes.cube, 1], dtype, section="end_to_end", batch=batch,
                         width=sizes.width)
        threads, prefetch = loader.DEFAULT_THREADS, loader.DEFAULT_PREFETCH
        with tempfile.TemporaryDirectory(dir=self.args.tmpdir, prefix="accelerator-store-") as tmp:
            path = Path(tmp) / "store"
            start = time.perf_counter()
            # The loader repeats the store (reshuffled every epoch): reads come from the page cache
            # either way, so a few batches of cubes serve any number of steps.
            end_to_end.write_store(path, local * sizes.e2e_store_batches, sizes.cube, sizes.num_classes)
            write_s = time.perf_counter() - start
            it = end_to_end.open_loader(path, local, threads, prefetch)
            state, case.state = case.state, None  # donated by the loops: rebuilt if they fail
            try:
                timed = end_to_end.time_loops(case.compiled, state, self.sharding, it,
                                              warmup=sizes.e2e_warmup, steps=sizes.e2e_steps)
            except Exception:
                self.cases.pop((batch, dtype), None)
                raise
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        case.state = timed["state"]
        peak = self.peaks(dtype)
        common = {"peak_tflops": None if peak[0] is None else round(peak[0], 4), "peak_basis": peak[1],
                  "steps": sizes.e2e_steps, "threads": threads, "prefetch": prefetch, "store_dtype": "uint16",
                  **resolved(case.config, case.run, sizes.cube)}

        def mfu(seconds: float) -> float | None:
            return round(case.gflop / seconds / (peak[0] * 1e3), 4) if case.gflop and peak[0] else None

        step_s, e2e_s = timed["step_s"], timed["e2e_s"]
        self.runner.emit({**base, "what": "end_to_end/bare_step", "cubes_per_s": round(batch / step_s, 4),
                          "s_per_step": round(step_s, 5), "mfu": mfu(step_s), **common})
        self.runner.emit({**base, "what": "end_to_end/loader", "cubes_per_s": round(batch / e2e_s, 4),
                          "s_per_step": round(e2e_s, 5), "mfu": mfu(e2e_s), **common,
                          "store_cubes": local * sizes.e2e_store_batches, "store_write_s": round(write_s, 2),
                          "warmup_s": round(timed["warm_s"], 2), "final_loss": round(timed["loss"], 5)})
        # ratio: end-to-end throughput over the bare step's (the goal: >= 0.95).
        self.runner.emit({**base, "what": "end_to_end/ratio", "ratio": round(step_s / e2e_s, 4), "goal": 0.95,
                          "overhead": round(e2e_s / step_s, 4)})

    def profile(self, batch: int, dtype: str) -> None:
        sizes = self.sizes
        case = self.case(batch, dtype, keep=True)
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        before = {p for p in out.rglob("*") if p.is_file()}
        jax.block_until_ready(case.step())  # warm, outside the trace
        with jax.profiler.trace(str(out)):
            for _ in range(sizes.profile_steps):
                metrics = case.step()
            jax.block_until_ready((case.state, metrics))
        files = sorted(p for p in out.rglob("*") if p.is_file() and p not in before)
        ops, source = top_ops(files, case.compiled, TOP_OPS)
        base = self.base("", [batch, *sizes.cube, 1], dtype, section="profile", batch=batch,
                         width=sizes.width)
        self.runner.emit({**base, "what": "profile", "dir": str(out), "steps": sizes.profile_steps,
                          "files": [str(p.relative_to(out)) for p in files], "source": source,
                          "ops": len(ops)})
        total = sum(op.get("total_ms", 0.0) for op in ops) or None
        for rank, op in enumerate(ops, 1):
            op_line = {**base, "what": "profile/op", "rank": rank, **op, "source": source}
            if "total_ms" in op:
                op_line["ms_per_step"] = round(op["total_ms"] / sizes.profile_steps, 4)
                op_line["share_of_top"] = round(op["total_ms"] / total, 4) if total else None
            self.runner.emit(op_line)

    def policy(self, policy: str) -> None:
        sizes = self.sizes
        config = step_config(sizes, sizes.policy_batch, "float32", self.mesh)
        if policy != config.transforms.policy:
            config.transforms = T.default_config(policy)
            config = finalize_config(config, self.mesh)
        tcfg = config.transforms
        fn = functools.partial(T.batch_policy, cfg=tcfg)  # as the train step calls it: all three outputs
        rate = transforms_bench.time_jax(fn, sizes.policy_batch, sizes.cube, sizes.policy_iters, jnp.float32)
        base = self.base(f"transforms/policy/{policy}", [sizes.policy_batch, *sizes.cube], "float32")
        self.runner.emit({**base, "section": "transforms", "cubes_per_s": round(rate, 2),
                          "batch": sizes.policy_batch, "iters": sizes.policy_iters,
                          **resolved(config, None, sizes.cube)})

    def inference(self) -> None:
        sizes = self.sizes
        line = inference_bench.measure(sizes.volume, sizes.window, width=sizes.infer_width,
                                       batch=sizes.infer_batch, overlap=0.5, dtype=sizes.infer_dtype)
        # cubes_per_s here is windows/s; the figure of merit is voxels_per_s.
        self.runner.emit({**line, "section": "inference", "model": "unet3d", "mfu": None})


# --------------------------------------------------------------------------- profile parsing


def _add(table: dict, op: str, duration_ns: float, module: Any = None) -> None:
    entry = table.setdefault(op, {"op": op, "total_ns": 0.0, "count": 0, "module": module})
    entry["total_ns"] += float(duration_ns)
    entry["count"] += 1


def _ranked(table: dict, k: int) -> list[dict]:
    rows = sorted(table.values(), key=lambda e: -e["total_ns"])[:k]
    return [{"op": e["op"], "total_ms": round(e["total_ns"] / 1e6, 4), "count": e["count"],
             "module": e["module"]} for e in rows]


def xplane_ops(path: Path, k: int) -> tuple[list[dict], str]:
    """The k ops with the most time in an *.xplane.pb (jax.profiler.ProfileData)."""
    data = jax.profiler.ProfileData.from_file(str(path))
    planes = list(data.planes)
    devices = [p for p in planes if p.name.startswith("/device:") and "CUSTOM" not in p.name]
    table: dict = {}
    used = []
    for plane in devices:
        lines = list(plane.lines)
        named = [line for line in lines if line.name == "XLA Ops"]  # derived per-op line, where written
        for line in named or lines:
            if line.name in ("XLA Modules", "Steps"):
                continue
            for event in line.events:
                stats = dict(event.stats)
                op = event.name if named else stats.get("hlo_op")
                if op:
                    _add(table, str(op), event.duration_ns, stats.get("hlo_module"))
                    used.append(f"{plane.name}:{line.name}")
    if table:
        lines = ", ".join(sorted(set(used)))
        return _ranked(table, k), f"xplane {path.name}: device events by HLO op ({lines})"
    for plane in devices:  # device events without an op name: rank the kernels themselves
        for line in plane.lines:
            if line.name.startswith("Stream"):
                for event in line.events:
                    _add(table, event.name, event.duration_ns)
    if table:
        return _ranked(table, k), f"xplane {path.name}: device kernels by name (no hlo_op stats)"
    for plane in planes:  # the CPU backend: XLA:CPU's thunk events carry the op
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_op"):
                    _add(table, str(stats["hlo_op"]), event.duration_ns, stats.get("hlo_module"))
    if table:
        return _ranked(table, k), (f"xplane {path.name}: host thunk events by HLO op (no device plane; "
                                   "inclusive, summed over threads)")
    raise ValueError(f"no op events in {path.name} (planes: {[p.name for p in planes]})")


def trace_json_ops(path: Path, k: int) -> tuple[list[dict], str]:
    """The same from a *.trace.json.gz (Chrome trace format): complete events with an hlo_op arg,
    on device processes where there are any."""
    with gzip.open(path, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if str(name).startswith("/device:")}
    table: dict = {}
    for e in events:
        if e.get("ph") != "X" or (device_pids and e.get("pid") not in device_pids):
            continue
        args = e.get("args", {})
        op = args.get("hlo_op") or (e.get("name") if device_pids else None)
        if op:
            _add(table, str(op), float(e.get("dur", 0.0)) * 1e3, args.get("hlo_module"))
    if not table:
        raise ValueError(f"no op events in {path.name}")
    where = "device events" if device_pids else "host events with an hlo_op"
    return _ranked(table, k), f"trace json {path.name}: {where}, by op"


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def hlo_ops(compiled: Any, k: int) -> list[dict]:
    """Entry-computation instructions of the compiled step ranked by output bytes: no timing, the
    last resort when the trace cannot be read."""
    text = compiled.as_text() or ""
    entry = text[text.find("\nENTRY"):] if "\nENTRY" in text else text
    rows = []
    for line in entry.splitlines()[1:]:
        match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\(", line)
        if not match:
            continue
        name, shapes, opcode = match.groups()
        if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        size = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                   for t, dims in _SHAPE.findall(shapes))
        rows.append({"op": name, "opcode": opcode, "output_bytes": size})
    return sorted(rows, key=lambda r: -r["output_bytes"])[:k]


def top_ops(files: Iterable[Path], compiled: Any, k: int) -> tuple[list[dict], str]:
    """The k most expensive ops of a trace, and a description of where they came from."""
    files = list(files)
    problems = []
    readers = [(".xplane.pb", xplane_ops), (".trace.json.gz", trace_json_ops)]
    for suffix, read in readers:
        for path in sorted((p for p in files if p.name.endswith(suffix)), key=lambda p: -p.stat().st_mtime):
            try:
                return read(path, k)
            except Exception as e:  # try the next file / format
                problems.append(f"{path.name}: {type(e).__name__}: {e}"[:300])
    if not files:
        problems.append("the trace wrote no files")
    return hlo_ops(compiled, k), ("hlo text of the compiled step: entry instructions by output bytes, no "
                                  f"timing (the trace could not be read: {'; '.join(problems)})")


# --------------------------------------------------------------------------- main


def plan(bench: Bench, sections: Sequence[str]) -> list[tuple[str, dict, Callable[[], Any]]]:
    """(section, base line, unit) in the order they run: the goals' figures first (module doc)."""
    sizes, (pb, pd) = bench.sizes, bench.primary

    def step_base(batch: int, dtype: str, what: str) -> dict:
        return bench.base(what, [batch, *sizes.cube, 1], dtype, batch=batch, width=sizes.width)

    units: list[tuple[str, dict, Callable[[], Any]]] = []
    if "train_step" in sections:
        units.append(("train_step", step_base(pb, pd, "train_step/real"), lambda: bench.train_step(pb, pd)))
    if "end_to_end" in sections:
        units.append(("end_to_end", step_base(pb, pd, "end_to_end"), lambda: bench.end_to_end(pb, pd)))
    if "profile" in sections:
        units.append(("profile", step_base(pb, pd, "profile"), lambda: bench.profile(pb, pd)))
    if "transforms" in sections:
        for policy in POLICIES:
            units.append(("transforms", bench.base(f"transforms/policy/{policy}",
                                                   [sizes.policy_batch, *sizes.cube], "float32"),
                          functools.partial(bench.policy, policy)))
    if "inference" in sections:
        units.append(("inference", bench.base("inference/sliding_window", sizes.volume, sizes.infer_dtype),
                      bench.inference))
    if "train_step" in sections:
        for dtype in sizes.dtypes:
            for batch in sorted(sizes.batches, reverse=True):
                if (batch, dtype) != bench.primary:
                    units.append(("train_step", step_base(batch, dtype, "train_step/real"),
                                  functools.partial(bench.train_step, batch, dtype)))
    return units


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_for(args)
    if args.smoke and not args.full_compile:  # read when the backend starts, i.e. before jax.devices()
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAG}".strip()
    device = jax.devices()[0]
    runner = Runner(args.budget_s, device.device_kind)
    bench = Bench(args, sizes, runner)
    runner.emit({"what": "start", "section": "meta", "impl": "jax", "shape": None, "dtype": None,
                 "platform": device.platform, "device_count": jax.device_count(), "jax": jax.__version__,
                 "sections": list(args.sections), "budget_s": args.budget_s, "smoke": args.smoke,
                 "primary": {"batch": bench.primary[0], "dtype": bench.primary[1]},
                 "sizes": dataclasses.asdict(sizes), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "argv": sys.argv[1:]})
    for section, base, unit in plan(bench, args.sections):
        runner.unit(section, base, unit)
    runner.emit({"what": "done", "section": "meta", "impl": "jax", "shape": None, "dtype": None,
                 "wall_s": round(runner.elapsed(), 1), "failed_units": runner.errors,
                 "skipped_units": runner.skipped})
    return 1 if runner.errors else 0


if __name__ == "__main__":
    hostenv.prepare()  # the host settings the CLI runs with (see hostenv); may re-execute
    sys.exit(main())
