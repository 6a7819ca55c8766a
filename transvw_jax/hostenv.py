"""Host allocator setting for XLA:CPU, applied by re-executing the entry point once.

Why: XLA allocates an execution's buffers afresh on every call, and glibc serves large
allocations (above 32 MiB at most) with fresh mmap'd pages that the kernel faults in and
zeroes 4 KiB at a time on first touch. Measured on the 2-core benchmark machine, the
restoration transforms for a batch of 64 cubes fault 69-161 MiB per call (17,000-41,000
page faults), 15-25% of their time (`benchmarks/RESULTS.md`). glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages (the kernel's
"madvise" mode, the common default): ~30x fewer faults. Tunables are read when a process
starts, so the command-line entry points re-execute themselves once with it set.

Nothing changes where it cannot apply: not Linux/glibc >= 2.35, transparent huge pages
off, the tunable already set, or `TRANSVW_HUGEPAGE_MALLOC=0` in the environment.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "TRANSVW_HUGEPAGE_MALLOC"
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
