"""The stages a run executes, in the order `config.stages` lists them.

Each stage is a function (config, workdir) -> None that reads and writes only under the
workdir. `run` validates the whole config before any stage starts, so a typo fails in a
second rather than after an hour of discovery.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from transvw_jax import checkpointing, discovery, export, transforms
from transvw_jax.data import synthetic
from transvw_jax.errors import ConfigError
from transvw_jax.models import abstract_variables, build_model, init_variables

EXPORT_FORMATS = ("pt", "safetensors")


def synthesize_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write the embedded phantoms (`config.synthesize`) into `<workdir>/volumes`."""
    s = config.synthesize
    out = workdir / "volumes"
    paths = synthetic.write_phantoms(out, s.count, shape=tuple(s.shape), seed=s.seed,
                                     spacing=tuple(s.spacing), masks=s.masks)
    logging.info("synthesize: wrote %d phantoms of %s voxels to %s", len(paths), tuple(s.shape), out)


def discover_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Self-discovery: `config.discovery.volumes_dir` (default `<workdir>/volumes`) -> `<workdir>/store`."""
    discovery.discover(config, workdir)


def export_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write `<workdir>/export/transvw.{pt,safetensors}` from the latest checkpoint."""
    model = build_model(config.model)
    key = jax.random.key(config.seed)
    like = abstract_variables(model)
    restored = checkpointing.restore_variables(workdir, like)
    if restored is None:
        logging.warning("no checkpoint in %s: exporting a fresh initialisation (seed %d)",
                        checkpointing.checkpoint_dir(workdir), config.seed)
        variables = init_variables(model, key)
    else:
        step, variables = restored
        logging.info("exporting checkpoint step %d", step)
    head = config.export.head and "clc_out" in variables["params"]
    if "transforms" in config:
        try:
            transforms.validate_config(config.transforms)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for fmt in config.export.formats:
        path = workdir / "export" / f"transvw.{fmt}"
        if fmt == "pt" and not _torch_available():
            logging.warning("skipping %s: .pt export needs PyTorch "
                            "(pip install 'transvw-jax[torch]')", path)
            continue
        export.save(path, variables, head=head)
        logging.info("wrote %s", path)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


STAGES: dict[str, Callable[[ml_collections.ConfigDict, Path], None]] = {
    "synthesize": synthesize_stage,
    "discover": discover_stage,
    "export": export_stage,
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the config cheaply and early; raise ConfigError naming the key."""
    stages = config.get("stages")
    if isinstance(stages, str):
        stages = (stages,)
    if not stages:
        raise ConfigError("config.stages is empty: nothing to run")
    for name in stages:
        if name not in STAGES:
            raise ConfigError(f"config.stages: unknown stage {name!r}; known: {', '.join(STAGES)}")
    build_model(config.model)
    shape = tuple(config.data.cube_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s <= 0 or s % 8 for s in shape):
        raise ConfigError(
            f"data.cube_shape must be 3 positive sizes divisible by 8 (three 2x poolings), got {shape}"
        )
    if "transforms" in config:
        try:
            transforms.validate_config(config.transforms)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if "synthesize" in stages:
        s = config.get("synthesize")
        if s is None:
            raise ConfigError("stage synthesize needs a config.synthesize section")
        if s.count < 1 or len(s.shape) != 3 or any(n < 8 for n in s.shape):
            raise ConfigError(f"synthesize: count must be >= 1 and shape 3 sizes >= 8, got {s.count}, "
                              f"{tuple(s.shape)}")
    if "discover" in stages:
        if config.get("discovery") is None:
            raise ConfigError("stage discover needs a config.discovery section")
        discovery.validate_config(config)
    for fmt in config.export.formats:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"export.formats: unknown format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Write the resolved config (file + overrides) to `<workdir>/config.json`, atomically."""
    path = workdir / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Validate `config`, save it into `workdir`, then run its stages in order."""
    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir)
    stages = (config.stages,) if isinstance(config.stages, str) else tuple(config.stages)
    for i, name in enumerate(stages, 1):
        logging.info("stage %d/%d: %s", i, len(stages), name)
        STAGES[name](config, workdir)
