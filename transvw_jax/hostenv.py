"""Host settings for XLA:CPU that the entry points apply once, before JAX starts.

1. Huge-page malloc, by re-executing the entry point once. Why: XLA allocates an
execution's buffers afresh on every call, and glibc serves large allocations with fresh
mmap'd pages that the kernel faults in and zeroes 4 KiB at a time on first touch, a large
share of the restoration transforms' time; glibc's `glibc.malloc.hugetlb=1` tunable makes
malloc ask for transparent huge pages (the kernel's "madvise" mode, the common default),
which takes far fewer faults (figures: `benchmarks/RESULTS.md`, transforms.py section).
Tunables are read when a process starts, hence the re-execution. Nothing changes where it
cannot apply: not Linux/glibc >= 2.35, transparent huge pages off, the tunable already
set, or `TRANSVW_HUGEPAGE_MALLOC=0` in the environment.

2. 512-bit vectors in XLA:CPU's generated code on CPUs with AVX-512
(`--xla_cpu_prefer_vector_width=512` added to XLA_FLAGS; XLA's default is 256). Why: the
transforms' fusions are long element-wise chains (hashes, masks, the elastic sampling),
which then run in half the vector instructions, and the training step gains too (figures:
`benchmarks/RESULTS.md`, issue 3 third session).
XLA_FLAGS is read when the backend starts, so this needs no re-execution. Not applied
without `avx512f` in /proc/cpuinfo, when XLA_FLAGS already sets the width, or with
`TRANSVW_AVX512_CODEGEN=0`.

Both help XLA:CPU only, so `prepare()` applies them only when `expected_backend()` says JAX
will run on the CPU, and does nothing on GPU/TPU hosts.

Library code never changes the process: only `prepare()`, called first thing by the
command's entry point (`transvw_jax.main.run`, behind both `python -m transvw_jax.main` and
the `transvw-jax` script) and by the benchmarks, does.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import platform
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "TRANSVW_HUGEPAGE_MALLOC"
VECTOR_FLAG = "--xla_cpu_prefer_vector_width=512"
VECTOR_OPT_OUT = "TRANSVW_AVX512_CODEGEN"
_CPUINFO = Path("/proc/cpuinfo")
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# JAX_PLATFORMS / JAX_PLATFORM_NAME entries -> the kind of backend they select.
_PLATFORM_KINDS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "tpu": "tpu"}
# What makes JAX able to use an accelerator: the plugin modules (jax_cuda12_plugin, jax_rocm7_plugin,
# their PJRT halves jax_plugins.xla_cuda12 ...), a CUDA/ROCm jaxlib of old, or libtpu.
_GPU_PACKAGE = re.compile(r"jax_(cuda|rocm)\d*_plugin|jax_plugins\.xla_(cuda|rocm)\d*|jaxlib\.(cuda|rocm)")
_TPU_PACKAGE = "libtpu"
# Device files the drivers create: NVIDIA (/dev/nvidia0, /dev/nvidiactl), AMD (/dev/kfd), TPU VMs
# (/dev/accel0 on v2-v4, /dev/vfio/0 on v5 and later).
_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
_GPU_DEVICE = re.compile(r"/dev/(nvidia(\d+|ctl)|kfd)")
_TPU_DEVICE = re.compile(r"/dev/(accel\d+|vfio/\d+)")


def _installed_accelerator_packages() -> set[str]:
    """Names of the installed packages that give JAX an accelerator, found without importing them."""
    names = {m.name for m in pkgutil.iter_modules()}
    for package in ("jax_plugins", "jaxlib"):
        spec = importlib.util.find_spec(package)  # top-level: finds, does not import
        if spec is not None and spec.submodule_search_locations:
            names.update(f"{package}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations))
    return {name for name in names if _GPU_PACKAGE.fullmatch(name) or name == _TPU_PACKAGE}


def _existing_device_paths() -> set[str]:
    return {path for pattern in _DEVICE_GLOBS for path in glob.glob(pattern)}


def expected_backend(environ: Mapping[str, str], *, installed: Iterable[str] | None = None,
                     device_paths: Iterable[str] | None = None) -> str:
    """The backend JAX will pick in this process: "cpu", "gpu" or "tpu" (or the name
    JAX_PLATFORMS gives first, when it is none of those).

    Why: the host settings help XLA:CPU only; on accelerator hosts the re-execution costs a
    start-up and the XLA_FLAGS entry is noise. And `prepare()` runs before JAX starts a
    backend and must not start one to find out (that would break jax.distributed.initialize),
    so this decides as JAX would from the outside: JAX_PLATFORMS (or the older
    JAX_PLATFORM_NAME) when set, else an installed TPU/GPU plugin together with the device
    files of its hardware (CUDA_VISIBLE_DEVICES="" or "-1" hiding the GPUs), else the CPU.
    `installed` (package names as `_GPU_PACKAGE`/"libtpu") and `device_paths` (existing
    /dev paths) default to probing this host."""
    requested = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    first = requested.split(",")[0].strip().lower()
    if first:
        return _PLATFORM_KINDS.get(first, first)
    installed = _installed_accelerator_packages() if installed is None else set(installed)
    devices = _existing_device_paths() if device_paths is None else set(device_paths)
    if _TPU_PACKAGE in installed and any(_TPU_DEVICE.fullmatch(path) for path in devices):
        return "tpu"
    gpus_hidden = environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if (not gpus_hidden and any(_GPU_PACKAGE.fullmatch(name) for name in installed)
            and any(_GPU_DEVICE.fullmatch(path) for path in devices)):
        return "gpu"
    return "cpu"


def _glibc_supports_hugetlb() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(v) for v in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _transparent_hugepages_usable() -> bool:
    """True when the kernel's mode is 'always' or 'madvise' (shown in [brackets])."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether this process should be re-executed with the tunable."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    return sys.platform.startswith("linux") and _glibc_supports_hugetlb() and _transparent_hugepages_usable()


def reexec_with_hugepage_malloc() -> None:
    """Replace this process by the same command line with GLIBC_TUNABLES extended by
    TUNABLE, when `wanted()`. Call first thing in an entry point (before JAX starts
    threads); returns normally when nothing is to be done."""
    if not wanted():
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _cpu_has_avx512(cpuinfo: Path = _CPUINFO) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512f" in line.split() for line in text.splitlines())


def wants_vector_flag(environ: dict[str, str] | None = None, cpuinfo: Path = _CPUINFO) -> bool:
    """Whether XLA_FLAGS should get VECTOR_FLAG in this process (see the module doc)."""
    env = os.environ if environ is None else environ
    if env.get(VECTOR_OPT_OUT, "1") == "0" or "xla_cpu_prefer_vector_width" in env.get("XLA_FLAGS", ""):
        return False
    return _cpu_has_avx512(cpuinfo)


def prepare() -> None:
    """Apply both host settings when JAX will run on the CPU (`expected_backend`), else
    nothing; call first thing in an entry point, before any JAX computation (importing jax
    is fine: its backend starts on first use). May replace the process (see
    `reexec_with_hugepage_malloc`)."""
    if expected_backend(os.environ) != "cpu":
        return
    if wants_vector_flag():
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {VECTOR_FLAG}".strip()
    reexec_with_hugepage_malloc()
