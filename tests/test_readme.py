"""The README blocks run as written.

The convert and predict blocks of "Fine-tune the released weights on your task" are taken
from README.md and run with bash, unchanged, in a temporary directory prepared so that every
name in them resolves. What stands in for what, and why:

- The working directory: the README runs its commands from the repository root; here a
  temporary directory whose `configs` is a link to the repository's `configs/`, so that the
  outputs (`weights/*.safetensors`, `runs/mine/...`) land in the temporary directory.
  `python` is the interpreter running the tests (its folder first on PATH).
- `weights/Genesis_Chest_CT.h5` and `weights/TransVW_chest_ct.h5`: width-4 Keras files in
  the releases' layout (written with h5py as in tests/test_convert.py; the TransVW one with
  its head), not the released width-32 files, which cannot be downloaded here. The convert
  command does not depend on the width.
- `runs/mine/finetune` (what the fine-tuning block would leave): a width-32 segmentation
  checkpoint (2 classes) with random weights, written with the checkpointing API instead of
  running the fine-tuning block (up to 2,000 steps on 64x64x32 patches). The predict block
  itself runs unchanged, at the README's width 32 and 64x64x32 window.
- `data/Dataset001_Mine/imagesTs` and `labelsTs`: two labeled phantoms of 32x32x16 in the
  nnU-Net layout (sliding-window inference pads them to the window).
- The subprocesses see one CPU device (the suite's simulated devices are dropped from
  XLA_FLAGS), as on a user's machine.

The other `python -m transvw_jax.main` commands of the two sections (pretraining on your
data, fine-tuning) take far too long to run here: they are parsed with the command line's
own config flags (every key must exist and every value parse) and validated like a run's.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from test_convert import assert_trees_equal, keras_layers, write_h5

from transvw_jax import checkpointing, configuration, export, finetune
from transvw_jax.data import synthetic
from transvw_jax.fileio import load_module
from transvw_jax.models import abstract_variables

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
OWN_DATA = "## Use your own data"
RELEASED = "## Fine-tune the released weights on your task"


def section(heading: str) -> str:
    text = README.read_text()
    assert text.count(heading + "\n") == 1, f"README.md has no single {heading!r} section"
    body = text.split(heading + "\n", 1)[1]
    return body.split("\n## ", 1)[0]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def block_with(text: str, marker: str) -> str:
    (block,) = [b for b in bash_blocks(text) if marker in b]
    return block


def commands(block: str) -> list[list[str]]:
    """The block's commands, continuation lines joined, comments dropped, as argv lists."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


def run_block(block: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    return tmp_path


def test_the_sections_are_where_a_new_user_looks():
    text = README.read_text()
    assert text.index(OWN_DATA) < text.index(RELEASED) < text.index("## What works today")
    assert "(#convert-released-weights)" in section(RELEASED)
    assert "### Convert released weights\n" in text  # the anchor the link points to


def test_convert_block_runs_as_written(workspace):
    block = block_with(section(RELEASED), "transvw_jax.convert")
    weights = workspace / "weights"
    weights.mkdir()
    genesis = write_h5(weights / "Genesis_Chest_CT.h5", keras_layers(seed=0))
    transvw_layers = keras_layers(seed=1, head=6, final_name="final_conv", activation_name="reconst_output")
    transvw = write_h5(weights / "TransVW_chest_ct.h5", transvw_layers)
    proc = run_block(block, workspace, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wrote = [line for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == len(commands(block)) == 2, proc.stdout
    for line in wrote:
        assert re.match(r"wrote weights/\S+\.safetensors: safetensors, \d+ arrays, [\d,]+ parameters "
                        r"\(from weights/\S+\.h5\)$", line), line
    assert "warning:" in proc.stderr and "cls_output" in proc.stderr  # the TransVW head, named
    for argv in commands(block):
        source, out = (workspace / a for a in argv[3:5])
        assert source in (genesis, transvw)
        converted = export.load(out)
        assert "clc_out" not in converted["params"]  # the Keras TransVW head is left out
        assert_trees_equal(converted, export.load(source))


def readme_config(argv: list[str]):
    """The config the command line builds from `python -m transvw_jax.main ARGS`, through
    the same flag definitions (transvw_jax/main.py), with the config path taken from REPO."""
    from absl import flags
    from ml_collections import config_flags

    argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=["main", *argv])  # where the overrides are read
    values(["main", *argv])
    return values.config, values.workdir


def random_unet(config, num_classes: int):
    """Variables of the fine-tuning UNet3D without compiling an initialisation: kernels
    scaled by 1/sqrt(fan-in) (so 14 layers keep the activations finite), unit variances."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return np.ones(leaf.shape, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        return np.zeros(leaf.shape, np.float32)

    model = finetune.make_model(config, num_classes)
    return jax.tree_util.tree_map_with_path(fill, abstract_variables(model))


def test_every_main_command_of_the_two_sections_parses_and_validates():
    found = 0
    for heading in (OWN_DATA, RELEASED):
        for block in bash_blocks(section(heading)):
            for argv in commands(block):
                if argv[:3] != ["python", "-m", "transvw_jax.main"]:
                    continue
                config, workdir = readme_config(argv[3:])
                assert workdir, argv
                stages = configuration.configured_stages(config)
                if "predict" in stages:  # its input must exist: run by the test below
                    continue
                configuration.validate(config)
                found += 1
    assert found >= 4  # CT, MRI, classification, fine-tuning


@pytest.mark.slow
def test_predict_block_runs_as_written(workspace):
    block = block_with(section(RELEASED), "('predict',)")
    (argv,) = commands(block)
    config, workdir = readme_config(argv[3:])
    assert config.model.width == 32 and tuple(config.finetune.patch_shape) == (64, 64, 32)
    # The fine-tuning block's run: a checkpoint of the network the predict config builds.
    checkpointing.save(workspace / workdir / config.finetune.run_dir, 1, random_unet(config, 2))
    # The held-out set the block names.
    dataset = workspace / Path(config.predict.input).parent
    synthetic.write_labeled_dataset(workspace / "phantoms", 2, shape=(32, 32, 16), seed=1,
                                    spacing=(10.0, 10.0, 20.0))
    shutil.copytree(workspace / "phantoms" / "imagesTr", workspace / config.predict.input)
    shutil.copytree(workspace / "phantoms" / "labelsTr", workspace / config.predict.labels)
    shutil.copy(workspace / "phantoms" / "dataset.json", dataset / "dataset.json")

    proc = run_block(block, workspace, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workspace / config.predict.output
    assert "predict: 2 masks in" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["cases"]) == ["phantom_0000", "phantom_0001"]
    assert set(report["summary"]) == {"dice_class0", "dice_class1", "iou_class0", "iou_class1"}
    for name in report["cases"]:
        image = nib.load(workspace / config.predict.input / f"{name}_0000.nii.gz")
        mask = nib.load(out / "masks" / f"{name}.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine)
        assert (out / "overlays" / f"{name}.png").is_file()
    record = json.loads((out / "predict.json").read_text())
    assert record["num_classes"] == 2 and record["step"] == 1
    assert record["weights"].startswith(str(workspace / workdir / config.finetune.run_dir))


def test_default_config_is_what_the_sections_assume():
    """The README states these defaults of configs/default.py."""
    config = load_module(REPO / "configs" / "default.py").get_config()
    f = config.finetune
    assert config.model.width == 32 and tuple(f.patch_shape) == (64, 64, 32)
    assert tuple(f.load) == ("encoder", "decoder", "output") and f.normalization == "ct"
    assert (f.train.batch_size, f.train.steps, f.train.eval_every, f.train.patience) == (8, 2000, 100, 15)
    assert f.train.optimizer == "adam" and f.train.learning_rate == 1e-3 and f.val_fraction == 0.2
    d = config.discovery
    assert tuple(config.data.cube_shape) == (64, 64, 32) and tuple(d.words.border) == (100, 100, 30)
    assert d.spacing == () and d.orientation == "ras" and config.model.num_classes == 44
    assert (d.words.air_threshold, d.words.max_air_score) == (0.425, 0.15)
    assert load_module(REPO / "configs" / "demo_finetune.py").get_config().model.width == 8
