"""The launchers, run dry on this machine, and the large-batch learning-rate rule.

No cluster is reached: a fake `gcloud` runs the remote command locally once per worker
(with the TPU_WORKER_ID a worker would have), fake `srun` / `scancel` / `scontrol` record
what they are asked, and a stub "python" records its arguments and signals instead of
training. What this does not show (a real pod's ssh, metadata server and uv download, a
real SLURM's signal delivery) is said in launch/README.md.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transvw_jax import configuration, training
from transvw_jax.fileio import load_module
from transvw_jax.tasks import pretraining

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "local.sh", "slurm_gpu.sbatch", "slurm_discover.sbatch"]


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_print_their_usage(script):
    path = LAUNCH / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(path), "-h"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "set -euo" not in proc.stderr
    assert proc.stderr.count("\n") > 5, proc.stderr


# --------------------------------------------------------------------------- TPU pod

# Records its arguments, then runs --command as a worker's ssh would: once per worker
# (--worker=all: FAKE_WORKERS of them), with that worker's TPU_WORKER_ID and own home.
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/gcloud.args"
worker="" cmd=""
while (($#)); do
  case "$1" in --worker=*) worker="${1#--worker=}" ;; --command) cmd="$2"; shift ;; esac
  shift
done
if [[ "$worker" == all ]]; then ids=$(seq 0 $((FAKE_WORKERS - 1))); else ids=$worker; fi
rc=0
for i in $ids; do TPU_WORKER_ID=$i HOME="$FAKE_DIR/home-$i" bash -c "$cmd" || rc=$?; done
exit $rc
"""

# The venv's "python": `-c` answers the version check; a run records its argv, prints a
# line (into the worker's log) and sleeps until SIGTERM, which it records.
STUB_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == -c ]]; then echo "python 3.11.9 jax 0.10.2"; exit 0; fi
printf '%s\\n' "$@" > "$FAKE_DIR/argv-$TPU_WORKER_ID"
echo "$0" > "$FAKE_DIR/exe-$TPU_WORKER_ID"
trap 'echo TERM >> "$FAKE_DIR/term-$TPU_WORKER_ID"; kill $sleeper; exit 0' TERM
echo "stub python worker $TPU_WORKER_ID started"
sleep 30 & sleeper=$!
wait
"""

# uv: records its calls; `uv venv ... PATH` makes PATH/bin/python the stub.
FAKE_UV = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/uv.calls"
if [[ "$1" == venv ]]; then
  for last; do :; done
  mkdir -p "$last/bin" && cp "$FAKE_DIR/stub_python" "$last/bin/python"
fi
"""


@pytest.fixture
def pod(tmp_path):
    """Environment and helpers for tpu_pod.sh with two fake workers; stops what it started."""
    fake = tmp_path / "fake"
    bin_dir = fake / "bin"
    write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
    write_exe(bin_dir / "uv", FAKE_UV)
    stub = write_exe(fake / "stub_python", STUB_PYTHON)
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "python", stub.read_text())
    workdir = tmp_path / "shared" / "run"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "FAKE_DIR": str(fake),
           "FAKE_WORKERS": "2", "TPU_NAME": "pod", "ZONE": "z", "REPO": str(REPO),
           "WORKDIR": str(workdir), "VENV": str(venv)}

    def launch(*args, **extra_env):
        return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], capture_output=True, text=True,
                              timeout=60, env={**env, **extra_env}, cwd=tmp_path)

    yield launch, fake, workdir, venv
    for pidfile in (workdir / "logs").glob("worker-*.pid"):  # the stubs this test started
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def test_tpu_pod_runs_in_the_background_with_per_worker_logs(pod):
    launch, fake, workdir, venv = pod
    odd = "a b 'c'"
    start = time.monotonic()
    proc = launch("--config.stages=('pretrain',)", f"--config.note={odd}",
                  EXTRA="--config.train.steps=5")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 15  # returned while the stubs still sleep (30 s)
    args = (fake / "gcloud.args").read_text().splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in args
    logs = workdir / "logs"
    for i in (0, 1):
        log = logs / f"worker-{i}.log"
        started = f"stub python worker {i} started"
        assert wait_for(lambda log=log, started=started: started in log.read_text()), log.read_text()
        assert wait_for(lambda i=i: (fake / f"argv-{i}").exists())
        argv = (fake / f"argv-{i}").read_text().splitlines()
        assert argv == ["-u", "-m", "transvw_jax.main", "--config", "configs/tpu_pod.py", "--workdir",
                        str(workdir), "--config.stages=('pretrain',)", f"--config.note={odd}",
                        "--config.train.steps=5"]
        assert (fake / f"exe-{i}").read_text().strip() == str(venv / "bin" / "python")  # the venv's
        pid = int((logs / f"worker-{i}.pid").read_text())
        os.kill(pid, 0)  # still running after the launcher returned
        assert f"worker {i}: started pid {pid}, log {log}" in proc.stdout

    status = launch("status")
    assert status.returncode == 0, status.stderr
    assert "worker 0: running" in status.stdout and "worker 1: running" in status.stdout
    assert "stub python worker 1 started" in launch("logs", "1").stdout

    again = launch()  # a second job would fight for the TPU
    assert again.returncode != 0 and "still running" in again.stderr and "stop first" in again.stderr

    stop = launch("stop")
    assert stop.returncode == 0, stop.stderr
    for i in (0, 1):
        assert wait_for(lambda i=i: (fake / f"term-{i}").exists()), f"worker {i} got no SIGTERM"
    assert wait_for(lambda: "not running" in launch("status").stdout)


def test_tpu_pod_setup_makes_a_311_venv_on_every_worker(pod):
    launch, fake, workdir, _ = pod
    proc = launch("setup", VENV="")  # the default: ~/.venvs/transvw-jax on each worker
    assert proc.returncode == 0, proc.stderr
    calls = (fake / "uv.calls").read_text().splitlines()
    for i in (0, 1):
        venv = fake / f"home-{i}" / ".venvs" / "transvw-jax"
        assert f"venv --allow-existing --python 3.11 {venv}" in calls
        assert f"pip install --python {venv}/bin/python -e . jax[tpu]" in calls
        assert f"worker {i}: python 3.11.9 jax 0.10.2 in {venv}" in proc.stdout
    assert len(calls) == 4
    assert not (workdir / "logs").exists()  # setup starts nothing

    again = launch("setup", VENV="")  # a 3.11 venv is there: only the install is redone
    assert again.returncode == 0, again.stderr
    assert len((fake / "uv.calls").read_text().splitlines()) == 6


def test_tpu_pod_needs_setup_first(pod, tmp_path):
    launch, _, _, _ = pod
    proc = launch(VENV=str(tmp_path / "missing"))
    assert proc.returncode != 0 and "run launch/tpu_pod.sh setup first" in proc.stderr


# --------------------------------------------------------------------------- SLURM

# srun: records its arguments and environment, then runs until SIGTERM (recorded). scancel
# --signal=TERM delivers TERM to the "tasks" (the fake srun), as slurmstepd would.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
echo "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" > "$FAKE_DIR/srun.env"
trap 'echo TERM >> "$FAKE_DIR/srun.term"; kill $sleeper; exit 0' TERM
sleep "${FAKE_SRUN_SLEEP:-30}" & sleeper=$!
echo $$ > "$FAKE_DIR/srun.pid"
wait
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scancel.calls"
[[ "$1" == --signal=TERM ]] && kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
exit 0
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol.calls"
"""


@pytest.fixture
def slurm(tmp_path):
    fake = tmp_path / "fake"
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        write_exe(fake / "bin" / name, text)
    env = {"PATH": f"{fake / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_DIR": str(fake),
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(REPO)}

    def start(script="slurm_gpu.sbatch", *args, **extra):
        return subprocess.Popen(["bash", str(LAUNCH / script), *args], env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = []

    def run(*args, **extra):
        proc = start(*args, **extra)
        procs.append(proc)
        return proc

    yield run, fake
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    pidfile = fake / "srun.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def test_sbatch_defaults(slurm):
    run, fake = slurm
    proc = run(FAKE_SRUN_SLEEP="0")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    args = (fake / "srun.args").read_text().splitlines()
    assert "--cpus-per-task=8" in args and "--gpu-bind=none" in args
    main = args[args.index("python"):]
    assert main[:7] == ["python", "-m", "transvw_jax.main", "--config", "configs/luna16_transvw.py",
                        "--workdir", "runs/slurm-4242"]
    assert "--config.stages=('pretrain','export')" in main  # no discovery in the GPU job
    assert "--config.train.batch_size=512" in main  # 32 cubes x 16 GPUs
    assert "--config.parallel.distributed=auto" in main
    assert (fake / "srun.env").read_text().strip() == "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
    assert not (fake / "scontrol.calls").exists()  # a finished job is not requeued
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text


def test_sbatch_arguments_win_over_its_defaults(slurm):
    run, fake = slurm
    proc = run("slurm_gpu.sbatch", "--config.train.batch_size=64", "--config.stages=('pretrain',)",
               FAKE_SRUN_SLEEP="0", CUBES_PER_GPU="64")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    main = (fake / "srun.args").read_text().splitlines()
    assert [a for a in main if a.startswith("--config.train.batch_size")] == ["--config.train.batch_size=64"]
    assert [a for a in main if a.startswith("--config.stages")] == ["--config.stages=('pretrain',)"]
    proc = run(FAKE_SRUN_SLEEP="0", CUBES_PER_GPU="64")
    proc.communicate(timeout=30)
    assert "--config.train.batch_size=1024" in (fake / "srun.args").read_text().splitlines()


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
                         ids=["time-limit-USR1", "TERM"])
def test_sbatch_passes_the_signal_to_the_tasks(slurm, sig, requeued):
    """--signal=B:USR1@120 (and a SIGTERM) reach the batch shell: the tasks get SIGTERM
    through scancel (srun itself would SIGKILL them), and only USR1 requeues the job."""
    run, fake = slurm
    proc = run()
    assert wait_for(lambda: (fake / "srun.pid").exists()), proc.stderr
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert (fake / "srun.term").read_text().strip() == "TERM", err
    assert (fake / "scancel.calls").read_text().splitlines() == ["--signal=TERM 4242"]
    if requeued:
        assert (fake / "scontrol.calls").read_text().splitlines() == ["requeue 4242"]
    else:
        assert not (fake / "scontrol.calls").exists()
    assert proc.returncode == 0, err  # srun's status (the stub exits 0 after its TERM)


def test_discovery_is_its_own_one_process_job(slurm):
    run, fake = slurm
    proc = run("slurm_discover.sbatch", FAKE_SRUN_SLEEP="0", WORKDIR="/shared/runs/t", VOLUMES_DIR="/v")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    args = (fake / "srun.args").read_text().splitlines()
    assert args[:2] == ["--ntasks=1", "--cpus-per-task=8"]
    assert "--config.stages=('discover',)" in args and "--config.parallel.distributed=off" in args
    assert "--config.discovery.volumes_dir=/v" in args and "/shared/runs/t" in args
    text = (LAUNCH / "slurm_discover.sbatch").read_text()
    assert "#SBATCH --ntasks=1" in text and "#SBATCH --gres=gpu:1" in text


# --------------------------------------------------------------------------- learning rate


def test_tpu_pod_scales_the_learning_rate_with_a_warmup():
    config = load_module(REPO / "configs" / "tpu_pod.py", "tpu_pod_under_test").get_config()
    t = config.train
    assert (t.lr_scaling, t.reference_batch_size, t.batch_size, t.learning_rate) == ("sqrt", 64, 1024, 1e-3)
    assert t.eval_every == t.checkpoint_every == 4 and t.patience == 50  # epochs
    config, record = pretraining.schedule_in_steps(config, 26_400)  # a full store: 25 steps per epoch
    t = config.train
    assert (record["steps_per_epoch"], t.warmup_steps, t.eval_every) == (25, 125, 100)
    assert record["patience_evaluations"] == 13  # 50 epochs of evaluations every 4
    schedule = training.make_schedule(t)
    peak = 1e-3 * (1024 / 64) ** 0.5
    assert float(schedule(0)) == 0.0
    assert float(schedule(t.warmup_steps)) == pytest.approx(peak)
    assert float(schedule(t.warmup_steps + t.decay_every)) == pytest.approx(peak / 2)


def test_lr_scaling_rules_and_the_default():
    t = load_module(REPO / "configs" / "default.py", "default_under_test").get_config().train
    assert (t.lr_scaling, t.reference_batch_size) == ("none", 64)
    t.update(schedule="constant", batch_size=256, learning_rate=1e-3)
    assert float(training.make_schedule(t)(7)) == pytest.approx(1e-3)  # none: unchanged
    t.lr_scaling = "linear"
    assert float(training.make_schedule(t)(7)) == pytest.approx(4e-3)
    t.lr_scaling = "sqrt"
    assert float(training.make_schedule(t)(7)) == pytest.approx(2e-3)
    del t["lr_scaling"], t["reference_batch_size"]  # a config written before the keys
    configuration.validate_loop(t, "train")
    assert float(training.make_schedule(t)(7)) == pytest.approx(1e-3)


def test_a_bad_lr_scaling_is_one_line_naming_the_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "transvw_jax.main", "--config", "configs/tpu_pod.py", "--workdir",
         str(tmp_path), "--config.train.lr_scaling=cubic"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    # The user-facing message: the one stderr line that is not an absl log line.
    lines = [ln for ln in proc.stderr.splitlines() if ln and not re.match(r"[IWEF]\d{4} ", ln)]
    assert lines == ["error: train.lr_scaling: 'cubic' is not one of none, sqrt, linear"], proc.stderr
