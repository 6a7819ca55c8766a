"""Fine-tuning: downstream segmentation and classification from pretrained weights.

- `run`: one fine-tuning run (`finetune`): data, initialisation, the task on the training
  engine (`tasks.segmentation` / `tasks.classification`), the whole-volume evaluation.
- `data`: the case split, the label fraction, the patch and candidate sources.
- `transfer`: pretrained weights (a workdir or a released file) into the network.
- `experiment`: the label-efficiency grid and its table.
"""

from transvw_jax.finetune.data import RESUME_SETTINGS, Data, subset_names
from transvw_jax.finetune.experiment import format_table, label_efficiency
from transvw_jax.finetune.run import (
    build_run,
    evaluate,
    final_evaluation,
    finetune,
    make_model,
    make_task,
)
from transvw_jax.finetune.transfer import read_pretrained, transfer

__all__ = ["RESUME_SETTINGS", "Data", "build_run", "evaluate", "final_evaluation", "finetune", "format_table",
           "label_efficiency", "make_model", "make_task", "read_pretrained", "subset_names", "transfer"]
