"""Every automatic choice of a config, made once, after the processes joined.

Config validation (`stages.validate`) only checks values: it never starts a JAX backend
or a compiler, because in a multi-process job `jax.distributed.initialize` must come
before anything touches a backend. The choices that depend on the hardware ("auto"
values) are made here instead, from the mesh that will run the training step, written
back into the config (so `<workdir>/config.json` shows what ran) and logged in one line
with the reason for each.

A resumed run keeps what it recorded: when the workdir's `config.json` holds a resolved
value for a key that is still automatic in the new config, that value is used again (the
convolution forms agree only to rounding, so a different choice would break a
bit-identical resume) unless it cannot run on this platform, which is logged. An
explicit value in the new config always wins.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections

from transvw_jax import native
from transvw_jax.errors import ConfigError

AUTO_CONV = "auto"


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the automatic choices depend on: the backend and size of the step's mesh,
    and whether the native CPU kernels can run (None = usable, else the reason)."""

    backend: str  # "cpu", "gpu", "tpu"
    devices: int  # devices of the mesh that runs the step (all processes)
    processes: int
    onednn: str | None = None
    native_elastic: str | None = None

    @classmethod
    def describe(cls, backend: str, devices: int) -> Platform:
        """`devices` of `backend`; on the CPU backend this builds the native kernels (first
        use compiles them with g++, a few seconds, cached)."""
        backend = "gpu" if backend in ("cuda", "rocm") else backend
        onednn = elastic = "not the CPU backend"
        if backend == "cpu":
            onednn, elastic = native.unavailable_reason(), native.elastic_unavailable_reason()
        return cls(backend=backend, devices=devices, processes=jax.process_count(), onednn=onednn,
                   native_elastic=elastic)

    @classmethod
    def of_mesh(cls, mesh: jax.sharding.Mesh) -> Platform:
        """The devices of the mesh that runs the step."""
        devices = list(mesh.devices.flat)
        return cls.describe(devices[0].platform, len(devices))

    @classmethod
    def current(cls, backend: str | None = None) -> Platform:
        """Every device of the default backend: what a library caller that passes "auto"
        outside the command gets; `backend` overrides its name."""
        return cls.describe(backend or jax.default_backend(), jax.device_count())


@functools.cache
def _warn_no_onednn(reason: str) -> None:
    """The one line (per process and reason) saying "auto" lost the fast CPU path: every
    model built and every resolve would otherwise repeat it. `reason` names the fix."""
    logging.warning("model.conv_impl=auto: the oneDNN convolution cannot run here, so the CPU "
                    "convolutions take the slower matmul form: %s", reason)


def choose_conv_impl(value: str, p: Platform) -> tuple[str, str]:
    """(model.conv_impl for `p`, why); ConfigError when an explicit choice cannot run.
    "auto" without oneDNN on one CPU device logs why, once per process (the fix included)."""
    if value == "onednn" and p.onednn:
        raise ConfigError(f"model.conv_impl: 'onednn' cannot run here: {p.onednn}")
    if value != AUTO_CONV:
        return value, "as configured"
    if p.backend != "cpu":
        return "xla3d", f"{p.backend}: XLA's convolution (cuDNN / the TPU compiler)"
    if p.devices > 1:
        return "matmul", (f"{p.devices} CPU devices: XLA cannot split oneDNN's custom call along the "
                          "sharded batch")
    if p.onednn:
        _warn_no_onednn(p.onednn)
        return "matmul", "oneDNN unavailable, see the warning"
    return "onednn", "one CPU device with oneDNN"


def choose_elastic_impl(value: str, p: Platform, cube_shape: tuple[int, ...],
                        sigma: float) -> tuple[str, str]:
    """(transforms.elastic.impl for `p` and the cube, why); ConfigError when an explicit
    choice cannot run."""
    from transvw_jax.transforms.elastic import NATIVE_MAX_RANK, native_fits

    if value == "native":
        if p.backend != "cpu":
            raise ConfigError(f"transforms.elastic.impl: 'native' runs on the CPU backend, not {p.backend}")
        if p.native_elastic:
            raise ConfigError(f"transforms.elastic.impl: 'native' cannot run here: {p.native_elastic}")
        if not native_fits(cube_shape, sigma):
            raise ConfigError(f"transforms.elastic.impl: 'native' handles smoothing ranks <= "
                              f"{NATIVE_MAX_RANK}; cube {cube_shape} with sigma {sigma} needs more "
                              "(use 'xla')")
    if value != "auto":
        return value, "as configured"
    if p.backend != "cpu":
        return "xla", f"{p.backend}"
    if p.devices > 1:
        return "xla", f"{p.devices} CPU devices: a custom call would gather the sharded batch"
    if p.native_elastic:
        return "xla", f"native kernel unavailable: {p.native_elastic}"
    if not native_fits(cube_shape, sigma):
        return "xla", f"cube {cube_shape} needs more smoothing ranks than the native kernel has"
    return "native", "one CPU device"


def _batch_chunk(value: int, p: Platform, policy: str) -> tuple[int, str]:
    from transvw_jax import transforms

    if value != -1:
        return value, "as configured"
    chunk = transforms.CPU_BATCH_CHUNK.get(policy, 0) if p.backend == "cpu" else 0
    return chunk, "the whole batch in one vmap" if chunk == 0 else f"{chunk} cubes per chunk on the CPU"


@dataclasses.dataclass(frozen=True)
class _Choice:
    key: str  # dotted config key
    is_auto: Callable[[Any], bool]
    decide: Callable[[Any, Platform, ml_collections.ConfigDict], tuple[Any, str]]


def _has(config: ml_collections.ConfigDict, key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node: Any = config
    for part in parents:
        node = node[part]
    node[last] = value


CHOICES = (
    _Choice("model.conv_impl", lambda v: v == AUTO_CONV, lambda v, p, c: choose_conv_impl(v, p)),
    _Choice("transforms.elastic.impl", lambda v: v == "auto",
            lambda v, p, c: choose_elastic_impl(v, p, tuple(c.data.cube_shape),
                                                float(c.transforms.elastic.sigma))),
    _Choice("transforms.batch_chunk", lambda v: v == -1,
            lambda v, p, c: _batch_chunk(v, p, c.transforms.get("policy", "transvw"))),
)


def recorded_values(workdir: str | Path) -> dict[str, Any]:
    """The resolved values a previous run wrote into `<workdir>/config.json` (empty when
    there is none or it cannot be read: a fresh run)."""
    path = Path(workdir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for choice in CHOICES:
        node: Any = saved
        for part in choice.key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not choice.is_auto(node):
            out[choice.key] = node
    return out


def resolve(config: ml_collections.ConfigDict, platform: Platform,
            recorded: dict[str, Any] | None = None) -> list[str]:
    """Replace every automatic value of `config` (in place) for `platform`; returns one
    "key=value (why)" phrase per choice. `recorded`: a previous run's resolved values
    (`recorded_values`), reused where the key is still automatic and the value can run.

    Raises:
      ConfigError naming the key when an explicit choice cannot run on this platform.
    """
    recorded = recorded or {}
    phrases = []
    for choice in CHOICES:
        if not _has(config, choice.key):
            continue
        value = _get(config, choice.key)
        why = None
        if choice.is_auto(value) and choice.key in recorded:
            try:
                chosen, _ = choice.decide(recorded[choice.key], platform, config)
                why = "recorded by the run in this workdir"
            except ConfigError as e:
                logging.warning("%s: the recorded %r cannot run here (%s); choosing again, so a resumed run "
                                "may differ from an uninterrupted one in the last bits", choice.key,
                                recorded[choice.key], e)
        if why is None:
            chosen, why = choice.decide(value, platform, config)
        with config.unlocked():
            _set(config, choice.key, chosen)
        phrases.append(f"{choice.key}={chosen} ({why})")
    return phrases


def resolve_for_mesh(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     recorded: dict[str, Any] | None = None) -> Platform:
    """`resolve` for `mesh` (reusing `recorded` values, see `recorded_values`) and log the
    choices in one line."""
    platform = Platform.of_mesh(mesh)
    phrases = resolve(config, platform, recorded)
    logging.info("resolved for %d %s device(s) in %d process(es): %s", platform.devices, platform.backend,
                 platform.processes, "; ".join(phrases) or "nothing automatic")
    return platform
