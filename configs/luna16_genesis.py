"""Models Genesis on real LUNA16 chest CT: restoration only, on the plain 3D U-Net.

Run:
  python -m transvw_jax.main --config configs/luna16_genesis.py --workdir runs/luna16_genesis \\
      --config.discovery.volumes_dir=/path/to/luna16_all

Same volumes as configs/luna16_transvw.py (see its docstring for the one-folder LUNA16
layout and the epoch -> step conversion), but `discover` runs in `random` mode, as Models
Genesis samples its data: 64 cubes per patient at random positions that pass the air test
(no auto-encoder, one class). To train on exactly the cubes of a TransVW run instead (a
comparison at equal data), reuse its store and skip discovery:
  --config.stages="('pretrain', 'export')" --config.data.store_dir=runs/luna16_transvw/store

Differences from the TransVW config: model unet3d (no visual-word head), objective
genesis (MSE only), the Models Genesis transform policy (flip, local shuffle of 10,000
blocks, non-linear, in-/out-painting composed; no elastic deformation).
"""

from pathlib import Path

import ml_collections

from transvw_jax import transforms
from transvw_jax.fileio import load_module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none")
    config = load_module(Path(__file__).with_name("luna16_transvw.py")).get_config()
    config.stages = ("discover", "pretrain", "export")
    config.discovery.mode = "random"  # Models Genesis: random air-filtered cubes, no classes
    config.discovery.words.random_cubes_per_patient = 64

    config.model.name = "unet3d"  # Models Genesis: the U-Net alone (19.1M parameters at width 32)
    # unet3d has no head; num_classes (44, from the TransVW config) is unused in random mode.

    config.train.objective = "genesis"  # MSE restoration loss; the store's labels are ignored
    # Adam 1e-3 rather than the original Models Genesis default, SGD with lr = 1, which users
    # report collapsing to a constant output (REFERENCE.md section 6). To try the original
    # anyway: --config.train.optimizer=sgd --config.train.learning_rate=1.0
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-3
    config.train.lambda_cls = 0.0  # no classification term (the objective has none anyway)
    # batch 64, step decay x0.5 every 40 epochs, patience 50 epochs: as the TransVW config,
    # so that the two pretrainings compare at equal settings.

    config.transforms = transforms.default_config("genesis")
    config.export.head = False  # a UNet3D state_dict (106 keys)
    return config
