"""TransVW on real LUNA16 chest CT, at the reference settings (docs/REFERENCE.md section 4).

Run (discovery, then pretraining, then export):
  pip install -e '.[itk]'            # SimpleITK reads LUNA16's .mhd/.raw
  python -m transvw_jax.main --config configs/luna16_transvw.py --workdir runs/luna16_transvw \\
      --config.discovery.volumes_dir=/path/to/LUNA16
Pretrain on the released TransVW cubes instead (no discovery):
  python -m transvw_jax.main --config configs/luna16_transvw.py:released --workdir runs/released \\
      --config.data.released_dir=/path/to/TransVW_data

The volumes: discovery.volumes_dir is the folder holding LUNA16's ten folders subset0..subset9
(each .mhd next to its .raw). As in Models Genesis, discovery trains on the patients of
subsets 0-4 (discovery.train_subsets), validates on 5-6 (discovery.val_subsets) and never
opens 7-9, the test folds of the downstream nodule tasks, nor seg-lungs-LUNA16 (lung masks,
also .mhd). A named subset folder that is missing stops discovery with the key and folder;
a volumes_dir holding none of them (every scan linked into one folder) falls back to the
seeded random split of discovery.val_fraction over all its scans, test folds included.
Scans are read as the original code reads them (discovery.orientation = "reference": the
stored array transposed to (X, Y, Z), not reoriented to RAS), the orientation the released
weights were trained on. "/data/luna16" below is a placeholder; override it with
--config.discovery.volumes_dir=... when the data lives elsewhere.

Epoch-based schedule: the reference counts epochs (one validation per epoch, learning rate
x0.5 every int(0.8 * patience) = 40 epochs, early stop after 50 epochs without a better
validation loss), so this config does too (train.schedule_unit = "epochs"): steps,
decay_every, eval_every, checkpoint_every, sample_every, warmup_steps and patience below are
epochs. Pretraining converts them to steps of the store it actually opens, one epoch being
training cubes // global batch steps (logged as "epoch = N steps (M training cubes /
global batch B)", and recorded under "schedule" in pretrain_summary.json; config.json
shows the epoch values). So --config.train.batch_size=... or another store size needs no
other override.

The file starts from configs/default.py, which holds the reference settings (model, cube,
optimiser, discovery, transforms: docs/REFERENCE.md section 4), and sets what LUNA16 and the
epoch schedule need; none of the demo's laptop-sized values apply.
"""

from pathlib import Path

import ml_collections

from transvw_jax.fileio import load_module

# Reference schedule, in epochs (docs/REFERENCE.md section 4; TransVW's and Models Genesis'
# train scripts alike): patience 50, StepLR x0.5 every int(0.8 * patience) epochs.
PATIENCE_EPOCHS = 50  # stop after 50 epochs without a better validation loss
DECAY_EPOCHS = int(0.8 * PATIENCE_EPOCHS)  # learning rate x0.5 every 40 epochs
MAX_EPOCHS = 200  # an upper bound: early stopping usually ends the run sooner
SAMPLE_EPOCHS = 10  # a PNG of input / target / restoration every 10 epochs


def set_epoch_schedule(t: ml_collections.ConfigDict) -> None:
    """The reference's schedule in epochs on `t` (config.train): validation, checkpoint and
    early-stopping counts once per epoch, as the originals' epoch loops do."""
    t.schedule_unit = "epochs"
    t.eval_every = t.checkpoint_every = 1
    t.decay_every = DECAY_EPOCHS
    t.patience = PATIENCE_EPOCHS
    t.steps = MAX_EPOCHS
    t.sample_every = SAMPLE_EPOCHS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # configs/default.py by path, from any current directory (see configs/demo.py).
    config = load_module(Path(__file__).with_name("default.py")).get_config()
    del config.synthesize  # real data: no phantoms
    # The base's stages: discover, pretrain, export.
    # The model is the base's reference network: ynet3d at width 32 (33.3M parameters with
    # 44 classes). Discovery extracts model.num_classes = 44 classes (the paper's) and writes
    # the count into the store's manifest; pretraining checks that model.num_classes matches
    # the store and stops at once, naming the value to set, when it does not.
    config.data.num_threads = 8  # parallel reads per process
    config.data.prefetch = 16  # read-ahead, in loader elements: per-process batches

    # Self-discovery at the reference settings (the base's, but for these).
    d = config.discovery
    d.volumes_dir = "/data/luna16"  # placeholder: the folder holding subset0..subset9
    # spacing () keeps each scan's own spacing, as the reference does by default (LUNA16:
    # ~0.6-0.9 mm in-plane, 0.6-2.5 mm slices). (1.0, 1.0, 2.0) or (2.0, 2.0, 2.0) resamples (the
    # original code's 2 mm example); words.border is in voxels, so shrink it with the spacing:
    # a 512-voxel slice at 0.7 mm is ~180 voxels at 2 mm, too few for a 100-voxel border.
    # Models Genesis' folds: train on subsets 0-4, validate on 5-6, never read 7-9 (downstream
    # test folds). val_fraction (0.2: of 888 scans, ~710 training, ~178 validation) applies
    # only when volumes_dir has no subset folders.
    d.train_subsets = (0, 1, 2, 3, 4)
    d.val_subsets = (5, 6)
    d.orientation = "reference"  # as stored, (X, Y, Z): the originals' (released weights')
    d.autoencoder.steps = 20_000  # ~180 passes over LUNA16's 888 scans at batch 8
    d.autoencoder.batch_size = 8
    # The words keep the reference's instances (200 + 30), border (100, 100, 30), spacing of
    # classes (5 voxels) and Models Genesis' air filter (0.15 above -150 HU): the base's.

    # Pretraining (docs/REFERENCE.md section 4, Self-discovery and pretraining): the base's
    # Adam 1e-3 at global batch 64, lambda_cls 0.01, step decay x0.5, the whole validation
    # split at every evaluation, 3 checkpoints kept plus <workdir>/best (what export writes).
    # In epochs (converted when training starts: 26,400 cubes / 64 = 412 steps per epoch for
    # a full store): one evaluation and checkpoint per epoch, x0.5 every 40, patience 50,
    # at most 200.
    set_epoch_schedule(config.train)

    if arg == "released":
        # The released TransVW cubes (train_data{r}_vwGen_ex_ref_fold{k}.0.npy + labels):
        # no discovery. Labels are read from the files; each fold holds a block of 50
        # classes. The original train.py pretrains on the first 44 (its cls_classes): it
        # reads fold 1 and keeps classes 0-43, in training and validation alike, which
        # data.released_classes = 44 does. More classes: folds 1..ceil(N / 50), e.g.
        #   --config.data.released_folds="(1, 2)" --config.data.released_classes=100
        #   --config.model.num_classes=100
        # (pretraining reads the true count, max label + 1, and stops naming the value to
        # set if model.num_classes differs). The epoch schedule above fits the released
        # set's size by itself.
        config.stages = ("pretrain", "export")
        config.data.source = "released"
        config.data.released_dir = "/data/TransVW_data"  # placeholder: override
        # data.released_resolutions: the base's (1, 2, 3); validation uses resolution 1 only.
        config.data.released_folds = (1,)
        config.data.released_classes = 44
        config.model.num_classes = config.data.released_classes
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: released")
    return config
