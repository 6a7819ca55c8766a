"""Label-efficiency sanity experiment on the embedded phantoms: nodule segmentation.

First pretrain with the demo (its weights are the "pretrained" initialisation):
  python -m transvw_jax.main --config configs/demo.py --workdir runs/demo
then:
  python -m transvw_jax.main --config configs/demo_finetune.py --workdir runs/demo_finetune

Stages: synthesize_labeled (24 NEW phantoms, another seed than the pretraining ones, with
their nodule masks, as an nnU-Net raw dataset in <workdir>/labeled), label_efficiency
(fine-tune a U-Net for nodule segmentation with 10%, 25% and 100% of the 18 training cases,
from scratch and from runs/demo, two seeds each; 6 validation cases scored on whole volumes
by sliding-window inference). The table goes to <workdir>/label_efficiency.md.

It is a sanity experiment at laptop scale (width 8, 32x32x16 patches, a few hundred steps),
not a claim about the method. Single run instead of the grid:
  --config.stages="('synthesize_labeled', 'finetune')" --config.finetune.label_fraction=0.25
Other pretrained weights: --config.finetune.pretrained=path/to/transvw.pt (or a workdir).
"""

from pathlib import Path

import ml_collections

from transvw_jax.fileio import load_module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # configs/default.py by path, from any current directory (see configs/demo.py).
    config = load_module(Path(__file__).with_name("default.py")).get_config()
    config.stages = ("synthesize_labeled", "label_efficiency")

    # The width must match the pretrained network (configs/demo.py). BatchNorm: "standard"
    # (running statistics at evaluation, loaded from the pretraining checkpoint) makes the
    # validation figures independent of how windows and patches are batched.
    config.model.name = "unet3d"  # the fine-tuning stage picks unet3d / encoder_classifier by task
    config.model.width = 8
    config.model.bn = "standard"
    config.data.cube_shape = (32, 32, 16)  # as the demo's pretraining

    # 24 labeled phantoms (configs/default.py: synthesize_labeled), another seed than the
    # pretraining ones. The grid (configs/default.py: experiment): 10%, 25% and 100% of the
    # training cases, from scratch and pretrained, seeds 0 and 1.
    f = config.finetune
    f.patch_shape = (32, 32, 16)
    # The phantoms' nodules are tiny (radius 1-3 voxels, ~0.2% of a patch): half the patches
    # are centred on one (nnU-Net's default is a third).
    f.foreground_fraction = 0.5
    f.patches_per_case = 32
    f.val_fraction = 0.25  # 6 validation, 18 training cases
    f.pretrained = "runs/demo"
    f.inference.overlap = 0.25
    # 300 steps: well past the point where a from-scratch run starts to find the nodules,
    # and still minutes per run on a laptop CPU (figures: benchmarks/RESULTS.md).
    f.train.batch_size = 4
    f.train.steps = 300
    f.train.eval_every = 50
    f.train.checkpoint_every = 50
    f.train.log_every = 50
    f.train.patience = 3

    if arg == "runlocal":  # a smoke test: seconds of training, pretrained from the tiny demo
        config.model.width = 4
        config.data.cube_shape = (16, 16, 8)
        config.synthesize_labeled.count = 6
        config.synthesize_labeled.shape = (32, 32, 16)
        config.synthesize_labeled.spacing = (10.0, 10.0, 20.0)
        config.finetune.patch_shape = (16, 16, 8)
        config.finetune.patches_per_case = 8
        config.finetune.val_patches_per_case = 2
        config.finetune.val_fraction = 0.34
        config.finetune.pretrained = "runs/tiny"
        config.finetune.train.batch_size = 8  # divisible by the 8 simulated devices of the tests
        config.finetune.train.steps = 4
        config.finetune.train.eval_every = 2
        config.finetune.train.checkpoint_every = 2
        config.finetune.train.log_every = 2
        config.experiment.label_fractions = (0.5, 1.0)
        config.experiment.seeds = (0,)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: runlocal")
    return config
