"""The entry points' host settings (transvw_jax.hostenv): the one-time re-execution with
huge-page malloc, and 512-bit vectors for XLA:CPU on AVX-512 CPUs."""

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


# --------------------------------------------------------------------------- 512-bit vectors
def fake_cpuinfo(tmp_path, name, flags):
    path = tmp_path / name
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {flags}\n\n")
    return path


def test_vector_flag_only_on_avx512_cpus_and_never_over_the_users_choice(tmp_path):
    avx512 = fake_cpuinfo(tmp_path, "avx512", "avx2 avx512f avx512bw")
    avx2 = fake_cpuinfo(tmp_path, "avx2", "avx2 fma")
    fp16_only_name = fake_cpuinfo(tmp_path, "fp16", "avx2 avx512fp16x")  # a longer flag is not avx512f
    assert hostenv.wants_vector_flag({}, avx512)
    assert not hostenv.wants_vector_flag({}, avx2)
    assert not hostenv.wants_vector_flag({}, fp16_only_name)
    assert not hostenv.wants_vector_flag({}, tmp_path / "missing")
    assert not hostenv.wants_vector_flag({hostenv.VECTOR_OPT_OUT: "0"}, avx512)
    assert not hostenv.wants_vector_flag({"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}, avx512)
    assert hostenv.wants_vector_flag({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, avx512)


PREPARED = ("import os; from transvw_jax import hostenv; hostenv.prepare(); "
            "print(os.environ.get('XLA_FLAGS', ''))")


@pytest.mark.skipif(not hostenv.wants_vector_flag({}), reason="no AVX-512 on this CPU")
def test_prepare_adds_the_vector_flag_to_the_users_xla_flags():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", hostenv.VECTOR_OPT_OUT)}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

    def child_flags():
        proc = subprocess.run([sys.executable, "-c", PREPARED], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert child_flags() == f"--xla_force_host_platform_device_count=2 {hostenv.VECTOR_FLAG}"
    env[hostenv.VECTOR_OPT_OUT] = "0"
    assert child_flags() == "--xla_force_host_platform_device_count=2"
