"""The entry points' one-time re-execution with huge-page malloc (transvw_jax.hostenv)."""

import os
import subprocess
import sys

import pytest

from transvw_jax import hostenv

SHOW = "import os; from transvw_jax import hostenv; hostenv.reexec_with_hugepage_malloc(); " \
       "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''))"


def run_child(env_update):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    env.update(env_update)
    proc = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")[0].split(" ", 1)


@pytest.mark.skipif(not hostenv.wanted({}), reason="no glibc >= 2.35 with transparent huge pages here")
def test_entry_point_reexecutes_once_with_the_tunable_kept_with_others():
    _, tunables = run_child({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000000"})
    assert tunables == f"glibc.malloc.trim_threshold=1000000000:{hostenv.TUNABLE}"
    _, tunables = run_child({})
    assert tunables == hostenv.TUNABLE


def test_opt_out_and_already_set_leave_the_process_alone():
    assert run_child({hostenv.OPT_OUT: "0"})[1] == ""
    assert run_child({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})[1] == "glibc.malloc.hugetlb=0"
    assert not hostenv.wanted({hostenv.OPT_OUT: "0"})
    assert not hostenv.wanted({"GLIBC_TUNABLES": hostenv.TUNABLE})
