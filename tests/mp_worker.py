"""One process of the two-process training test (tests/test_train.py), not a test itself.

  python tests/mp_worker.py PROCESS_ID PORT STORE WORKDIR OUT
Joins jax.distributed on 127.0.0.1:PORT (2 processes x 4 simulated CPU devices), trains
the tiny config for a few steps on STORE, and saves its final parameters to OUT (.npz).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import demo  # noqa: E402
from transvw_jax import parallel, train  # noqa: E402


def main() -> None:
    pid, port, store, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    config = demo.get_config("runlocal")
    config.model.num_classes = 4
    config.data.store_dir = store
    config.parallel.update(distributed="explicit", coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
    config.train.update(steps=4, eval_every=2, checkpoint_every=2, log_every=1, sample_every=0)
    parallel.initialize(config.parallel)
    assert jax.process_count() == 2 and jax.device_count() == 8
    summary = train.train_and_evaluate(config, workdir)
    flat = flatten_dict(summary.variables["params"], sep="/")
    np.savez(out, **{k: np.asarray(v.addressable_data(0)) for k, v in flat.items()})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
