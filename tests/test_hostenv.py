"""The entry points' host settings (transvw_jax.hostenv): the one-time re-execution with
huge-page malloc, and 512-bit vectors for XLA:CPU on AVX-512 CPUs, both only where JAX will
run on the CPU."""

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
    env["JAX_PLATFORMS"] = "cpu"  # the same on a GPU/TPU host

    def child_flags():
        proc = subprocess.run([sys.executable, "-c", PREPARED], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert child_flags() == f"--xla_force_host_platform_device_count=2 {hostenv.VECTOR_FLAG}"
    env[hostenv.VECTOR_OPT_OUT] = "0"
    assert child_flags() == "--xla_force_host_platform_device_count=2"


# --------------------------------------------------------------------------- only on XLA:CPU
NO_DEVICES: set[str] = set()


@pytest.mark.parametrize("environ, installed, devices, expected", [
    ({"JAX_PLATFORMS": "cpu"}, {"jax_cuda12_plugin"}, {"/dev/nvidia0"}, "cpu"),  # asked for wins
    ({"JAX_PLATFORMS": "cuda,cpu"}, set(), NO_DEVICES, "gpu"),
    ({"JAX_PLATFORMS": "tpu"}, set(), NO_DEVICES, "tpu"),
    ({"JAX_PLATFORM_NAME": "gpu"}, set(), NO_DEVICES, "gpu"),
    ({"JAX_PLATFORMS": "cpu", "JAX_PLATFORM_NAME": "gpu"}, set(), NO_DEVICES, "cpu"),
    ({"JAX_PLATFORMS": ""}, set(), NO_DEVICES, "cpu"),  # empty: unset
    ({}, {"jax_cuda12_plugin"}, {"/dev/nvidia0", "/dev/nvidiactl"}, "gpu"),
    ({}, {"jax_plugins.xla_cuda13"}, {"/dev/nvidiactl"}, "gpu"),
    ({}, {"jaxlib.cuda"}, {"/dev/nvidia3"}, "gpu"),  # a CUDA jaxlib of old
    ({}, {"jax_rocm7_plugin"}, {"/dev/kfd"}, "gpu"),
    ({}, {"jax_cuda12_plugin"}, NO_DEVICES, "cpu"),  # plugin without the hardware
    ({}, set(), {"/dev/nvidia0"}, "cpu"),  # hardware without the plugin
    ({"CUDA_VISIBLE_DEVICES": "-1"}, {"jax_cuda12_plugin"}, {"/dev/nvidia0"}, "cpu"),
    ({"CUDA_VISIBLE_DEVICES": ""}, {"jax_cuda12_plugin"}, {"/dev/nvidia0"}, "cpu"),
    ({"CUDA_VISIBLE_DEVICES": "1"}, {"jax_cuda12_plugin"}, {"/dev/nvidia0"}, "gpu"),
    ({}, {"libtpu"}, {"/dev/accel0"}, "tpu"),
    ({}, {"libtpu"}, {"/dev/vfio/0"}, "tpu"),  # TPU v5 and later
    ({}, {"libtpu"}, NO_DEVICES, "cpu"),
    ({}, {"libtpu", "jax_cuda12_plugin"}, {"/dev/nvidia0"}, "gpu"),
])
def test_expected_backend_decides_as_jax_would_without_starting_it(environ, installed, devices, expected):
    assert hostenv.expected_backend(environ, installed=installed, device_paths=devices) == expected


def test_the_host_probes_find_plugins_without_importing_them(tmp_path):
    """The default probes, on a fake site directory with a CUDA plugin and libtpu: found,
    and neither they nor jax imported (so no backend can have started)."""
    for package in ("jax_cuda12_plugin", "jax_plugins/xla_cuda12", "libtpu"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("raise ImportError('imported')\n")
    code = ("import sys; from transvw_jax import hostenv; "
            "print(sorted(hostenv._installed_accelerator_packages()), hostenv.expected_backend({}) in "
            "('cpu', 'gpu', 'tpu'), sorted(m for m in sys.modules if m.startswith(('jax', 'libtpu'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "['jax_cuda12_plugin', 'jax_plugins.xla_cuda12', 'libtpu'] True []"


@pytest.fixture
def cpu_host_settings_wanted(monkeypatch):
    """A host where both settings apply (AVX-512, glibc with huge pages), with the user's
    XLA_FLAGS and GLIBC_TUNABLES restored afterwards; os.execv records and stops."""
    monkeypatch.setattr(hostenv, "_cpu_has_avx512", lambda *_: True)
    monkeypatch.setattr(hostenv, "_glibc_supports_hugetlb", lambda: True)
    monkeypatch.setattr(hostenv, "_transparent_hugepages_usable", lambda: True)
    monkeypatch.setattr(sys, "platform", "linux")
    for name in (hostenv.OPT_OUT, hostenv.VECTOR_OPT_OUT):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    calls = []

    class Reexecuted(Exception):
        pass

    def execv(*args):
        calls.append(args)
        raise Reexecuted

    monkeypatch.setattr(os, "execv", execv)
    return calls, Reexecuted


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_prepare_does_nothing_on_gpu_or_tpu_hosts(monkeypatch, cpu_host_settings_wanted, backend):
    calls, _ = cpu_host_settings_wanted
    monkeypatch.setattr(hostenv, "expected_backend", lambda environ, **_: backend)
    hostenv.prepare()
    assert calls == []
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert os.environ["GLIBC_TUNABLES"] == ""


def test_prepare_applies_both_settings_on_the_cpu(monkeypatch, cpu_host_settings_wanted):
    calls, reexecuted = cpu_host_settings_wanted
    monkeypatch.setattr(hostenv, "expected_backend", lambda environ, **_: "cpu")
    with pytest.raises(reexecuted):
        hostenv.prepare()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {hostenv.VECTOR_FLAG}"
    assert os.environ["GLIBC_TUNABLES"] == hostenv.TUNABLE
    assert len(calls) == 1 and calls[0][0] == sys.executable
