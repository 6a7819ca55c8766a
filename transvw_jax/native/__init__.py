"""Native CPU kernels: the oneDNN 3D convolution behind `model.conv_impl = "onednn"`, and
the TransVW elastic deformation behind `transforms.elastic.impl = "native"`.

XLA:CPU has no fast 3D convolution; oneDNN (the library PyTorch's CPU convolutions run
on) does. `onednn_conv.cc` wraps its forward, input-gradient and kernel-gradient
convolutions as XLA FFI custom calls. It is compiled here on first use (a few seconds,
g++), against the headers of the installed jaxlib and of oneDNN (PyPI's `onednn-cpu-gomp` +
`onednn-devel-cpu-gomp`, dependencies of transvw-jax on Linux x86-64, or
`$TRANSVW_ONEDNN_ROOT` pointing at a prefix with include/oneapi/dnnl and lib/libdnnl.so),
and cached as a shared library keyed by everything that goes into it. Nothing here runs
unless that path is chosen. Every reason it cannot run (`unavailable_reason`) names the
fix, because "auto" then falls back to the slower matmul form with only that one line.

`elastic_cpu.cc` needs only a C++ compiler and jaxlib's FFI headers (no oneDNN). It is
compiled for this machine's CPU (`-march=native`), so its cache key includes the CPU's
model and feature flags: a cache directory shared by different machines keeps one
library per kind of CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("onednn_conv.cc")
ELASTIC_SOURCE = Path(__file__).with_name("elastic_cpu.cc")
ELASTIC_TARGET = "TransvwElastic"
ROOT_ENV = "TRANSVW_ONEDNN_ROOT"
CACHE_ENV = "TRANSVW_CACHE_DIR"
TARGETS = {
    "forward": "TransvwConv3dForward",
    "backward_data": "TransvwConv3dBackwardData",
    "backward_weights": "TransvwConv3dBackwardWeights",
}


# The oneDNN packages pyproject.toml installs on Linux x86-64: the fix named when they are
# missing (tests/test_native_default.py checks the two agree).
ONEDNN_PIP = ("onednn-cpu-gomp==2023.2.0", "onednn-devel-cpu-gomp==2023.2.0")


def _onednn_pip_here() -> bool:
    return platform.system() == "Linux" and platform.machine() == "x86_64"


class NativeUnavailable(RuntimeError):
    """A native kernel cannot be built or loaded here; the message says why."""


class OneDNNUnavailable(NativeUnavailable):
    """The oneDNN convolution cannot be built or loaded here; the message says why."""


def _lib_dir(prefix: Path) -> Path | None:
    for sub in ("lib", "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu"):
        if any((prefix / sub).glob("libdnnl.so*")):
            return prefix / sub
    return None


def find_onednn() -> tuple[Path, Path]:
    """(include dir, lib dir) of a oneDNN installation: `$TRANSVW_ONEDNN_ROOT`, else the
    prefixes pip installs data files into (this environment's, the user's), else /usr."""
    env = os.environ.get(ROOT_ENV)
    prefixes = [Path(env)] if env else [
        Path(sys.prefix), Path(site.getuserbase()), Path("/usr/local"), Path("/usr")]
    for prefix in prefixes:
        lib = _lib_dir(prefix)
        if (prefix / "include/oneapi/dnnl/dnnl.hpp").is_file() and lib is not None:
            return prefix / "include", lib
    where = env if env else ", ".join(str(p) for p in prefixes)
    if _onednn_pip_here():
        fix = f"pip install {' '.join(repr(r) for r in ONEDNN_PIP)} (or set {ROOT_ENV})"
    else:
        fix = (f"transvw-jax installs oneDNN from PyPI on Linux x86-64 only; on {platform.system()} "
               f"{platform.machine()} set {ROOT_ENV} to a oneDNN installation with its headers")
    raise OneDNNUnavailable(f"oneDNN headers and libdnnl.so not found under {where}: {fix}")


def cache_dir() -> Path:
    """Where the compiled kernels live: `$TRANSVW_CACHE_DIR`, else `$XDG_CACHE_HOME/transvw_jax`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transvw_jax"


def _compile(source: Path, flags: list[str], out_dir: Path | None, key_extra: str = "",
             error: type[NativeUnavailable] = NativeUnavailable) -> Path:
    """Compile `source` into a shared library (if not cached) and return its path. The
    library is written under a temporary name and renamed into place, so concurrent
    processes never load a half-written file."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        name = os.environ.get("CXX", "g++")
        raise error(f"no C++ compiler ({name}) on PATH to build {source.name}: install g++ "
                    "(e.g. apt-get install g++) or set CXX to a C++17 compiler")
    cmd = [compiler, "-std=c++17", "-w", "-shared", "-fPIC", str(source), f"-I{jax.ffi.include_dir()}",
           *flags]
    recipe = "\0".join([source.read_text(), jax.__version__, key_extra, *cmd[1:]])
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    out_dir = cache_dir() if out_dir is None else out_dir
    target = out_dir / f"{source.stem}-{digest}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:300])
            first = first or f"exit status {done.returncode}"
            raise error(f"building {source.name} with {compiler} failed: {first} "
                        "(set CXX to another C++17 compiler, e.g. g++)")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build(out_dir: Path | None = None) -> Path:
    """Compile onednn_conv.cc (if not cached) and return the shared library's path."""
    include, lib = find_onednn()
    flags = ["-O2", f"-I{include}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
    return _compile(SOURCE, flags, out_dir, error=OneDNNUnavailable)


def _cpu_identity() -> str:
    """The CPU's model and feature flags: what `-march=native` code depends on."""
    lines = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                    lines.append(line.strip())
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:
        pass
    return "\n".join(lines)


def build_elastic(out_dir: Path | None = None) -> Path:
    """Compile elastic_cpu.cc for this CPU (if not cached) and return the library's path.
    `-fno-trapping-math` lets the compiler vectorise the float-to-index conversions."""
    return _compile(ELASTIC_SOURCE, ["-O3", "-march=native", "-fno-trapping-math"], out_dir,
                    key_extra=_cpu_identity())


def _load(path: Path, targets) -> ctypes.CDLL:
    """Load a built library and register its FFI handlers (symbol = target name) with XLA's
    CPU backend."""
    library = ctypes.CDLL(str(path))
    for target in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    return library


def _reason(loader) -> str | None:
    """None when `loader()` succeeds, else why it cannot build or load."""
    try:
        loader()
    except NativeUnavailable as e:
        return str(e)
    except OSError as e:  # an unwritable cache directory, or a library that does not load
        return f"{e} (if that is the cache, set {CACHE_ENV} to a writable directory)"
    return None


@functools.cache
def load_elastic() -> ctypes.CDLL:
    """Build (once per machine and CPU), load and register the elastic custom call."""
    return _load(build_elastic(), [ELASTIC_TARGET])


@functools.cache
def elastic_unavailable_reason() -> str | None:
    """None when the native elastic kernel can run here, else the reason it cannot."""
    return _reason(load_elastic)


@functools.cache
def load() -> ctypes.CDLL:
    """Build (once per machine), load and register the custom calls with XLA's CPU
    backend. Raises OneDNNUnavailable saying why when that is not possible."""
    return _load(build(), TARGETS.values())


@functools.cache
def unavailable_reason() -> str | None:
    """None when the oneDNN convolution can run here, else the reason it cannot."""
    return _reason(load)


@functools.cache
def supports_bfloat16() -> bool:
    """Whether oneDNN has a bfloat16 convolution on this CPU (AVX-512 ones do; AVX2-only
    ones do not, and there bfloat16 layers stay on XLA's matmul form)."""
    return bool(load().transvw_onednn_supports_bf16())


def impl_info(batch: int, spatial: tuple[int, int, int], cin: int, cout: int, k: int = 3) -> str:
    """The oneDNN implementations chosen for a shape's forward | input grad | kernel grad
    (e.g. "brg_conv_fwd:avx512_core"): for benchmark reports."""
    library = load()
    buf = ctypes.create_string_buffer(512)
    fn = library.transvw_onednn_impl_info
    fn.argtypes = [ctypes.c_int64] * 7 + [ctypes.c_char_p, ctypes.c_int]
    fn(batch, *spatial, cin, cout, k, buf, len(buf))
    return buf.value.decode()
