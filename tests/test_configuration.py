"""The base config (configs/default.py) and `transvw_jax.configuration.validate`: what a user
relies on when writing or overriding a config.

- a bad value fails with one ConfigError line naming the key, before any stage runs;
- every shipped config validates, and sets only keys the base defines (a typo in a config
  file would otherwise add a key nothing reads);
- every key of the base is explained by a comment;
- validating starts no JAX backend (a multi-process job joins jax.distributed after it).
"""

import ast
import io
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import ml_collections
import pytest

from transvw_jax import configuration, parallel
from transvw_jax import transforms as T
from transvw_jax.errors import ConfigError
from transvw_jax.fileio import load_module

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHIPPED = [
    ("default", None),
    ("demo", None),
    ("demo", "runlocal"),
    ("demo_finetune", None),
    ("demo_finetune", "runlocal"),
    ("luna16_transvw", None),
    ("luna16_transvw", "released"),
    ("luna16_genesis", None),
    ("luna16_genesis", "adam"),
    ("tpu_pod", None),
    ("tpu_pod", "released"),
]


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """As ml_collections' config_flags does: import the file by path, call get_config."""
    module = load_module(CONFIGS / f"{name}.py", f"config_under_test_{name}")
    return module.get_config(arg) if arg else module.get_config()


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    keys = set()
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def set_key(config: ml_collections.ConfigDict, key: str, value) -> None:
    *sections, name = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value


def pretraining_config() -> ml_collections.ConfigDict:
    """synthesize, discover, pretrain, export: every pretraining section is checked."""
    return load_config("demo", "runlocal")


def finetuning_config(pretrained: Path) -> ml_collections.ConfigDict:
    """synthesize_labeled, label_efficiency: the fine-tuning sections are checked."""
    config = load_config("demo_finetune", "runlocal")
    config.finetune.pretrained = str(pretrained)
    return config


# One bad value per check family: (key, value, what the one-line error must say).
PRETRAINING_ERRORS = [
    ("stages", ("pretrain", "fine_tune"), "config.stages: unknown stage 'fine_tune'"),
    ("stages", (), "config.stages is empty"),
    ("model.name", "vnet", "model.name: unknown model 'vnet'"),
    ("model.width", 0, "model.width must be a positive integer"),
    ("model.dtype", "float16", "model.dtype must be one of"),
    ("model.conv_impl", "cudnn", "model.conv_impl must be one of"),
    ("data.cube_shape", (64, 64, 30), "data.cube_shape must be 3 positive sizes divisible by 8"),
    ("data.source", "s3", "data.source: 's3' is not 'store' or 'released'"),
    ("data.store_dir", "gs://bucket/store", "config.data.store_dir=gs://bucket/store: cloud-storage URLs"),
    ("train.objective", "simclr", "train.objective: 'simclr' is not one of transvw, genesis"),
    ("train.optimizer", "lamb", "train.optimizer: 'lamb' is not one of adam, sgd"),
    ("train.steps", 0, "train.steps must be >= 1"),
    ("train.learning_rate", 0.0, "train.learning_rate must be > 0"),
    ("train.lr_scaling", "cube", "train.lr_scaling: 'cube' is not one of none, sqrt, linear"),
    ("train.schedule_unit", "hours", "train.schedule_unit: 'hours' is not one of steps, epochs"),
    ("transforms.nonlinear.prob", 1.5, "transforms.nonlinear.prob must be a probability in [0, 1]"),
    ("transforms.elastic.impl", "cuda", "transforms.elastic.impl: 'cuda' is not one of auto, xla, native"),
    ("transforms.batch_chunk", -2, "transforms.batch_chunk must be -1 (auto)"),
    ("parallel.distributed", "mpi", "parallel.distributed: 'mpi' is not one of"),
    ("parallel.heartbeat_timeout_s", 0, "parallel.heartbeat_timeout_s must be >= 1"),
    ("synthesize.count", 0, "synthesize: count must be >= 1"),
    ("discovery.mode", "grid", "discovery.mode: 'grid' is not one of visual_words, random"),
    ("discovery.autoencoder.batch_size", 0, "discovery.autoencoder.batch_size must be >= 1"),
    ("discovery.autoencoder.log_every", 0, "discovery.autoencoder.log_every must be >= 1"),
    ("discovery.autoencoder.checkpoint_every", 0, "discovery.autoencoder.checkpoint_every must be >= 1"),
    ("discovery.autoencoder.keep_checkpoints", 0, "discovery.autoencoder.keep_checkpoints must be >= 1"),
    ("discovery.words.extra_size", (40, 25), "discovery.words.extra_size must be (low, high)"),
    ("discovery.store.dtype", "int8", "discovery.store.dtype: 'int8' is not one of uint16, float16, float32"),
    ("export.formats", ("onnx",), "export.formats: unknown format 'onnx'"),
]
FINETUNING_ERRORS = [
    ("finetune.task", "detection", "finetune.task: 'detection' is not one of"),
    ("finetune.load", ("encoder", "neck"), "finetune.load: unknown part 'neck'"),
    ("finetune.label_fraction", 0.0, "finetune.label_fraction must be in (0, 1]"),
    ("finetune.patch_shape", (16, 16, 12), "finetune.patch_shape must be 3 positive sizes divisible by 8"),
    ("finetune.inference.blending", "max", "finetune.inference.blending: 'max' is not one of"),
    ("finetune.train.batch_size", 0, "finetune.train.batch_size must be >= 1"),
    ("experiment.inits", ("imagenet",), "experiment.inits: 'imagenet' is not one of"),
    ("experiment.metric", "f1", "experiment.metric: 'f1' is not one of"),
    ("finetune.pretrained", "no/such/run", "finetune.pretrained=no/such/run: no such pretraining workdir"),
]


def assert_one_line_error(config: ml_collections.ConfigDict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        configuration.validate(config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key, value, message", PRETRAINING_ERRORS,
                         ids=[f"{k}={v!r}" for k, v, _ in PRETRAINING_ERRORS])
def test_a_bad_pretraining_value_names_its_key(key, value, message):
    config = pretraining_config()
    configuration.validate(config)
    set_key(config, key, value)
    assert_one_line_error(config, message)


@pytest.mark.parametrize("key, value, message", FINETUNING_ERRORS,
                         ids=[f"{k}={v!r}" for k, v, _ in FINETUNING_ERRORS])
def test_a_bad_finetuning_value_names_its_key(tmp_path, key, value, message):
    config = finetuning_config(tmp_path)
    configuration.validate(config)
    set_key(config, key, value)
    assert_one_line_error(config, message)


def test_only_the_sections_of_the_configured_stages_are_checked(tmp_path):
    config = finetuning_config(tmp_path)  # no discover, no pretrain stage
    config.discovery.mode = "grid"
    config.train.optimizer = "lamb"
    configuration.validate(config)
    config.stages = ("discover",)
    assert_one_line_error(config, "discovery.mode")


def test_a_missing_section_names_the_stage_that_needs_it():
    config = pretraining_config()
    del config.train
    assert_one_line_error(config, "stage pretrain needs a config.train section")


@pytest.mark.parametrize("name, arg", SHIPPED, ids=[f"{n}:{a}" if a else n for n, a in SHIPPED])
def test_every_shipped_config_validates_and_sets_only_known_keys(tmp_path, name, arg):
    config = load_config(name, arg)
    if "label_efficiency" in config.stages:  # its pretrained weights come from the demo's run
        config.finetune.pretrained = str(tmp_path)
    configuration.validate(config)
    unknown = leaf_keys(config) - leaf_keys(load_config("default"))
    assert not unknown, f"configs/{name}.py sets keys configs/default.py does not define: {sorted(unknown)}"


def test_configs_load_from_another_directory(tmp_path, monkeypatch):
    """config_flags loads a file by path from the user's directory: the base must still be found."""
    monkeypatch.chdir(tmp_path)
    for name, arg in SHIPPED:
        assert load_config(name, arg).seed == 0


def test_every_key_of_the_base_has_a_comment():
    """Each `section.key = value` line carries a comment, or follows a comment line."""
    source = (CONFIGS / "default.py").read_text()
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                 if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    comment_lines = {i for i, line in enumerate(lines, 1) if line.lstrip().startswith("#")}
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) for t in node.targets):
            on_the_line = commented & set(range(node.lineno, node.end_lineno + 1))
            if not on_the_line and node.lineno - 1 not in comment_lines:
                missing.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "keys without a comment in configs/default.py:\n" + "\n".join(missing)


def test_the_library_defaults_are_the_base_configs():
    """configs/default.py holds TransVW's policy and configs/luna16_genesis.py Models Genesis';
    the library's `transforms.default_config(policy)` and `parallel.default_config()` (used
    when a config has no such section) must give the same values."""
    base = load_config("default")
    assert base.transforms.to_dict() == T.default_config("transvw").to_dict()
    assert load_config("luna16_genesis").transforms.to_dict() == T.default_config("genesis").to_dict()
    assert base.parallel.to_dict() == parallel.default_config().to_dict()


def test_transforms_validate_config_keeps_raising_value_error():
    cfg = T.default_config("genesis")
    cfg.paint.inpaint_prob = 2.0
    with pytest.raises(ValueError, match="transforms.paint.inpaint_prob"):
        T.validate_config(cfg)


def test_validate_starts_no_backend():
    """With no usable JAX platform, anything that starts a backend would raise."""
    code = (
        "from jax._src import xla_bridge\n"
        "from transvw_jax import configuration\n"
        "from transvw_jax.fileio import load_module\n"
        f"for name, arg in {[s for s in SHIPPED if s[0] != 'demo_finetune']!r}:\n"
        f"    m = load_module({str(CONFIGS)!r} + f'/{{name}}.py')\n"
        "    configuration.validate(m.get_config(arg) if arg else m.get_config())\n"
        "assert not xla_bridge._backends, xla_bridge._backends\n"
        "print('no backend')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "nonexistent"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no backend" in proc.stdout
