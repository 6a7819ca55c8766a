"""How a process finds its pod: on a Cloud TPU VM, parallel.distributed="auto" lets
`jax.distributed.initialize()` read the layout from the metadata server (workers started
with `gcloud compute tpus tpu-vm ssh --worker=all` have no TPU_WORKER_HOSTNAMES)."""

import importlib.util

import jax
import pytest
from jax._src import hardware_utils

from transvw_jax import parallel


@pytest.fixture
def joined(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel, "_before_joining", lambda: None)
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                "JAX_PLATFORMS", "TPU_LIBRARY_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_requested_platforms", lambda: [])  # the suite runs JAX on the CPU
    return calls


def _tpu_vm(monkeypatch, chips):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (chips, None))


def test_auto_on_a_cloud_tpu_vm_lets_jax_read_the_pod_from_the_metadata_server(joined, monkeypatch):
    _tpu_vm(monkeypatch, chips=4)
    assert parallel.initialize(parallel.default_config()) == "environment"
    (args, kwargs), = joined
    assert args == () and set(kwargs) == {"heartbeat_timeout_seconds"}  # no address, count or id


def test_auto_without_tpu_chips_or_a_cluster_runs_alone(joined, monkeypatch):
    _tpu_vm(monkeypatch, chips=0)
    assert parallel.initialize(parallel.default_config()) == "off"
    assert joined == []


def test_auto_on_a_tpu_vm_told_to_use_the_cpu_runs_alone(joined, monkeypatch):
    _tpu_vm(monkeypatch, chips=4)
    monkeypatch.setattr(parallel, "_requested_platforms", lambda: ["cpu"])
    assert parallel.initialize(parallel.default_config()) == "off"
    assert joined == []
