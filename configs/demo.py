"""The embedded default: runs end to end on a laptop CPU.

Run:
  python -m transvw_jax.main --config configs/demo.py --workdir runs/demo
A tiny variant (width 4) for smoke tests:
  python -m transvw_jax.main --config configs/demo.py:runlocal --workdir runs/tiny
Override any value on the command line, e.g. --config.model.width=16. Every key, its
default and its meaning: configs/default.py; this file sets only the laptop-sized values.

Stages available today: synthesize (procedural phantoms -> <workdir>/volumes), discover
(self-discovery -> <workdir>/store, the visual-word store), export (writes
<workdir>/export/transvw.{pt,safetensors} from the latest checkpoint in <workdir>, or from
a fresh initialisation with a warning). Run a subset with
--config.stages="('discover',)".
"""

from pathlib import Path

import ml_collections

from transvw_jax.fileio import load_module


def base_config() -> ml_collections.ConfigDict:
    """configs/default.py, loaded by path relative to this file: ml_collections loads a
    config file by path (it is not imported as part of a package), so `import default`
    would depend on the current directory; this works from any directory, and also when
    the file is imported as `configs.demo`."""
    return load_module(Path(__file__).with_name("default.py")).get_config()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    config.stages = ("synthesize", "discover", "pretrain", "export")

    # 32 is the reference network (configs/default.py); 8 keeps the demo's pretraining to
    # minutes on a laptop CPU (1/16 of the FLOPs).
    config.model.width = 8
    config.model.num_classes = 16  # visual-word classes; the paper: 44+
    # The reference cube is 64x64x32; the demo uses 32x32x16 so that pretraining takes
    # minutes on a laptop CPU.
    config.data.cube_shape = (32, 32, 16)

    # Pretraining (docs/REFERENCE.md section 4: Adam 1e-3, batch 64, lambda_cls 0.01, x0.5 every
    # 40 epochs, patience 50 epochs), scaled down to minutes on a laptop CPU.
    t = config.train
    t.batch_size = 8
    t.steps = 100
    t.log_every = 10
    t.eval_every = 50
    t.checkpoint_every = 50
    t.sample_every = 50
    t.decay_every = 1000

    # Self-discovery (docs/REFERENCE.md section 4), scaled down from the reference settings
    # (128x128x64 auto-encoder at width 32, 200 + 30 instances, borders 100/100/30) so that
    # it runs in a few minutes on a laptop CPU.
    config.discovery.autoencoder.size = (32, 32, 16)
    config.discovery.autoencoder.width = 4
    config.discovery.autoencoder.steps = 100
    w = config.discovery.words
    w.train_instances = 8
    w.val_instances = 3
    w.border = (16, 16, 8)
    w.extra_size = (25, 40)  # the reference's [50, 80) for 64-voxel cubes
    w.extra_offset = (-5, 5)
    # The reference's air filter (0.15: keep cubes that are mostly lung or air) rejects every
    # cube of these small phantoms, whose lungs are narrower than a cube; 0.6 admits enough.
    w.max_air_score = 0.6

    if arg == "runlocal":
        config.model.width = 4
        config.model.num_classes = 8
        config.data.cube_shape = (16, 16, 8)
        config.synthesize.count = 12
        config.synthesize.shape = (32, 32, 16)
        config.synthesize.spacing = (10.0, 10.0, 20.0)
        config.discovery.autoencoder.size = (16, 16, 8)
        config.discovery.autoencoder.width = 2
        config.discovery.autoencoder.steps = 4
        config.discovery.words.train_instances = 4
        config.discovery.words.val_instances = 2
        config.discovery.words.border = (2, 2, 1)
        config.discovery.words.extra_size = (12, 20)
        config.discovery.words.extra_offset = (-2, 2)
        # 5 voxels apart, 8 classes do not always fit in the 12 x 12 x 3 starts these phantoms allow.
        config.discovery.words.min_distance = 3.0
        config.train.batch_size = 8  # divisible by the 8 simulated devices of the tests
        config.train.steps = 6
        config.train.log_every = 2
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.train.sample_every = 3
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: runlocal")
    return config
