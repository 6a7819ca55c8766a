"""The training engine: a task's pure functions -> compiled steps on a mesh -> one loop.

- `state.TrainState`: params, batch_stats, opt_state, step, rng.
- `optim`: the optimiser and learning-rate schedule of a loop config section.
- `engine`: `Task` (what an objective computes), `place` (compile it on a mesh: `Run`),
  the one train update.
- `loop.fit`: resume, checkpoints, evaluation, early stopping, NaN stop, metrics,
  progress, preemption.
"""

from transvw_jax.training.engine import Run, Steps, Task, cube_keys, place
from transvw_jax.training.loop import Summary, TrainingDiverged, fit
from transvw_jax.training.optim import LR_SCALINGS, make_optimizer, make_schedule, peak_learning_rate
from transvw_jax.training.state import TrainState

__all__ = ["LR_SCALINGS", "Run", "Steps", "Summary", "Task", "TrainState", "TrainingDiverged", "cube_keys",
           "fit", "make_optimizer", "make_schedule", "peak_learning_rate", "place"]
