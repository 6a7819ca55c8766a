"""Feedback of a pretraining run: scalars, a progress line and sample restorations.

Written by process 0 only; in a multi-process run every other process builds its writer with
`enabled=False`, which does nothing, so the training loop calls the same methods everywhere.

What goes where, and why:

  <workdir>/metrics.jsonl       one JSON object per line, {"step": 120, "split": "train", "loss": ...}.
                                The record of the run: plain text that `jq`, pandas and a test can read
                                without TensorBoard, flushed after each line so a killed run loses at
                                most the line being written. Non-finite values are written as the
                                strings "nan", "inf", "-inf" so that every line stays valid JSON.
  <workdir>/tensorboard/        TensorBoard event files (tensorboardX), tag "<split>/<name>", for
                                watching curves while the run goes on.
  <workdir>/samples/step_N.png  input / target / restoration of a few cubes (`save_sample_grid`), to see
                                what the restoration head has learnt, which a loss value cannot show.
  the log (logging.info)        one `ProgressLine` per logging interval: step, loss parts, cubes/s, ETA.

On resume from a checkpoint at step S the metrics written after S by the killed run describe a
trajectory that no longer exists; `MetricsWriter.truncate_after(S)` drops them from metrics.jsonl so
that it holds one value per (step, split, name) again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from transvw_jax.progress import format_duration
from transvw_jax.samples import LABEL_WIDTH, render_grid, save_png

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"


def _json_value(value: Any) -> float | str:
    """A python float, or "nan"/"inf"/"-inf": bare NaN/Infinity tokens are not JSON."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


_TB_IMPORT = threading.Lock()


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX imports torch
    when it is installed (the project's optional extra) only to accept torch tensors, which
    this writer never passes; that import was two seconds of every run's start-up. (Another
    thread importing torch during these lines would see it missing: the writers are made
    before a run starts its threads.)"""
    with _TB_IMPORT:
        if "torch" in sys.modules:
            from tensorboardX import SummaryWriter
            return SummaryWriter
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX expects
        try:
            from tensorboardX import SummaryWriter
        finally:
            if "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
        return SummaryWriter


class MetricsWriter:
    """Appends scalars to <workdir>/metrics.jsonl and to TensorBoard; see the module docstring.

    Args:
      workdir: run directory; created if missing (only when enabled).
      enabled: False on every process but 0: all methods do nothing and nothing is created.
      tensorboard: also write TensorBoard events. If tensorboardX cannot be imported a warning
        is logged and only metrics.jsonl is written: a missing viewer must not stop a run.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.tensorboard_dir = self.workdir / TENSORBOARD_DIR
        self._file = None
        self._tb = None  # created on the first write, so that a resume makes no empty event file
        self._tb_class = None
        self._tb_files = 0
        self._purge_step: int | None = None
        if not enabled:
            return
        if tensorboard:
            try:
                self._tb_class = _summary_writer_class()
            except ImportError as e:  # pragma: no cover - tensorboardX is installed with the project
                logging.warning("TensorBoard events disabled (%s); metrics go to %s only.", e, self.path)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def _repair_tail(self) -> None:
        """End the file on a complete line, so that the next append does not glue onto debris.

        A kill during a write can leave a final line without its newline: it is dropped if it is
        not valid JSON (an interrupted write) and completed with "\\n" if it is.
        """
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            start = data.rfind(b"\n") + 1
            if _parses(data[start:]):
                f.write(b"\n")
            else:
                logging.warning("metrics: dropping a partial last line of %s", self.path)
                f.truncate(start)

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        """Append {"step", "split", **scalars} as one line, flush it, and add TensorBoard scalars.

        The flush hands the line to the OS, so a SIGKILL of the run loses at most the line being
        written (an OS crash may lose more: there is no fsync per line, which would cost a disk
        round trip per step).
        """
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError("MetricsWriter is closed")
        reserved = {"step", "split"} & set(scalars)
        if reserved:
            raise ValueError(f"scalar names {sorted(reserved)} are reserved in {METRICS_FILE}")
        values = {name: float(value) for name, value in scalars.items()}
        record = {"step": int(step), "split": str(split)}
        record.update({name: _json_value(value) for name, value in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        tb = self._tensorboard()
        if tb is not None:
            for name, value in values.items():
                tb.add_scalar(f"{split}/{name}", value, int(step))

    def _tensorboard(self):
        if self._tb is None and self._tb_class is not None:
            # The suffix keeps the files of one process distinct (tensorboardX names them by the
            # second) and in creation order, the order TensorBoard reads them in.
            self._tb = self._tb_class(str(self.tensorboard_dir), purge_step=self._purge_step, flush_secs=30,
                                      filename_suffix=f".{os.getpid()}.{self._tb_files:03d}")
            self._tb_files += 1
            self._purge_step = None
        return self._tb

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint at `step`: drop every line of metrics.jsonl with "step" > step.

        The file is rewritten atomically (a temporary file beside it, then os.replace), so a kill
        during the rewrite leaves the old or the new file, never half of one. A final partial line
        left by a kill is dropped; other lines that are not JSON objects with a "step" are kept.

        TensorBoard needs no rewrite: its reader hides the points of a crashed run when a later
        event file restarts at a lower step. To make that explicit the next event file starts with
        tensorboardX's `purge_step=step + 1` marker (a SessionLog.START at that step), which tells
        TensorBoard to discard the events with step > `step` written before it.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError("MetricsWriter is closed")
        self._file.close()
        lines = self.path.read_bytes().splitlines(keepends=True)
        if lines and not _parses(lines[-1]):
            lines.pop()
        kept = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                drop = int(record["step"]) > step
            except (ValueError, TypeError, KeyError):
                logging.warning("metrics: keeping an unreadable line of %s: %r", self.path, line[:80])
                drop = False
            if not drop:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # reopen: the old handle was on the replaced file
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = int(step) + 1

    def close(self) -> None:
        """Flush and close metrics.jsonl and the event file; a second call does nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _format_rate(cubes_per_s: float) -> str:
    return f"{cubes_per_s:.1f}" if cubes_per_s >= 1 else f"{cubes_per_s:.3g}"


class ProgressLine:
    """One log line per call: step, loss parts, cubes/s, ETA.

      step 120/2000 (6.0%) loss 0.0123 rec 0.011 cls 0.131 acc 0.62 | 14.2 cubes/s | ETA 12m31s

    The rate is measured between consecutive calls (the first from construction, so it includes
    compilation), not averaged over the run: it shows the throughput now, which is what a stall or
    a slow data loader changes, and the ETA follows from it.

    Args:
      total_steps: the step the run ends at.
      batch_size: global cubes per step (all processes), so cubes/s is the run's throughput.
      start_step: the step the run starts (or resumes) at.
      log: where lines go, called as log("%s", line).
    """

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0,
                 log: Callable[..., Any] = logging.info):
        self.total_steps, self.batch_size, self._log = total_steps, batch_size, log
        self._last_step = start_step
        self._last_time = time.monotonic()

    def update(self, step: int, scalars: Mapping[str, float]) -> str:
        """Log and return the line for `step`; scalars are shown with 4 significant digits, in order."""
        now = time.monotonic()
        steps, elapsed = step - self._last_step, now - self._last_time
        self._last_step, self._last_time = step, now
        text = f"step {step}/{self.total_steps}"
        if self.total_steps > 0:
            text += f" ({100.0 * step / self.total_steps:.1f}%)"
        for name, value in scalars.items():
            text += f" {name} {float(value):.4g}"
        if steps > 0 and elapsed > 0:
            steps_per_s = steps / elapsed
            eta = format_duration(max(0, self.total_steps - step) / steps_per_s)
            text += f" | {_format_rate(steps_per_s * self.batch_size)} cubes/s | ETA {eta}"
        else:  # no step since the last call (or a step back): no rate to measure
            text += " | - cubes/s | ETA -"
        self._log("%s", text)
        return text


def _cubes(array: Any, n: int, what: str) -> np.ndarray:
    """The first n cubes of (B, X, Y, Z) or (B, X, Y, Z, 1) as a (n, X, Y, Z) numpy array."""
    cubes = np.asarray(array[:n], np.float32)  # slice first: only n cubes leave the device
    if cubes.ndim == 5 and cubes.shape[-1] == 1:
        cubes = cubes[..., 0]
    if cubes.ndim != 4:
        raise ValueError(f"{what}: expected (B, X, Y, Z) or (B, X, Y, Z, 1), got {np.shape(array)}")
    return cubes


def _input_label(i: int, name: str | None) -> str:
    """'#i input (name)', on two lines where one does not fit in render_grid's label column."""
    if not name:
        return f"#{i} input"
    label = f"#{i} input ({name})"
    left, _, right, _ = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), label)
    return label if right - left <= LABEL_WIDTH - 8 else f"#{i} input\n({name})"


def save_sample_grid(path: str | os.PathLike, inputs: Any, targets: Any, restorations: Any, *,
                     max_cubes: int = 4, transform_names: Sequence[str] | None = None) -> Path:
    """Write a PNG of input, target and restoration (three rows) for each of the first cubes.

    Args:
      path: where the PNG goes (see `sample_path`); written atomically, so a viewer never
        reads half an image.
      inputs, targets, restorations: numpy or jax arrays (B, X, Y, Z) or (B, X, Y, Z, 1) with values
        in [0, 1] (values outside are clipped). Jax arrays must be addressable by this process.
      max_cubes: at most this many cubes (3 rows each) are drawn.
      transform_names: transform_names[i] names the transform that made input i; shown in its label.

    Returns:
      The path written.
    """
    n = min(max_cubes, len(inputs))
    x, y, r = (_cubes(a, n, what) for a, what in
               ((inputs, "inputs"), (targets, "targets"), (restorations, "restorations")))
    if not x.shape == y.shape == r.shape:
        raise ValueError(f"shapes differ: inputs {x.shape}, targets {y.shape}, restorations {r.shape}")
    if n < 1:
        raise ValueError("no cubes to draw")
    if transform_names is not None and len(transform_names) < n:
        raise ValueError(f"{len(transform_names)} transform names for {n} cubes")
    rows = []
    for i in range(n):
        rows += [(_input_label(i, transform_names[i] if transform_names is not None else None), x[i]),
                 (f"#{i} target", y[i]),
                 (f"#{i} restored", r[i])]
    return save_png(render_grid(rows), path)


def sample_path(workdir: str | os.PathLike, step: int) -> Path:
    """<workdir>/samples/step_{step:07d}.png: zero-padded so that names sort by step."""
    return Path(workdir) / SAMPLES_DIR / f"step_{step:07d}.png"
