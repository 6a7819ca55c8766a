"""The state a training run carries from step to step."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything one train step reads and replaces (donated, so updated in place).

    `params` and `batch_stats` stay float32 master copies whatever `model.dtype` computes
    in; `rng` is raw key data, so the state is a plain array tree for Orbax and sharding.
    Checkpoints store it in two items, `variables` (what export and fine-tuning read) and
    `train_state` (`optimizer_part`), so readers of the weights need not know the optimiser.
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """`{"params", "batch_stats"}`: what `model.apply` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def optimizer_part(self) -> dict[str, Any]:
        """`{"opt_state", "step", "rng"}`: the checkpoint item beside the variables."""
        return {"opt_state": self.opt_state, "step": self.step, "rng": self.rng}

    @classmethod
    def from_parts(cls, variables: dict[str, Any], optimizer_part: dict[str, Any]) -> TrainState:
        return cls(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                   opt_state=optimizer_part["opt_state"], step=optimizer_part["step"],
                   rng=optimizer_part["rng"])

    @classmethod
    def create(cls, tx: optax.GradientTransformation, variables: dict[str, Any], seed: int) -> TrainState:
        return cls(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                   opt_state=tx.init(variables["params"]), step=jnp.zeros((), jnp.int32),
                   rng=jax.random.key_data(jax.random.key(seed)))
