"""The experiment configs and launch scripts: they load, validate, and say what users rely on.

Configs are loaded the way `main` loads them (by path, not as a package) and checked with
`stages.validate`; no stage runs.
"""

import subprocess
from pathlib import Path

import pytest

from transvw_jax import stages
from transvw_jax.fileio import load_module

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LAUNCH = REPO / "launch"

CASES = [
    ("luna16_transvw", None),
    ("luna16_transvw", "released"),
    ("luna16_genesis", None),
    ("luna16_genesis", "adam"),
    ("tpu_pod", None),
    ("tpu_pod", "released"),
]


def load_config(name: str, arg: str | None = None):
    """As ml_collections' config_flags does: import the file by path, call get_config."""
    return load_module(CONFIGS / f"{name}.py", f"config_under_test_{name}").get_config(arg)


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_config_validates(name, arg):
    config = load_config(name, arg)
    stages.validate(config)
    if (name, arg) != ("luna16_genesis", None):  # the original Models Genesis batch, 6
        assert config.train.batch_size % 8 == 0  # divisible by the tests' 8 simulated devices
    assert config.train.decay_every >= config.train.eval_every >= 1
    assert config.train.schedule_unit == "epochs"  # converted to steps of the store at run time


def test_luna16_transvw_reference_settings():
    c = load_config("luna16_transvw")
    assert tuple(c.stages) == ("discover", "pretrain", "export")
    assert (c.model.name, c.model.width, c.model.num_classes) == ("ynet3d", 32, 44)
    assert tuple(c.data.cube_shape) == (64, 64, 32) and c.data.source == "store"
    t = c.train
    assert (t.objective, t.optimizer, t.learning_rate, t.batch_size) == ("transvw", "adam", 1e-3, 64)
    assert (t.lambda_rec, t.lambda_cls) == (1.0, 0.01)
    assert (t.schedule, t.decay_factor) == ("step", 0.5)
    # In epochs: one evaluation and checkpoint per epoch, x0.5 every 40, patience 50, 200 at most
    assert t.schedule_unit == "epochs"
    assert (t.eval_every, t.checkpoint_every, t.decay_every, t.patience, t.steps) == (1, 1, 40, 50, 200)
    d = c.discovery
    assert d.normalization == "ct" and d.volumes_dir
    assert (tuple(d.autoencoder.size), d.autoencoder.width) == ((128, 128, 64), 32)
    w = d.words
    assert (w.train_instances, w.val_instances, tuple(w.border)) == (200, 30, (100, 100, 30))
    assert (tuple(w.extra_size), tuple(w.extra_offset), w.min_distance) == ((50, 80), (-10, 10), 5.0)
    assert c.transforms.policy == "transvw" and c.transforms.elastic.enabled
    assert "synthesize" not in c


def test_luna16_transvw_released():
    c = load_config("luna16_transvw", "released")
    assert tuple(c.stages) == ("pretrain", "export")
    assert c.data.source == "released" and c.data.released_dir
    # train.py's cls_classes: the first 44 classes of fold 1
    assert tuple(c.data.released_folds) == (1,) and c.data.released_classes == c.model.num_classes == 44
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config("luna16_transvw", "nope")


def test_luna16_genesis():
    c = load_config("luna16_genesis")
    assert tuple(c.stages) == ("discover", "pretrain", "export")
    assert (c.model.name, c.train.objective, c.transforms.policy) == ("unet3d", "genesis", "genesis")
    assert c.discovery.mode == "random"
    t = c.train  # the original Models Genesis optimiser and schedule (epochs)
    assert (t.optimizer, t.learning_rate, t.momentum, t.batch_size) == ("sgd", 1.0, 0.9, 6)
    assert (t.schedule_unit, t.schedule, t.decay_factor) == ("epochs", "step", 0.5)
    assert (t.decay_every, t.patience, t.eval_every) == (int(0.8 * 50), 50, 1)
    assert c.transforms.local_shuffle.num_blocks == 10_000 and not c.transforms.elastic.enabled
    assert c.data.source == "store"
    a = load_config("luna16_genesis", "adam").train
    assert (a.optimizer, a.learning_rate, a.batch_size) == ("adam", 1e-3, 64)
    assert (a.schedule_unit, a.decay_every, a.patience) == ("epochs", 40, 50)


def test_tpu_pod():
    c = load_config("tpu_pod")
    assert tuple(c.stages) == ("pretrain", "export")
    assert c.model.dtype == "bfloat16" and c.model.num_classes == 44
    assert c.parallel.distributed == "auto" and c.parallel.fsdp == 1
    assert c.train.batch_size % 256 == 0  # global: divisible by the chip counts of slices up to 256
    assert c.data.store_dir.startswith("/") and "://" not in c.data.store_dir
    assert c.data.num_threads == 16
    t = c.train  # in epochs, as the base config; sqrt-scaled learning rate, 5 epochs of warmup
    assert t.schedule_unit == "epochs"
    assert (t.eval_every, t.checkpoint_every, t.decay_every, t.patience, t.warmup_steps) == (4, 4, 40, 50, 5)
    assert (t.lr_scaling, t.reference_batch_size) == ("sqrt", 64)


def test_launch_scripts_parse():
    scripts = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm_gpu.sbatch"]
    assert LAUNCH / "tpu_pod.sh" in scripts
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_tpu_pod_script_needs_its_variables(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh")], capture_output=True, text=True,
                          timeout=30, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "TPU_NAME" in proc.stderr and "ZONE" in proc.stderr and "WORKDIR" in proc.stderr


def test_tpu_pod_script_runs_on_all_workers(tmp_path):
    fake = tmp_path / "gcloud"  # records its arguments instead of reaching any machine
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path), "TPU_NAME": "pod", "ZONE": "z",
           "REPO": "/srv/repo", "WORKDIR": "/mnt/shared/run"}
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--config.train.steps=5"],
                          capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "args").read_text()
    args = text.splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in args
    command = text[text.index("\n--command\n") + len("\n--command\n"):].rstrip("\n")  # several lines
    # Detached per-worker runs with logs and the venv's python: tests/test_launchers.py runs them.
    assert command.startswith("REPO='/srv/repo' WORKDIR='/mnt/shared/run' ")
    assert command.endswith(" tpu_pod '--config.train.steps=5'")
    assert "setsid nohup" in command and "worker-$W.log" in command and "transvw_jax.main" in command


def test_sbatch_uses_srun():
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH" in text
    assert any(line.lstrip().startswith("srun ") for line in text.splitlines())
    assert "transvw_jax.main" in text


def test_configs_have_no_stray_arguments():
    for name in ("luna16_genesis", "tpu_pod"):
        with pytest.raises(ValueError):
            load_config(name, "nope")


@pytest.mark.parametrize("name", ["luna16_transvw", "luna16_genesis", "tpu_pod"])
def test_luna16_configs_use_models_genesis_folds_and_the_original_orientation(name):
    """Pretrain on subsets 0-4, validate on 5-6, never read 7-9; arrays as the originals read them."""
    d = load_config(name).discovery
    assert (tuple(d.train_subsets), tuple(d.val_subsets)) == ((0, 1, 2, 3, 4), (5, 6))
    assert d.subset_pattern == "subset{}" and d.orientation == "reference"
    assert not {7, 8, 9} & set(d.train_subsets + d.val_subsets)
