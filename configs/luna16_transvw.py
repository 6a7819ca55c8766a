"""TransVW on real LUNA16 chest CT, at the reference settings (REFERENCE.md section 4).

Run (discovery, then pretraining, then export):
  pip install -e '.[itk]'            # SimpleITK reads LUNA16's .mhd/.raw
  python -m transvw_jax.main --config configs/luna16_transvw.py --workdir runs/luna16_transvw \\
      --config.discovery.volumes_dir=/path/to/luna16_all
Pretrain on the released TransVW cubes instead (no discovery):
  python -m transvw_jax.main --config configs/luna16_transvw.py:released --workdir runs/released \\
      --config.data.released_dir=/path/to/TransVW_data

The volumes: `discover` reads every .mhd (and .nii/.nii.gz/.npy) directly inside ONE folder,
not recursively, while LUNA16 ships ten folders subset0..subset9. Link them into one folder
(the .raw next to its .mhd, since a .mhd names its .raw by a relative path):
  mkdir -p /data/luna16 && ln -s /path/to/LUNA16/subset*/*.mhd /path/to/LUNA16/subset*/*.raw /data/luna16/
Link only the CT subsets: LUNA16's seg-lungs-LUNA16 folder holds lung masks, also as .mhd,
which discovery would take for scans. "/data/luna16" below is a placeholder; override it
with --config.discovery.volumes_dir=... when the data lives elsewhere.

Epoch-based settings: the reference counts epochs (learning rate x0.5 every 40 epochs,
early stop after 50 epochs without a better validation loss); this package counts steps.
`set_epoch_cadences` converts with
    steps = epochs * train_cubes / batch_size
where train_cubes = num_classes * train_instances * (1 + extra_resolutions) is what
discovery writes: 44 * 200 * 3 = 26,400 cubes, i.e. 412.5 steps per epoch at batch 64.
The conversion happens when this file is loaded, BEFORE command-line overrides: after
--config.train.batch_size=... (or other class / instance counts) pass the matching
--config.train.decay_every / eval_every / steps too (or rerun the formula), and read the
true cube count from `<workdir>/store/manifest.json` (the run's summary logs it) when
some classes got fewer than 200 patients.

The file reuses the structure of configs/demo.py (its model / data / export sections, so
both stay in step) but rebuilds discovery, train, parallel and transforms from the
modules' defaults, so none of the demo's laptop-sized values carry over; every value that
matters for this experiment is set below.
"""

import math
from pathlib import Path

import ml_collections

from transvw_jax import discovery, parallel, train, transforms
from transvw_jax.fileio import load_module

# Reference schedule, in epochs (REFERENCE.md section 4).
DECAY_EPOCHS = 40  # learning rate x0.5 every 40 epochs
PATIENCE_EPOCHS = 50  # stop after 50 epochs without a better validation loss
MAX_EPOCHS = 200  # an upper bound: early stopping usually ends the run sooner
SAMPLE_EPOCHS = 10  # a PNG of input / target / restoration every 10 epochs


def train_cubes(config: ml_collections.ConfigDict) -> int:
    """Training cubes discovery writes: classes x training instances x resolutions."""
    w = config.discovery.words
    return config.model.num_classes * w.train_instances * (1 + w.extra_resolutions)


def set_epoch_cadences(config: ml_collections.ConfigDict, cubes: int) -> None:
    """Express the reference's epoch-based schedule in steps for `config.train.batch_size`.

    One evaluation (and checkpoint) per epoch, so `patience` counts (about) epochs.
    """
    t = config.train
    per_epoch = cubes / t.batch_size  # steps per epoch; batches cross epoch boundaries
    t.eval_every = max(1, math.floor(per_epoch))
    t.checkpoint_every = t.eval_every
    t.decay_every = max(1, round(DECAY_EPOCHS * per_epoch))
    t.steps = max(1, round(MAX_EPOCHS * per_epoch))
    t.sample_every = max(1, round(SAMPLE_EPOCHS * per_epoch))
    t.patience = max(1, round(PATIENCE_EPOCHS * per_epoch / t.eval_every))  # evaluations


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = load_module(Path(__file__).with_name("demo.py")).get_config()
    del config.synthesize  # real data: no phantoms
    config.seed = 0
    config.stages = ("discover", "pretrain", "export")

    config.model.name = "ynet3d"  # TransVW: U-Net + visual-word head
    config.model.width = 32  # the reference network (33.3M parameters with 44 classes)
    # The paper's 44 visual-word classes. Discovery extracts this many classes and writes
    # the count into the store's manifest; pretraining checks that model.num_classes
    # matches the store and stops at once, naming the value to set, when it does not.
    config.model.num_classes = 44
    config.model.bn = "reference"
    config.model.dtype = "float32"  # "bfloat16" on accelerators (GPUs since A100, TPUs)
    config.model.conv_impl = "auto"  # onednn (or matmul) on CPU, xla3d on GPU/TPU

    config.data.cube_shape = (64, 64, 32)  # X, Y, Z: the reference cube
    config.data.source = "store"  # the store discovery writes to <workdir>/store
    config.data.store_dir = ""  # "" = <workdir>/store
    config.data.released_dir = ""
    config.data.released_resolutions = (1, 2, 3)
    config.data.released_folds = ()
    config.data.num_threads = 8  # parallel reads per process
    config.data.prefetch = 16  # read-ahead, in loader elements: per-process batches

    # Self-discovery at the reference settings.
    config.discovery = discovery.default_config()
    config.discovery.volumes_dir = "/data/luna16"  # placeholder: every subset's .mhd/.raw, one folder
    config.discovery.normalization = "ct"  # HU window [-1000, 1000] -> [0, 1]
    # () keeps each scan's own spacing, as the reference does by default (LUNA16: ~0.6-0.9 mm
    # in-plane, 0.6-2.5 mm slices). (1.0, 1.0, 2.0) or (2.0, 2.0, 2.0) resamples (the original
    # code's 2 mm example); the border below is in voxels, so shrink it with the spacing: a
    # 512-voxel slice at 0.7 mm is ~180 voxels at 2 mm, too few for a 100-voxel border.
    config.discovery.spacing = ()
    config.discovery.val_fraction = 0.2  # of 888 scans: ~710 training, ~178 validation patients
    config.discovery.seed = 0
    config.discovery.autoencoder.size = (128, 128, 64)  # whole volumes resized to this
    config.discovery.autoencoder.width = 32
    config.discovery.autoencoder.steps = 20_000  # ~180 passes over LUNA16's 888 scans at batch 8
    config.discovery.autoencoder.batch_size = 8
    config.discovery.autoencoder.learning_rate = 1e-3
    w = config.discovery.words
    w.train_instances = 200  # nearest training patients per class (reference patient included)
    w.val_instances = 30  # nearest validation patients per class
    w.border = (100, 100, 30)  # voxels kept free around a coordinate in the reference patient
    w.min_distance = 5.0  # voxels between the coordinates of two classes
    # The Models Genesis air filter, at its defaults: a cube is rejected when more than
    # 0.15 of it lies above the first voxel brighter than -150 HU (0.425 on [0, 1]).
    w.air_threshold = 0.425
    w.max_air_score = 0.15
    w.max_tries = 200
    w.extra_resolutions = 2  # two more cubes per instance, resized to 64x64x32
    w.extra_size = (50, 80)  # their in-plane crop size, [low, high)
    w.extra_offset = (-10, 10)  # their in-plane offset, [low, high)

    # Pretraining (REFERENCE.md section 4).
    config.train = train.default_config()
    t = config.train
    t.objective = "transvw"  # restoration + visual-word classification
    t.optimizer = "adam"
    t.learning_rate = 1e-3
    t.batch_size = 64  # global; the reference's 64 (8-12 in some of its configs)
    t.lambda_rec = 1.0
    t.lambda_cls = 0.01
    t.schedule = "step"  # x decay_factor every decay_every steps
    t.decay_factor = 0.5
    t.warmup_steps = 0
    t.log_every = 50
    t.eval_batches = 0  # the whole validation split at every evaluation
    t.keep_checkpoints = 3  # plus <workdir>/best, the best by validation loss (what export writes)
    t.seed = 0
    # 26,400 cubes / 64 = 412.5 steps per epoch ->
    #   eval_every = checkpoint_every = 412 (one epoch)
    #   decay_every = round(40 * 412.5) = 16,500   (x0.5 every 40 epochs)
    #   patience = round(50 * 412.5 / 412) = 50 evaluations (50 epochs)
    #   steps = round(200 * 412.5) = 82,500 (200 epochs at most)
    #   sample_every = round(10 * 412.5) = 4,125
    set_epoch_cadences(config, train_cubes(config))

    config.parallel = parallel.default_config()  # auto: joins a multi-process job if launched as one
    config.transforms = transforms.default_config("transvw")  # elastic + one of four transforms

    config.export.formats = ("pt", "safetensors")  # pt needs the torch extra
    config.export.head = True  # include the visual-word head (clc_out.*)

    if arg == "released":
        # The released TransVW cubes (train_data{r}_vwGen_ex_ref_fold{k}.0.npy + labels):
        # no discovery. Labels are read from the files; each fold holds a block of 50
        # classes, so num_classes = 50 * folds, assuming the folds' labels follow each other
        # (pretraining reads the true count, max label + 1, and stops naming the value to
        # set if it differs). Use more folds with e.g.
        #   --config.data.released_folds="(1, 2)" --config.model.num_classes=100
        config.stages = ("pretrain", "export")
        config.data.source = "released"
        config.data.released_dir = "/data/TransVW_data"  # placeholder: override
        config.data.released_resolutions = (1, 2, 3)  # validation uses resolution 1 only
        config.data.released_folds = (1,)
        config.model.num_classes = 50 * len(config.data.released_folds)
        # The released set's size is not known here: the epoch cadences above assume 26,400
        # cubes. With N training cubes, set decay_every = 40 * N / 64 and eval_every = N / 64.
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: released")
    return config
