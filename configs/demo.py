"""The embedded default: runs end to end on a laptop CPU.

Run:
  python -m transvw_jax.main --config configs/demo.py --workdir runs/demo
A tiny variant (width 4) for smoke tests:
  python -m transvw_jax.main --config configs/demo.py:runlocal --workdir runs/tiny
Override any value on the command line, e.g. --config.model.width=16.

Stages available today: synthesize (procedural phantoms -> <workdir>/volumes), discover
(self-discovery -> <workdir>/store, the visual-word store), export (writes
<workdir>/export/transvw.{pt,safetensors} from the latest checkpoint in <workdir>, or from
a fresh initialisation with a warning). Run a subset with
--config.stages="('discover',)".
"""

import ml_collections

from transvw_jax import discovery, parallel, train, transforms


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = ("synthesize", "discover", "pretrain", "export")

    config.model = ml_collections.ConfigDict()
    config.model.name = "ynet3d"  # unet3d (Models Genesis) | ynet3d (TransVW) | encoder_classifier
    # 32 is the reference network (configs/luna16_transvw.py); 8 keeps the demo's
    # pretraining to minutes on a laptop CPU (1/16 of the FLOPs).
    config.model.width = 8
    config.model.num_classes = 16  # visual-word classes (ignored by unet3d); the paper: 44+
    config.model.bn = "reference"  # reference: batch statistics also at eval | standard
    config.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    config.model.conv_impl = "auto"  # onednn or matmul on CPU, xla3d on GPU/TPU; or any of those

    config.data = ml_collections.ConfigDict()
    # X, Y, Z; each divisible by 8. The reference cube is 64x64x32 (configs/luna16_*.py);
    # the demo uses 32x32x16 so that pretraining takes minutes on a laptop CPU.
    config.data.cube_shape = (32, 32, 16)
    config.data.source = "store"  # store (written by discover) | released (the TransVW .npy files)
    config.data.store_dir = ""  # "" = <workdir>/store
    config.data.released_dir = ""  # folder of train_data{r}_vwGen_ex_ref_fold{k}.0.npy files
    config.data.released_resolutions = (1, 2, 3)
    config.data.released_folds = ()  # () = every fold found
    config.data.released_classes = 0  # keep labels below this (TransVW's train.py: 44); 0 = all
    config.data.num_threads = 2  # parallel reads per process
    config.data.prefetch = 4  # batches read ahead per process

    # Pretraining (docs/REFERENCE.md section 4: Adam 1e-3, batch 64, lambda_cls 0.01, x0.5 every
    # 40 epochs, patience 50 epochs), scaled down to minutes on a laptop CPU.
    config.train = train.default_config()
    config.train.batch_size = 8
    config.train.steps = 100
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.train.sample_every = 50
    config.train.decay_every = 1000

    config.parallel = parallel.default_config()

    # The embedded data: procedural chest-CT-like phantoms written to <workdir>/volumes.
    config.synthesize = ml_collections.ConfigDict()
    config.synthesize.count = 32
    config.synthesize.shape = (96, 96, 48)  # X, Y, Z voxels
    config.synthesize.spacing = (3.5, 3.5, 7.0)  # mm: a chest-sized field of view
    config.synthesize.seed = 0
    config.synthesize.masks = False  # also write the nodule masks (volumes/masks/)

    # Self-discovery (docs/REFERENCE.md section 4), scaled down from the reference settings
    # (128x128x64 auto-encoder at width 32, 200 + 30 instances, borders 100/100/30) so that
    # it runs in a few minutes on a laptop CPU.
    config.discovery = discovery.default_config()
    config.discovery.autoencoder.size = (32, 32, 16)
    config.discovery.autoencoder.width = 4
    config.discovery.autoencoder.steps = 100
    config.discovery.autoencoder.batch_size = 4
    config.discovery.words.train_instances = 8
    config.discovery.words.val_instances = 3
    config.discovery.words.border = (16, 16, 8)
    config.discovery.words.extra_size = (25, 40)  # the reference's [50, 80) for 64-voxel cubes
    config.discovery.words.extra_offset = (-5, 5)
    # The reference's air filter (0.15: keep cubes that are mostly lung or air) rejects every
    # cube of these small phantoms, whose lungs are narrower than a cube; 0.6 admits enough.
    config.discovery.words.max_air_score = 0.6

    # Restoration transforms (used by pretraining): one sub-dict per transform; the
    # Models Genesis settings are transforms.default_config("genesis").
    config.transforms = transforms.default_config("transvw")

    config.export = ml_collections.ConfigDict()
    config.export.formats = ("pt", "safetensors")  # pt needs the torch extra
    config.export.head = True  # include the visual-word head (clc_out.*)

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
