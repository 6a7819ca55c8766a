"""A run that is stopped survives it, through `python -m transvw_jax.main`: a SIGKILL
resumes exactly from its last checkpoint; a preemption (SIGTERM) saves and resumes exactly;
best and latest checkpoints stay consistent whichever of them a kill interrupted;
cloud-storage URLs are refused with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import wait_for_checkpoint
from flax.traverse_util import flatten_dict
from test_train import REPO, _env, _main_cmd, _params, tiny_config, tiny_store  # noqa: F401 - a fixture

from transvw_jax import checkpointing
from transvw_jax.models import abstract_variables, build_model

# Evaluations every 2 steps (each better one is a best checkpoint and a latest one),
# periodic checkpoints every 4.
ARGS = ("--config.train.steps=8", "--config.train.eval_every=2", "--config.train.checkpoint_every=4",
        "--config.train.log_every=1", "--config.train.keep_checkpoints=20", "--config.train.patience=0")


def _main(workdir, store_path, *args, timeout=400):
    return subprocess.run(_main_cmd(workdir, store_path, *args), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _best_params(workdir, step):
    like = abstract_variables(build_model(tiny_config("x").model))
    restored = checkpointing.restore_variables(workdir, like, step=step, best=True)
    assert restored is not None
    return flatten_dict(jax.device_get(restored[1]))


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))


@pytest.fixture(scope="module")
def straight(tiny_store, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("straight") / "run"
    done = _main(workdir, tiny_store, *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_sigkill_and_resume_give_bit_identical_parameters(straight, tiny_store, tmp_path):  # noqa: F811
    """Killed without warning after step 4's checkpoint (wherever it is then: training, an
    evaluation, a best save), the rerun of the same command resumes from the last complete
    checkpoint and ends with the uninterrupted run's weights, logging no step twice."""
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_main_cmd(workdir, tiny_store, *ARGS), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(workdir, 4, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _steps(workdir / "checkpoints")[-1] < 8, "the run finished before it could be killed"
    resumed = _main(workdir, tiny_store, *ARGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "pretrain: resumed from" in resumed.stderr
    _assert_equal(_params(straight, 8), _params(workdir, 8))
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_restart_ends_like_an_uninterrupted_run(
        straight, tiny_store, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    args = (*ARGS[1:], "--config.train.steps=400")  # long enough to be stopped in the middle
    proc = subprocess.Popen(_main_cmd(workdir, tiny_store, *args), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(workdir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("preempted: ")]
    assert len(lines) == 1, err[-3000:]
    stopped = int(lines[0].split("at step ")[1].split(" ")[0])
    assert 2 <= stopped < 400
    # The step it stopped at is saved (not only the last periodic checkpoint).
    assert _steps(workdir / "checkpoints")[-1] == stopped, lines[0]
    resumed = _main(workdir, tiny_store, *ARGS)  # now 8 steps: ends where the straight run ended
    if stopped >= 8:
        pytest.skip(f"the run was past step 8 (step {stopped}) when the signal arrived")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{stopped}" in resumed.stderr
    _assert_equal(_params(straight, 8), _params(workdir, 8))


@pytest.mark.slow
def test_kill_between_a_best_save_and_its_latest_checkpoint_resumes_consistently(
        straight, tiny_store, tmp_path):  # noqa: F811
    # The uninterrupted run's directory without what it saved after step 6 is what a kill
    # between step 6's saves and step 8's leaves (its metrics after step 6 are dropped by the
    # resume); removing one of step 6's two saves as well gives the two cases below.
    template = tmp_path / "six"
    shutil.copytree(straight, template)
    for saved in ("checkpoints", "best"):
        for step in _steps(template / saved):
            if step > 6:
                shutil.rmtree(template / saved / str(step))
    (template / "pretrain_summary.json").unlink()
    assert 6 in _steps(template / "best"), "precondition: step 6 improved the validation loss"
    # ... and step 8 did not: its best save would have pushed an earlier best out of best/
    # (which keeps two), which a kill at step 6 leaves in place.
    assert 8 not in _steps(straight / "best"), "precondition: step 8 did not improve it"

    # (a) best/6 was written, checkpoints/6 was not: the resumed run starts at 4, redoes
    # step 6 and its best save.
    a = tmp_path / "a"
    shutil.copytree(template, a)
    shutil.rmtree(a / "checkpoints" / "6")
    # (b) checkpoints/6 was written, best/6 was not: the resumed run starts at 6, whose
    # weights are the best ones.
    b = tmp_path / "b"
    shutil.copytree(template, b)
    shutil.rmtree(b / "best" / "6")
    # Both resumed runs at once: each is mostly one-core start-up and compiling.
    procs = []
    for workdir in (a, b):
        with (tmp_path / f"{workdir.name}.log").open("w") as log:
            procs.append(subprocess.Popen(_main_cmd(workdir, tiny_store, *ARGS), cwd=REPO, env=_env(),
                                          stdout=subprocess.DEVNULL, stderr=log))
    for workdir, resumed_at, proc in zip((a, b), (4, 6), procs, strict=True):
        returncode = proc.wait(timeout=400)
        err = (tmp_path / f"{workdir.name}.log").read_text()
        assert returncode == 0, err[-3000:]
        assert f"resumed from {workdir / 'checkpoints'}/{resumed_at}" in err
        _assert_equal(_params(straight, 8), _params(workdir, 8))
        assert _steps(workdir / "best") == _steps(straight / "best")
        step = _steps(straight / "best")[-1]
        _assert_equal(_best_params(straight, step), _best_params(workdir, step))
        summaries = [json.loads((w / "pretrain_summary.json").read_text()) for w in (workdir, straight)]
        assert summaries[0]["best_step"] == summaries[1]["best_step"]


@pytest.mark.slow
def test_cloud_storage_urls_are_refused_in_one_line(tmp_path):
    for args, name in ((["--workdir", "gs://bucket/run"], "--workdir=gs://bucket/run"),
                       (["--workdir", str(tmp_path), "--config.data.store_dir=gs://bucket/store"],
                        "config.data.store_dir=gs://bucket/store")):
        cmd = [sys.executable, "-m", "transvw_jax.main", "--config", "configs/demo.py:runlocal",
               "--config.stages=('pretrain',)", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {name}: cloud-storage URLs"), proc.stderr
    assert not (REPO / "gs:").exists()
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_a_process_that_cannot_see_the_agreed_resume_step_stops_with_one_line(tmp_path, monkeypatch):
    """Process 0 resumes from step 8; this process's view of the directory (a per-host disk, a
    stale network file system) has no step 8: the job stops naming the directory and step."""
    from transvw_jax import multihost
    from transvw_jax.errors import CheckpointError

    monkeypatch.setattr(multihost, "from_process_zero", lambda name, value: "8")
    ckpt = checkpointing.RunCheckpointer(tmp_path)
    try:
        with pytest.raises(CheckpointError, match=r"checkpoints: process 0 resumes from step 8, which "
                                                  r"process 0 \(its latest: None\) cannot see"):
            ckpt.latest_step()
    finally:
        ckpt.close()
