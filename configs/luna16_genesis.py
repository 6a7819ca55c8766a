"""Models Genesis on real LUNA16 chest CT: restoration only, on the plain 3D U-Net.

Run:
  python -m transvw_jax.main --config configs/luna16_genesis.py --workdir runs/luna16_genesis \\
      --config.discovery.volumes_dir=/path/to/LUNA16

Same volumes as configs/luna16_transvw.py (see its docstring for the LUNA16 subset folders
and the epoch schedule), but `discover` runs in `random` mode, as Models Genesis samples
its data: 32 cubes per patient (the paper's scale) at random positions that pass the air
filter (no auto-encoder, one class). To train on exactly the cubes of a TransVW run instead (a
comparison at equal data), reuse its store and skip discovery:
  --config.stages="('pretrain', 'export')" --config.data.store_dir=runs/luna16_transvw/store

Differences from the TransVW config: model unet3d (no visual-word head), objective
genesis (MSE only), the Models Genesis transform policy (flip, local shuffle of 10,000
blocks, non-linear, in-/out-painting composed; no elastic deformation), and the original
Models Genesis optimiser: SGD lr 1, momentum 0.9, global batch 6 (its config.py), x0.5
every int(0.8 * patience) = 40 epochs, patience 50 epochs (one validation per epoch), the
epochs converted to steps of the actual store when training starts.

Variant `configs/luna16_genesis.py:adam`: Adam 1e-3 at global batch 64 (the TransVW
config's optimiser; users report SGD lr 1 collapsing to a constant output, docs/REFERENCE.md
section 6, Practical notes), same epoch schedule.
"""

from pathlib import Path

import ml_collections

from transvw_jax.fileio import load_module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: None (the original SGD optimiser) or "adam" (Adam 1e-3 at batch 64)."""
    if arg not in (None, "", "adam"):
        raise ValueError(f"unknown config argument {arg!r}; known: adam")
    config = load_module(Path(__file__).with_name("luna16_transvw.py")).get_config()
    # The TransVW config's stages (discover, pretrain, export) and data: Models Genesis' own
    # folds (train on subsets 0-4, validate on 5-6, never read 7-9) and reading (the stored
    # array transposed to (X, Y, Z), no RAS).
    config.discovery.mode = "random"  # Models Genesis: random air-filtered cubes, no classes
    # words.random_cubes_per_patient: the base's 32, the paper's scale (infinite_generator_3D --scale).

    config.model.name = "unet3d"  # Models Genesis: the U-Net alone (19.1M parameters at width 32)
    # unet3d has no head; num_classes (44, from the TransVW config) is unused in random mode.

    config.train.objective = "genesis"  # MSE restoration loss; the store's labels are ignored
    config.train.lambda_cls = 0.0  # no classification term (the objective has none anyway)
    # The schedule is the TransVW config's, in epochs (converted to steps of this store when
    # training starts): x0.5 every 40 epochs, one validation per epoch, patience 50 epochs.
    # "adam" keeps the TransVW config's optimiser: Adam 1e-3 at global batch 64.
    if arg != "adam":
        # The original Models Genesis optimiser (pytorch/config.py, Genesis_Chest_CT.py):
        # SGD, lr 1, momentum 0.9 (the base's train.momentum).
        config.train.optimizer = "sgd"
        config.train.learning_rate = 1.0
        # train.batch_size is GLOBAL: split over every device of every process, so it must
        # divide by the device count. The original's 6 ran on one GPU; 6 runs as is on 1, 2,
        # 3 or 6 devices. On 4 or 8, pick a multiple (8, 16: steps per epoch follow the
        # batch, the learning rate does not) or run on fewer devices.
        config.train.batch_size = 6

    # The Models Genesis policy: flip, local shuffle of 10,000 blocks, non-linear, in- or
    # out-painting, composed; no elastic deformation (the other values are TransVW's too).
    tf = config.transforms
    tf.policy = "genesis"
    tf.elastic.enabled = False
    tf.flip.prob = 0.4
    tf.local_shuffle.num_blocks = 10_000
    tf.in_paint.max_blocks = 5
    tf.out_paint.max_extra_blocks = 4
    config.export.head = False  # a UNet3D state_dict (106 keys)
    return config
