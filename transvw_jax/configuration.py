"""Every check of a run's config, in one place, and the names the checks allow.

`validate(config)` runs before any stage, so a typo fails in a second rather than after an
hour of discovery. It checks only the sections the configured stages read (a fine-tuning
config needs no discovery section), raises `ConfigError` with one line naming the key,
and has no side effects: it starts no JAX backend and no compiler (a multi-process job
joins `jax.distributed` after it, and that must come before any backend). Whether an
explicit choice can run on this machine (a native kernel, oneDNN) is decided later, with
the platform, by `transvw_jax.resolve`.

The allowed values (OBJECTIVES, OPTIMIZERS, TASKS, ...) are defined here so that the
modules that act on them import them from here. configs/default.py holds every key with
its default and meaning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from transvw_jax.data import store, volumes
from transvw_jax.errors import ConfigError
from transvw_jax.models.layers import BN_MODES, CONV_IMPLS
from transvw_jax.transforms.elastic import ELASTIC_IMPLS

# --------------------------------------------------------------------------- allowed values

# config.stages, in the order a full pipeline runs them (transvw_jax/stages.py).
STAGE_NAMES = ("synthesize", "synthesize_labeled", "discover", "pretrain", "export", "finetune",
               "label_efficiency", "predict")
# Fewer labeled phantoms cannot be split into training and validation cases.
SYNTHESIS_MIN_COUNT = {"synthesize": 1, "synthesize_labeled": 2}

MODEL_NAMES = ("unet3d", "ynet3d", "encoder_classifier")
MODEL_DTYPES = ("float32", "bfloat16")
UNET_ACTIVATIONS = ("sigmoid", "none")

DATA_SOURCES = ("store", "released")
OBJECTIVES = {"transvw": "ynet3d", "genesis": "unet3d"}  # train.objective -> the model it trains
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "cosine")
SCHEDULE_UNITS = ("steps", "epochs")
LR_SCALINGS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # train.lr_scaling: exponent of the batch ratio
# The cadence and size keys of a training loop (pretraining's train, finetune.train).
LOOP_POSITIVE_KEYS = ("batch_size", "steps", "log_every", "eval_every", "checkpoint_every",
                      "keep_checkpoints", "decay_every")

DISTRIBUTED_MODES = ("auto", "off", "explicit", "environment")

DISCOVERY_MODES = ("visual_words", "random")
AUTOENCODER_POSITIVE_KEYS = ("width", "steps", "batch_size", "log_every", "checkpoint_every",
                             "keep_checkpoints")

POLICIES = ("genesis", "transvw")
TRANSFORM_PROBABILITIES = ("flip.prob", "local_shuffle.prob", "nonlinear.prob", "paint.prob",
                           "paint.inpaint_prob")
TRANSFORM_COUNTS = ("local_shuffle.num_blocks", "in_paint.max_blocks", "out_paint.max_extra_blocks",
                    "flip.max_flips")

EXPORT_FORMATS = ("pt", "safetensors")

TASKS = ("segmentation", "classification")
INITS = ("scratch", "pretrained")
# finetune.load parts -> the parameter-name prefix each covers.
PARTS = {"encoder": "down_tr", "decoder": "up_tr", "output": "out_tr", "head": "clc_out"}
NORMALIZATIONS = ("ct", "percentile")  # finetune.normalization: cached patches are stored in [0, 1]
BLENDINGS = ("gaussian", "constant")  # finetune.inference.blending
EXPERIMENT_METRICS = {"segmentation": ("dice_class1", "iou_class1"), "classification": ("auc", "accuracy")}

# Every path is read and written as a local path: a gs:// URL would silently become a
# local folder named "gs:".
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PATH_KEYS = ("data.store_dir", "data.released_dir", "discovery.volumes_dir", "finetune.dataset_dir",
             "finetune.images_dir", "finetune.labels_dir", "finetune.pretrained")


# --------------------------------------------------------------------------- the whole config


def validate(config: ml_collections.ConfigDict, stages: tuple[str, ...] | None = None) -> None:
    """Check `config` for the stages it lists (or `stages`: what a function behind one stage,
    called directly, needs); raise ConfigError naming the first bad key.

    Pure: reads the config (and, for label_efficiency, whether finetune.pretrained exists),
    starts no JAX backend and no compiler."""
    stages = configured_stages(config) if stages is None else stages
    validate_model(config.model)
    _check_cube_shape(config.data.cube_shape, "data.cube_shape")
    if "transforms" in config:
        validate_transforms(config.transforms)
    if "parallel" in config:
        _check_parallel(config.parallel)
    for name in SYNTHESIS_MIN_COUNT:
        if name in stages:
            _check_synthesis(config, name)
    if "pretrain" in stages:
        _check_pretraining(config)
    if "finetune" in stages or "label_efficiency" in stages:
        _check_finetune(config)
    if "label_efficiency" in stages:
        _check_experiment(config)
    if "predict" in stages:
        # Inputs an earlier stage of this run may write are checked when predict starts.
        _check_predict(config, paths_exist=stages.index("predict") == 0)
    if "discover" in stages:
        _check_discovery(config)
    _check_paths(config)
    for fmt in config.get("export", {}).get("formats", ()):
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"export.formats: unknown format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")


def configured_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.stages as a tuple of known stage names (a single name is accepted too)."""
    stages = config.get("stages")
    if isinstance(stages, str):
        stages = (stages,)
    if not stages:
        raise ConfigError("config.stages is empty: nothing to run")
    for name in stages:
        if name not in STAGE_NAMES:
            raise ConfigError(f"config.stages: unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}")
    return tuple(stages)


def _section(config: ml_collections.ConfigDict, name: str, stage: str) -> ml_collections.ConfigDict:
    section = config.get(name)
    if section is None:
        raise ConfigError(f"stage {stage} needs a config.{name} section")
    return section


def _one_of(value: Any, allowed: Any, key: str) -> None:
    """The usual "<key>: 'x' is not one of a, b" line."""
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _check_cube_shape(shape: Any, key: str) -> None:
    shape = tuple(shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s <= 0 or s % 8 for s in shape):
        raise ConfigError(f"{key} must be 3 positive sizes divisible by 8 (three 2x poolings), got {shape}")


# --------------------------------------------------------------------------- model


def _positive_int(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def validate_model(cfg: Mapping[str, Any]) -> None:
    """A `config.model` section; missing keys take the model's defaults (as build_model)."""
    name = cfg.get("name", "ynet3d")
    if name not in MODEL_NAMES:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {sorted(MODEL_NAMES)}")
    _positive_int(cfg.get("width", 32), "model.width")
    bn = cfg.get("bn", "reference")
    if bn not in BN_MODES:
        raise ConfigError(f"model.bn must be one of {list(BN_MODES)}, got {bn!r}")
    dtype = cfg.get("dtype", "float32")
    if dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(MODEL_DTYPES)}, got {dtype!r}")
    conv_impl = cfg.get("conv_impl", "auto")
    if conv_impl not in ("auto", *CONV_IMPLS):
        raise ConfigError(f"model.conv_impl must be one of {['auto', *CONV_IMPLS]}, got {conv_impl!r}")
    if name == "unet3d":
        _positive_int(cfg.get("out_channels", 1), "model.out_channels")
        activation = cfg.get("activation", "sigmoid")
        if activation not in UNET_ACTIVATIONS:
            raise ConfigError(f"model.activation must be 'sigmoid' or 'none', got {activation!r}")
    else:
        _positive_int(cfg.get("num_classes", 44), "model.num_classes")


# --------------------------------------------------------------------------- transforms


def validate_transforms(cfg: ml_collections.ConfigDict) -> None:
    """A `config.transforms` section. Pure: whether elastic impl "native" can run here is
    decided with the platform (`transvw_jax.resolve`), not here."""
    if cfg.policy not in POLICIES:
        raise ConfigError(f"transforms.policy: unknown policy {cfg.policy!r}; known: {', '.join(POLICIES)}")
    weights = np.asarray(cfg.choice_weights, np.float64)
    if weights.shape != (4,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ConfigError(f"transforms.choice_weights must be 4 non-negative weights, not all 0; "
                          f"got {tuple(cfg.choice_weights)}")
    for name in TRANSFORM_PROBABILITIES:
        section, field = name.split(".")
        value = cfg[section][field]
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"transforms.{name} must be a probability in [0, 1], got {value!r}")
    for name in TRANSFORM_COUNTS:
        section, field = name.split(".")
        value = cfg[section][field]
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"transforms.{name} must be a non-negative integer, got {value!r}")
    chunk = cfg.get("batch_chunk", -1)
    if not isinstance(chunk, int) or chunk < -1:
        raise ConfigError(f"transforms.batch_chunk must be -1 (auto), 0 (whole batch) or a positive "
                          f"number of cubes, got {chunk!r}")
    if cfg.in_paint.max_blocks < 1:
        raise ConfigError("transforms.in_paint.max_blocks must be at least 1")
    impl = cfg.elastic.get("impl", "auto")
    if impl not in ELASTIC_IMPLS:
        raise ConfigError(f"transforms.elastic.impl: {impl!r} is not one of {', '.join(ELASTIC_IMPLS)}")


# --------------------------------------------------------------------------- parallel


def _check_parallel(p: ml_collections.ConfigDict) -> None:
    """The values `parallel.initialize` acts on, checked before it joins a job."""
    _one_of(p.get("distributed", "auto"), DISTRIBUTED_MODES, "parallel.distributed")
    heartbeat = int(p.get("heartbeat_timeout_s", 60))
    if heartbeat < 1:
        raise ConfigError(f"parallel.heartbeat_timeout_s must be >= 1, got {heartbeat}")
    if int(p.get("fsdp", 1)) < 1:
        raise ConfigError(f"parallel.fsdp must be >= 1, got {p.fsdp}")
    if p.get("distributed") == "explicit" and (
        not p.coordinator_address or p.num_processes < 1 or not 0 <= p.process_id < p.num_processes
    ):
        raise ConfigError(
            "parallel.distributed='explicit' needs parallel.coordinator_address (host:port), "
            "parallel.num_processes >= 1 and 0 <= parallel.process_id < num_processes"
        )


# --------------------------------------------------------------------------- synthesis


def _check_synthesis(config: ml_collections.ConfigDict, name: str) -> None:
    s = _section(config, name, name)
    min_count = SYNTHESIS_MIN_COUNT[name]
    if s.count < min_count or len(s.shape) != 3 or any(n < 8 for n in s.shape):
        raise ConfigError(f"{name}: count must be >= {min_count} and shape 3 sizes >= 8, got {s.count}, "
                          f"{tuple(s.shape)}")


# --------------------------------------------------------------------------- pretraining


def _check_pretraining(config: ml_collections.ConfigDict) -> None:
    t = _section(config, "train", "pretrain")
    _one_of(t.objective, OBJECTIVES, "train.objective")
    if config.model.name != OBJECTIVES[t.objective]:
        raise ConfigError(
            f"train.objective={t.objective!r} trains model.name={OBJECTIVES[t.objective]!r}, "
            f"the config has {config.model.name!r}"
        )
    policy = _section(config, "transforms", "pretrain").policy
    if policy != t.objective:  # allowed (an ablation), but more often a forgotten override
        logging.warning("train.objective=%s with transforms.policy=%s", t.objective, policy)
    validate_loop(t, "train")
    _one_of(t.get("schedule_unit", "steps"), SCHEDULE_UNITS, "train.schedule_unit")
    if config.data.get("released_classes", 0) < 0:
        raise ConfigError(f"data.released_classes must be >= 0 (0 = all), got {config.data.released_classes}")
    if t.lambda_rec < 0 or t.lambda_cls < 0:
        raise ConfigError("train.lambda_rec and train.lambda_cls must be >= 0")
    if config.data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source: {config.data.source!r} is not 'store' or 'released'")


def validate_loop(t: ml_collections.ConfigDict, section: str) -> None:
    """The optimiser, schedule and cadence keys a training loop reads, named as
    `<section>.<key>` in errors (pretraining's `train`, fine-tuning's `finetune.train`)."""
    _one_of(t.optimizer, OPTIMIZERS, f"{section}.optimizer")
    _one_of(t.schedule, SCHEDULES, f"{section}.schedule")
    for key in LOOP_POSITIVE_KEYS:
        if int(t[key]) < 1:
            raise ConfigError(f"{section}.{key} must be >= 1, got {t[key]}")
    if not t.learning_rate > 0:
        raise ConfigError(f"{section}.learning_rate must be > 0, got {t.learning_rate}")
    # .get: configs written before these keys existed still load.
    _one_of(t.get("lr_scaling", "none"), LR_SCALINGS, f"{section}.lr_scaling")
    if int(t.get("reference_batch_size", 64)) < 1:
        raise ConfigError(f"{section}.reference_batch_size must be >= 1, got {t.reference_batch_size}")


# --------------------------------------------------------------------------- fine-tuning


def _check_finetune(config: ml_collections.ConfigDict) -> None:
    f = _section(config, "finetune", "finetune")
    _one_of(f.task, TASKS, "finetune.task")
    _one_of(f.init, INITS, "finetune.init")
    _check_load(f)
    if f.task == "classification" and not f.candidates_csv:
        raise ConfigError("finetune.candidates_csv is empty: classification needs volume,x,y,z,label rows")
    if f.normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"finetune.normalization: {f.normalization!r} is not one of {', '.join(NORMALIZATIONS)} "
            "(fine-tuning patches are cached in [0, 1])"
        )
    _one_of(f.orientation, volumes.ORIENTATIONS, "finetune.orientation")
    if not 0.0 < f.label_fraction <= 1.0:
        raise ConfigError(f"finetune.label_fraction must be in (0, 1], got {f.label_fraction}")
    if not 0.0 < f.val_fraction < 1.0:
        raise ConfigError(f"finetune.val_fraction must be in (0, 1), got {f.val_fraction}")
    if not 0.0 <= f.foreground_fraction <= 1.0:
        raise ConfigError(f"finetune.foreground_fraction must be in [0, 1], got {f.foreground_fraction}")
    shape = tuple(f.patch_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s <= 0 or s % 8 for s in shape):
        raise ConfigError(f"finetune.patch_shape must be 3 positive sizes divisible by 8, got {shape}")
    if "inference" in f:
        _check_inference(f.inference)
    validate_loop(f.train, "finetune.train")


def _check_load(f: ml_collections.ConfigDict) -> None:
    """finetune.load names parts the task's model has; a frozen encoder must be a loaded one."""
    for part in f.load:
        if part not in PARTS:
            raise ConfigError(f"finetune.load: unknown part {part!r}; known: {', '.join(PARTS)}")
    if f.task == "classification" and set(f.load) & {"decoder", "output"}:
        raise ConfigError(
            "finetune.load: the classification model has no decoder or output; "
            "use ('encoder',) or ('encoder', 'head')"
        )
    if f.task == "segmentation" and "head" in f.load:
        raise ConfigError("finetune.load: the segmentation model has no visual-word head")
    if f.freeze_encoder and (f.init != "pretrained" or "encoder" not in f.load):
        raise ConfigError(
            "finetune.freeze_encoder=True needs init='pretrained' with 'encoder' in finetune.load "
            "(else it freezes a random encoder)"
        )


def _check_inference(i: ml_collections.ConfigDict) -> None:
    """Sliding-window inference runs after training: a bad value would fail only then."""
    if not 0.0 <= i.overlap < 1.0:
        raise ConfigError(f"finetune.inference.overlap must be in [0, 1), got {i.overlap}")
    if int(i.batch_size) < 1:
        raise ConfigError(f"finetune.inference.batch_size must be >= 1, got {i.batch_size}")
    _one_of(i.blending, BLENDINGS, "finetune.inference.blending")


def _check_experiment(config: ml_collections.ConfigDict) -> None:
    """Every grid point's values, the metric, and that pretrained weights exist when an
    init needs them: before hours of runs."""
    e = _section(config, "experiment", "label_efficiency")
    if not e.label_fractions or not e.inits or not e.seeds:
        raise ConfigError("experiment.label_fractions, experiment.inits and experiment.seeds must be "
                          "non-empty")
    for init in e.inits:
        _one_of(init, INITS, "experiment.inits")
    for fraction in e.label_fractions:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"experiment.label_fractions: {fraction} is not in (0, 1]")
    known = EXPERIMENT_METRICS[config.finetune.task]
    if e.metric and e.metric not in known and not e.metric.startswith(("dice_class", "iou_class")):
        raise ConfigError(f"experiment.metric: {e.metric!r} is not one of {', '.join(known)}")
    pretrained = config.finetune.pretrained
    if "pretrained" in e.inits and pretrained and not Path(pretrained).exists():
        raise ConfigError(f"finetune.pretrained={pretrained}: no such pretraining workdir or weights file "
                          "(relative paths are from the current directory)")


# --------------------------------------------------------------------------- prediction


def _check_predict(config: ml_collections.ConfigDict, paths_exist: bool = True) -> None:
    """The predict stage's inputs exist (with `paths_exist`), and the fine-tuning keys it
    repeats (how data is read, the patch, sliding windows) are valid: before any weights
    are loaded. Whether the weights exist is checked by the stage, which knows the workdir."""
    p = _section(config, "predict", "predict")
    f = _section(config, "finetune", "predict")
    _one_of(f.task, TASKS, "finetune.task")
    _one_of(f.normalization, NORMALIZATIONS, "finetune.normalization")
    _one_of(f.orientation, volumes.ORIENTATIONS, "finetune.orientation")
    shape = tuple(f.patch_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s <= 0 or s % 8 for s in shape):
        raise ConfigError(f"finetune.patch_shape must be 3 positive sizes divisible by 8, got {shape}")
    if "inference" in f:
        _check_inference(f.inference)
    refuse_urls({f"config.predict.{k}": p[k] for k in ("input", "output", "weights", "labels") if p[k]})
    what = "a candidates CSV (volume,x,y,z[,label])" if f.task == "classification" else \
        "a folder of volumes (or an nnU-Net imagesTs folder) or one volume"
    if not p.input:
        raise ConfigError(f"predict.input is empty: name {what} to predict")
    if not paths_exist:
        return
    source = Path(p.input)
    if not source.exists():
        raise ConfigError(f"predict.input={p.input}: no such file or directory (expected {what})")
    if f.task == "classification":
        if not source.is_file():
            raise ConfigError(f"predict.input={p.input}: not a file (expected {what})")
        if p.labels:
            raise ConfigError("predict.labels is for segmentation; classification reads the labels from "
                              "the label column of predict.input")
    elif p.labels and not Path(p.labels).is_dir():
        raise ConfigError(f"predict.labels={p.labels}: no such directory of label maps")
    if p.weights and not Path(p.weights).exists():
        raise ConfigError(f"predict.weights={p.weights}: no such fine-tuning run directory or weights file")
    if p.output and Path(p.output).is_file():
        raise ConfigError(f"predict.output={p.output}: a file, not a directory")


# --------------------------------------------------------------------------- discovery


def _check_discovery(config: ml_collections.ConfigDict) -> None:
    d = _section(config, "discovery", "discover")
    _one_of(d.mode, DISCOVERY_MODES, "discovery.mode")
    if d.words.random_cubes_per_patient < 1:
        raise ConfigError("discovery.words.random_cubes_per_patient must be >= 1")
    _one_of(d.normalization, volumes.NORMALIZATIONS, "discovery.normalization")
    if d.spacing and (len(d.spacing) != 3 or any(s <= 0 for s in d.spacing)):
        raise ConfigError(f"discovery.spacing must be () or 3 positive sizes in mm, got {tuple(d.spacing)}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"discovery.val_fraction must be in [0, 1), got {d.val_fraction}")
    _one_of(d.orientation, volumes.ORIENTATIONS, "discovery.orientation")
    _check_subsets(d)
    _check_autoencoder(d.autoencoder)
    _check_words(d.words)
    _one_of(d.store.dtype, store.CUBE_DTYPES, "discovery.store.dtype")
    if d.store.records_per_shard < 1:
        raise ConfigError("discovery.store.records_per_shard must be >= 1")


def _check_subsets(d: ml_collections.ConfigDict) -> None:
    """The subset keys: whole numbers, no subset in both splits, a pattern with one {}."""
    for key in ("train_subsets", "val_subsets"):
        numbers = tuple(d[key])
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in numbers):
            raise ConfigError(f"discovery.{key} must be subset numbers >= 0, got {numbers}")
        if len(set(numbers)) != len(numbers):
            raise ConfigError(f"discovery.{key} names a subset twice: {numbers}")
    both = sorted(set(d.train_subsets) & set(d.val_subsets))
    if both:
        raise ConfigError(f"discovery.val_subsets: subset {both[0]} is also in discovery.train_subsets")
    if d.val_subsets and not d.train_subsets:
        raise ConfigError("discovery.train_subsets is empty but discovery.val_subsets is not: "
                          "name the training subsets too")
    if d.subset_pattern.count("{}") != 1 or "/" in d.subset_pattern:
        raise ConfigError(f"discovery.subset_pattern must be one folder name holding {{}} once "
                          f"(the subset number), got {d.subset_pattern!r}")


def _check_autoencoder(a: ml_collections.ConfigDict) -> None:
    size = tuple(a.size)
    if len(size) != 3 or any(s <= 0 or s % 8 for s in size):
        raise ConfigError(f"discovery.autoencoder.size must be 3 sizes divisible by 8, got {size}")
    for key in AUTOENCODER_POSITIVE_KEYS:
        value = a.get(key, 1)  # .get: configs from before log_every / checkpoint_every / keep_checkpoints
        if value < 1:
            raise ConfigError(f"discovery.autoencoder.{key} must be >= 1, got {value}")


def _check_words(w: ml_collections.ConfigDict) -> None:
    if w.train_instances < 1 or w.val_instances < 0:
        raise ConfigError("discovery.words.train_instances must be >= 1 and val_instances >= 0")
    if len(w.border) != 3 or any(b < 0 for b in w.border):
        raise ConfigError(f"discovery.words.border must be 3 sizes >= 0, got {tuple(w.border)}")
    if w.max_tries < 1:
        raise ConfigError(f"discovery.words.max_tries must be >= 1, got {w.max_tries}")
    for key in ("extra_size", "extra_offset"):
        lo_hi = tuple(w[key])
        if len(lo_hi) != 2 or lo_hi[0] >= lo_hi[1]:
            raise ConfigError(f"discovery.words.{key} must be (low, high) with low < high, got {lo_hi}")
    if w.extra_size[0] < 1:
        raise ConfigError(f"discovery.words.extra_size must be positive, got {tuple(w.extra_size)}")


# --------------------------------------------------------------------------- paths


def refuse_urls(paths: Mapping[str, str]) -> None:
    """Refuse a cloud-storage URL given as a path (`{name: value}`), with one line naming it."""
    for name, value in paths.items():
        if URL.match(value):
            raise ConfigError(f"{name}={value}: cloud-storage URLs are not supported; mount the bucket "
                              f"(e.g. gcsfuse) and give its local path")


def _check_paths(config: ml_collections.ConfigDict) -> None:
    found = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = config.get(section, {}).get(name) if section in config else None
        if isinstance(value, str) and value:
            found[f"config.{key}"] = value
    refuse_urls(found)
