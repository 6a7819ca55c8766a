"""Run feedback: metrics.jsonl, TensorBoard events, the progress line and sample grids."""

import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto.event_pb2 import Event, SessionLog

from transvw_jax import metrics, samples
from transvw_jax.metrics import MetricsWriter, ProgressLine, sample_path, save_sample_grid


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def event_files(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("*tfevents*"))  # the order TensorBoard reads them in


def read_events(path: Path) -> list:
    """The Events of one event file, parsing the TFRecord framing (u64 length, u32 length crc,
    payload, u32 payload crc) by hand: tensorboard, which has a reader, is not installed."""
    events, data, pos = [], path.read_bytes(), 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    assert pos == len(data), f"truncated record in {path}"
    return events


def scalars_of(events) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def test_jsonl_lines_hold_step_split_and_values_and_stay_json_for_nan(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, "train", {"loss": 0.5, "acc": np.float32(0.25), "rec": jnp.float32(0.125)})
        w.write(2, "train", {"loss": float("nan"), "grad_norm": float("inf"), "x": -math.inf})
        w.write(2, "eval", {"loss": 0.75})
        with pytest.raises(ValueError, match="reserved"):
            w.write(3, "train", {"step": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]  # strict: no bare NaN/Infinity tokens
    assert records[0] == {"step": 1, "split": "train", "loss": 0.5, "acc": 0.25, "rec": 0.125}
    assert records[1] == {"step": 2, "split": "train", "loss": "nan", "grad_norm": "inf", "x": "-inf"}
    assert records[2] == {"step": 2, "split": "eval", "loss": 0.75}
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert not (tmp_path / "tensorboard").exists()


def test_each_line_is_on_disk_before_close(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(7, "train", {"loss": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 7, "split": "train", "loss": 1.0}]
    w.close()
    w.close()  # idempotent


def test_truncate_after_drops_later_steps_and_a_partial_last_line(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (10, 20, 30, 40):
            w.write(step, "train", {"loss": step / 100})
        w.write(20, "eval", {"loss": 0.2})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 50, "split": "tr')  # a kill mid-write
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.truncate_after(20)
        assert [(r["step"], r["split"]) for r in read_jsonl(path)] == [(10, "train"), (20, "train"),
                                                                       (20, "eval")]
        w.write(30, "train", {"loss": 0.33})  # appends to the rewritten file
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(10, 0.1), (20, 0.2), (20, 0.2), (30, 0.33)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_truncate_after_without_reopening_keeps_earlier_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "split": "train", "lo')
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        # the partial line is gone as soon as the writer opens, so appends start on a new line
        assert path.read_text() == '{"step": 1, "split": "train", "loss": 1.0}\n'
        w.write(2, "train", {"loss": 0.5})
        w.truncate_after(5)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_tensorboard_events_hold_the_scalars_and_a_purge_marker_after_truncate(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(3, "train", {"loss": 0.5, "acc": 0.75})
        w.write(3, "eval", {"loss": float("nan")})
        w.truncate_after(2)
        w.write(3, "train", {"loss": 0.25})
    files = event_files(tmp_path / "tensorboard")
    assert len(files) == 2  # truncate_after starts a new file, read after the first
    first, second = read_events(files[0]), read_events(files[1])
    values = scalars_of(first)
    assert math.isnan(values.pop(("eval/loss", 3)))
    assert values == {("train/loss", 3): 0.5, ("train/acc", 3): 0.75}
    starts = [e for e in second if e.session_log.status == SessionLog.START]
    assert [e.step for e in starts] == [3]  # purge marker at step + 1: TensorBoard hides step > 2 before it
    assert second.index(starts[0]) < next(i for i, e in enumerate(second) if e.summary.value)
    assert scalars_of(second) == {("train/loss", 3): 0.25}


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, enabled=False) as w:
        w.write(1, "train", {"loss": 1.0})
        w.truncate_after(0)
    assert not workdir.exists()


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_progress_line_shows_step_losses_rate_and_eta(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "monotonic", clock)
    logged = []
    progress = ProgressLine(total_steps=2000, batch_size=8, start_step=100,
                            log=lambda fmt, s: logged.append(s))
    clock.t += 10.0  # 20 steps of 8 cubes in 10 s: 16 cubes/s, 2 steps/s
    line = progress.update(120, {"loss": 0.012345, "rec": 0.011, "cls": 0.13149, "acc": 0.62})
    assert line == ("step 120/2000 (6.0%) loss 0.01235 rec 0.011 cls 0.1315 acc 0.62 | 16.0 cubes/s"
                    " | ETA 15m40s")  # 1880 steps / 2 steps/s = 940 s
    assert logged == [line]
    clock.t += 40.0  # the rate is the last interval's: 80 steps in 40 s
    line = progress.update(200, {"loss": 0.01})
    assert "step 200/2000 (10.0%) loss 0.01 |" in line and "| 16.0 cubes/s |" in line
    assert line.endswith("ETA 15m00s")  # 1800 / 2
    clock.t += 100.0  # slower: 10 steps in 100 s
    assert progress.update(210, {}).endswith("| 0.8 cubes/s | ETA 4h58m")  # 1790 / 0.1 s
    assert progress.update(210, {}).endswith("| - cubes/s | ETA -")  # no step, no rate


def test_sample_grid_has_three_rows_per_cube_and_no_temp_files(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 16, 16, 8, 1), dtype=np.float32), rng.random((5, 16, 16, 8, 1), dtype=np.float32)
    path = save_sample_grid(sample_path(tmp_path, 1200), x, y, jnp.asarray(x[..., 0]), max_cubes=3,
                            transform_names=["nonlinear", "local_shuffle", "in_paint", "flip", "flip"])
    assert path == tmp_path / "samples" / "step_0001200.png"
    image = Image.open(path)
    row_h = 16 * 2 + 4  # render_grid: X * scale + pad
    assert image.size == (samples.LABEL_WIDTH + 4 * (16 * 2 + 4), 3 * 3 * row_h)
    # row 1 (target of cube 0) shows y[0]'s slices, row 2 (restoration) shows x[0]'s
    z = np.linspace(0, 7, 6).round().astype(int)[1]
    pixels = np.asarray(image)
    left = samples.LABEL_WIDTH
    np.testing.assert_array_equal(pixels[row_h:row_h + 32:2, left:left + 32:2],
                                  (y[0, :, :, z, 0] * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(pixels[2 * row_h:2 * row_h + 32:2, left:left + 32:2],
                                  (x[0, :, :, z, 0] * 255).round().astype(np.uint8))
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step_0001200.png"]


def test_sample_grid_labels_and_shape_checks(tmp_path):
    assert metrics._input_label(0, "nonlinear") == "#0 input (nonlinear)"
    assert metrics._input_label(3, None) == "#3 input"
    long = metrics._input_label(1, "local-shuffle in-paint nonlinear")
    assert long == "#1 input\n(local-shuffle in-paint nonlinear)"
    cubes = np.zeros((2, 8, 8, 4), np.float32)
    path = save_sample_grid(tmp_path / "g.png", cubes, cubes, cubes)  # fewer cubes than max_cubes
    assert Image.open(path).size[1] == 2 * 3 * (8 * 2 + 4)
    with pytest.raises(ValueError, match="shapes differ"):
        save_sample_grid(tmp_path / "h.png", cubes, cubes, np.zeros((2, 8, 8, 2), np.float32))
    with pytest.raises(ValueError, match="expected"):
        save_sample_grid(tmp_path / "h.png", cubes[..., 0], cubes[..., 0], cubes[..., 0])
    assert not (tmp_path / "h.png").exists()
