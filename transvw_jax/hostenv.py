"""Host settings for XLA:CPU that the entry points apply once, before JAX starts.

1. Huge-page malloc, by re-executing the entry point once. Why: XLA allocates an
execution's buffers afresh on every call, and glibc serves large allocations (above 32 MiB
at most) with fresh mmap'd pages that the kernel faults in and zeroes 4 KiB at a time on
first touch. Measured on the 2-core benchmark machine, the restoration transforms for a
batch of 64 cubes fault 69-161 MiB per call (17,000-41,000 page faults), 15-25% of their
time (`benchmarks/RESULTS.md`). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask
for transparent huge pages (the kernel's "madvise" mode, the common default): ~30x fewer
faults. Tunables are read when a process starts, hence the re-execution. Nothing changes
where it cannot apply: not Linux/glibc >= 2.35, transparent huge pages off, the tunable
already set, or `TRANSVW_HUGEPAGE_MALLOC=0` in the environment.

2. 512-bit vectors in XLA:CPU's generated code on CPUs with AVX-512
(`--xla_cpu_prefer_vector_width=512` added to XLA_FLAGS; XLA's default is 256). Why: the
transforms' fusions are long element-wise chains (hashes, masks, the elastic sampling),
which then run in half the vector instructions. Measured on 2-core machines, batch 64 of
64x64x32 (`benchmarks/RESULTS.md`): the TransVW policy +7% (Intel Xeon) and +12-18% (AMD
EPYC), Models Genesis +13% / +8-15%, and the YNet3D training step +10% at width 8 and 32
(AMD EPYC).
XLA_FLAGS is read when the backend starts, so this needs no re-execution. Not applied
without `avx512f` in /proc/cpuinfo, when XLA_FLAGS already sets the width, or with
`TRANSVW_AVX512_CODEGEN=0`.

Library code never changes the process: only `prepare()`, called first thing by
`python -m transvw_jax.main`, the `transvw-jax` script and the benchmarks, does.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "TRANSVW_HUGEPAGE_MALLOC"
VECTOR_FLAG = "--xla_cpu_prefer_vector_width=512"
VECTOR_OPT_OUT = "TRANSVW_AVX512_CODEGEN"
_CPUINFO = Path("/proc/cpuinfo")
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


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
    """Apply both host settings; call first thing in an entry point, before any JAX
    computation (importing jax is fine: its backend starts on first use). May replace
    the process (see `reexec_with_hugepage_malloc`)."""
    if wants_vector_flag():
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {VECTOR_FLAG}".strip()
    reexec_with_hugepage_malloc()
