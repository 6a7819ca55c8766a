"""The base config: every key a stage reads, with its default and what it means.

Every shipped config (configs/demo.py, demo_finetune.py, luna16_*.py, tpu_pod.py) starts
from `get_config()` and sets only what differs, so this file is the one place to look up a
key. The defaults are the reference settings (docs/REFERENCE.md sections 4 and 5) where the
papers give one; the laptop-sized values live in the demo configs.

`transvw_jax.configuration.validate` checks a config built from this one before any stage
runs. Sizes are X, Y, Z voxels throughout.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The base config; the sections are filled by one helper each, in stage order."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # model initialisation (and the export of a fresh initialisation)
    # The stages run in this order: synthesize, synthesize_labeled, discover, pretrain,
    # export, finetune, label_efficiency (transvw_jax/stages.py). TransVW: discover, then
    # pretrain on the visual-word store it writes, then export the weights.
    config.stages = ("discover", "pretrain", "export")
    _model(config)
    _data(config)
    _train(config)
    _parallel(config)
    _synthesize(config)
    _discovery(config)
    _transforms(config)
    _export(config)
    _finetune(config)
    _experiment(config)
    _predict(config)
    return config


def _model(config: ml_collections.ConfigDict) -> None:
    m = config.model = ml_collections.ConfigDict()  # the network (transvw_jax/models)
    m.name = "ynet3d"  # unet3d (Models Genesis) | ynet3d (TransVW: U-Net + head) | encoder_classifier
    m.width = 32  # channels of the first level: 32 is the reference network
    m.num_classes = 44  # ynet3d / encoder_classifier: visual-word classes (the paper's 44)
    m.bn = "reference"  # reference: batch statistics also at evaluation, as the originals | standard
    m.dtype = "float32"  # compute dtype (weights stay float32); bfloat16 on accelerators
    # auto: chosen for the training mesh when the run starts (onednn or matmul on CPU,
    # xla3d on GPU/TPU); or one of xla3d | matmul | onednn.
    m.conv_impl = "auto"
    m.out_channels = 1  # unet3d only: output channels (fine-tuning sets the class count itself)
    m.activation = "sigmoid"  # unet3d only: sigmoid (restoration in [0, 1]) | none (logits)


def _data(config: ml_collections.ConfigDict) -> None:
    d = config.data = ml_collections.ConfigDict()  # what pretraining reads
    d.cube_shape = (64, 64, 32)  # the reference cube; each size divisible by 8 (three poolings)
    d.source = "store"  # store (written by discover) | released (the TransVW .npy files)
    d.store_dir = ""  # the visual-word store; "" = <workdir>/store
    d.released_dir = ""  # folder of train_data{r}_vwGen_ex_ref_fold{k}.0.npy files (source=released)
    d.released_resolutions = (1, 2, 3)  # released cube resolutions trained on (validation: 1 only)
    d.released_folds = ()  # released folds read; () = every fold found
    d.released_classes = 0  # keep labels below this (TransVW's train.py: 44); 0 = all
    d.num_threads = 2  # parallel reads per process
    d.prefetch = 4  # batches read ahead per process


def _train(config: ml_collections.ConfigDict) -> None:
    # Pretraining (docs/REFERENCE.md section 4): Adam 1e-3, batch 64, lambda_cls 0.01.
    t = config.train = ml_collections.ConfigDict()
    t.objective = "transvw"  # transvw (ynet3d: restoration + visual words) | genesis (unet3d: MSE)
    t.batch_size = 64  # GLOBAL: split over processes and devices, so it must divide by the devices
    # steps | epochs: the unit of steps, decay_every, warmup_steps, eval_every, checkpoint_every,
    # sample_every and patience. "epochs" (the reference's unit) is converted to steps of the
    # actual training data when training starts; log_every is always in steps.
    t.schedule_unit = "steps"
    t.steps = 10_000  # length of the run
    t.optimizer = "adam"  # adam | sgd (with momentum below)
    t.learning_rate = 1e-3  # peak learning rate (before lr_scaling)
    t.momentum = 0.9  # sgd only; 0 = plain SGD
    t.schedule = "step"  # constant | step (x decay_factor every decay_every) | cosine
    t.decay_every = 4000  # step schedule: decay period (the reference: every 40 epochs)
    t.decay_factor = 0.5  # step schedule: learning-rate factor per decay period
    t.warmup_steps = 0  # linear warm-up to the peak (step and cosine schedules)
    # none | sqrt | linear: the peak learning rate is learning_rate x (batch_size /
    # reference_batch_size) ** (0 | 1/2 | 1), for a batch far from the one the rate was tuned at.
    t.lr_scaling = "none"
    t.reference_batch_size = 64  # the global batch learning_rate was tuned at (the reference's)
    t.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off
    t.lambda_rec = 1.0  # weight of the restoration (MSE) loss
    t.lambda_cls = 0.01  # weight of the visual-word cross-entropy (transvw only)
    t.log_every = 50  # steps between progress lines and metric rows
    t.eval_every = 500  # between validation passes (early stopping and best/ follow them)
    t.eval_batches = 0  # validation batches per evaluation; 0 = the whole validation split
    t.checkpoint_every = 500  # between checkpoints (a run resumes from the latest)
    t.keep_checkpoints = 3  # periodic checkpoints kept (best/ is kept besides)
    t.sample_every = 1000  # between PNGs of input / target / restoration; 0 = never
    t.patience = 10  # evaluations without a better validation loss before stopping; 0 = never
    t.seed = 0  # data order, transforms and initialisation of the training run


def _parallel(config: ml_collections.ConfigDict) -> None:
    p = config.parallel = ml_collections.ConfigDict()  # devices, processes (transvw_jax/parallel.py)
    p.fsdp = 1  # devices per parameter shard; 1 = replicate the state (pure data parallelism)
    # auto: join a multi-process job when the environment describes one (TPU pod, SLURM,
    # JAX_COORDINATOR_ADDRESS), else run alone; environment: join from the environment or
    # fail; off: a single process; explicit: the three values below.
    p.distributed = "auto"
    p.coordinator_address = ""  # explicit: host:port of process 0
    p.num_processes = 1  # explicit: processes in the job
    p.process_id = 0  # explicit: this process's index
    # A process silent this long is lost: the others stop with a line naming it instead of
    # waiting in a collective for ever.
    p.heartbeat_timeout_s = 60
    # Compiled programs kept between runs, so a restart compiles nothing twice: "workdir" =
    # <workdir>/xla_cache, "off", or a directory (JAX_COMPILATION_CACHE_DIR takes precedence).
    p.compilation_cache = "workdir"


def _synthesize(config: ml_collections.ConfigDict) -> None:
    # The embedded data: procedural chest-CT-like phantoms written to <workdir>/volumes.
    s = config.synthesize = ml_collections.ConfigDict()
    s.count = 32  # phantoms written
    s.shape = (96, 96, 48)  # voxels per phantom
    s.spacing = (3.5, 3.5, 7.0)  # mm per voxel: a chest-sized field of view
    s.seed = 0  # which phantoms (patients)
    s.masks = False  # also write the nodule masks (volumes/masks/)
    # Labeled phantoms for fine-tuning: an nnU-Net raw dataset in <workdir>/labeled.
    s = config.synthesize_labeled = ml_collections.ConfigDict()
    s.count = 24  # cases written (split into training and validation by finetune.val_fraction)
    s.shape = (96, 96, 48)  # voxels per case
    s.spacing = (3.5, 3.5, 7.0)  # mm per voxel, as the pretraining phantoms
    s.seed = 1  # other patients than synthesize's (seed 0)


def _discovery(config: ml_collections.ConfigDict) -> None:
    # Self-discovery: volumes -> auto-encoder embeddings -> visual words -> the store.
    d = config.discovery = ml_collections.ConfigDict()
    # visual_words: TransVW self-discovery; random: Models Genesis cubes (random positions
    # that pass the air test, words.random_cubes_per_patient per patient, one class).
    d.mode = "visual_words"
    d.volumes_dir = ""  # the volumes read; "" = <workdir>/volumes, where synthesize writes
    d.normalization = "ct"  # ct (HU window [-1000, 1000] -> [0, 1]) | percentile (MRI) | none
    d.spacing = ()  # mm; () keeps each volume's spacing, (2.0, 2.0, 2.0) resamples to 2 mm
    d.val_fraction = 0.2  # patients kept for validation (the random split only)
    # Subset split: only the folders <volumes_dir>/<subset_pattern.format(n)> are read.
    # () = no subsets: the seeded random split of volumes_dir (also when volumes_dir holds
    # none of the named folders).
    d.train_subsets = ()  # subset numbers whose patients train, e.g. (0, 1, 2, 3, 4) for LUNA16
    d.val_subsets = ()  # subset numbers whose patients validate, e.g. (5, 6)
    d.subset_pattern = "subset{}"  # folder name of subset n ({} = n), relative to volumes_dir
    # ras: reoriented to RAS+; reference: the array as stored, transposed to (X, Y, Z), as
    # the original code reads LUNA16 (the orientation the released weights saw).
    d.orientation = "ras"
    d.seed = 0  # the patient split and the class references
    _autoencoder(d)
    _words(d)
    s = d.store = ml_collections.ConfigDict()  # the visual-word store written (data/store.py)
    s.dtype = "uint16"  # cube storage: uint16 | float16 | float32 (precision: data/store.py)
    s.records_per_shard = 1024  # cubes per file


def _autoencoder(d: ml_collections.ConfigDict) -> None:
    # The auto-encoder whose embeddings rank the patients (reference: 128x128x64, width 32).
    a = d.autoencoder = ml_collections.ConfigDict()
    a.size = (128, 128, 64)  # whole volumes are resized to this (each divisible by 8)
    a.width = 32  # U-Net width; an embedding has 16 * width dimensions
    a.steps = 2000  # training steps
    a.batch_size = 4  # volumes per step
    a.learning_rate = 1e-3  # Adam
    a.seed = 0  # initialisation and batch draws
    a.log_every = 10  # steps between progress lines
    a.checkpoint_every = 500  # steps between checkpoints (an interrupted training resumes)
    a.keep_checkpoints = 1  # checkpoints kept: only the latest is needed to resume or embed


def _words(d: ml_collections.ConfigDict) -> None:
    # Visual words (reference settings: 200 + 30 instances per class, borders 100/100/30).
    w = d.words = ml_collections.ConfigDict()
    w.train_instances = 200  # nearest training patients per class (the reference included)
    w.val_instances = 30  # nearest validation patients per class
    w.border = (100, 100, 30)  # voxels kept free around a coordinate in the reference patient
    w.min_distance = 5.0  # voxels between the coordinates of two classes
    w.air_threshold = 0.425  # -150 HU on the [-1000, 1000] HU window: "not air"
    w.max_air_score = 0.15  # the originals' lung_max: reject a cube whose mean air score is above
    w.max_tries = 200  # coordinate draws per class before its reference patient is redrawn
    w.extra_resolutions = 2  # more cubes per instance: larger crops resized to the cube
    w.extra_size = (50, 80)  # their in-plane crop size, [low, high)
    w.extra_offset = (-10, 10)  # their crop corner's in-plane offset from the cube's, [low, high)
    # discovery.mode = "random" (Models Genesis) only: cubes wanted per patient (the paper's scale).
    w.random_cubes_per_patient = 32


def _transforms(config: ml_collections.ConfigDict) -> None:
    # Restoration transforms of pretraining, TransVW's policy (configs/luna16_genesis.py sets
    # Models Genesis'): elastic deformation, then one of shuffle / non-linear / in- / out-paint.
    t = config.transforms = ml_collections.ConfigDict()
    t.policy = "transvw"  # transvw (one transform per cube) | genesis (transforms composed)
    # transvw: relative weights of shuffle, non-linear, in-paint, out-paint (0 disables one).
    t.choice_weights = (1.0, 1.0, 1.0, 1.0)
    e = t.elastic = ml_collections.ConfigDict()  # elastic deformation of the input (TransVW)
    e.enabled = True  # off in Models Genesis
    e.alpha = 991.0  # displacement scale
    e.sigma = 8.0  # smoothing of the displacement field, voxels
    e.impl = "auto"  # auto (native kernel on a one-device CPU, else pure JAX) | xla | native
    f = t.flip = ml_collections.ConfigDict()  # random flips of input and target (genesis)
    f.prob = 0.0  # probability of flipping a cube (Models Genesis: 0.4)
    f.max_flips = 3  # axes flipped at most
    s = t.local_shuffle = ml_collections.ConfigDict()  # local pixel shuffling
    s.prob = 0.5  # genesis: probability per cube
    s.num_blocks = 5  # blocks shuffled (Models Genesis: 10,000)
    t.nonlinear = ml_collections.ConfigDict()  # Bezier-curve intensity transform
    t.nonlinear.prob = 0.9  # genesis: probability per cube
    p = t.paint = ml_collections.ConfigDict()  # in- or out-painting (genesis)
    p.prob = 0.9  # probability of painting a cube
    p.inpaint_prob = 0.2  # of those, in-painting (else out-painting)
    t.in_paint = ml_collections.ConfigDict()  # in-painting: random blocks filled with noise
    t.in_paint.max_blocks = 1  # blocks at most (Models Genesis: 5); at least 1
    t.out_paint = ml_collections.ConfigDict()  # out-painting: all but some blocks filled with noise
    t.out_paint.max_extra_blocks = 0  # kept blocks beyond the first (Models Genesis: 4)
    # Cubes per device transformed together: -1 = the policy's CPU chunk on CPU, the whole
    # batch elsewhere; 0 = the whole batch; n = n cubes at a time.
    t.batch_chunk = -1


def _export(config: ml_collections.ConfigDict) -> None:
    e = config.export = ml_collections.ConfigDict()  # <workdir>/export/transvw.{pt,safetensors}
    e.formats = ("pt", "safetensors")  # files written; pt needs the torch extra (skipped without)
    e.head = True  # include the visual-word head (clc_out.*) when the model has one


def _finetune(config: ml_collections.ConfigDict) -> None:
    # Fine-tuning (docs/REFERENCE.md section 5): Adam 1e-3, patience 15 evaluations, 64x64x32.
    f = config.finetune = ml_collections.ConfigDict()
    f.task = "segmentation"  # segmentation (UNet3D) | classification (EncoderClassifier)
    # Labeled data (segmentation): an nnU-Net v2 raw dataset, or two folders + num_classes.
    f.dataset_dir = ""  # nnU-Net raw dataset; "" = <workdir>/labeled (synthesize_labeled)
    f.images_dir = ""  # or: a folder of images ...
    f.labels_dir = ""  # ... and one of label maps with the same names
    f.num_classes = 0  # classes incl. background; 0 = from dataset.json (classification: the CSV)
    f.candidates_csv = ""  # classification: volume,x,y,z,label rows
    f.normalization = "ct"  # ct (HU window) | percentile: patches are cached in [0, 1]
    # ras: volumes reoriented to RAS+; reference: as stored, transposed to (X, Y, Z), as the
    # original TransVW / Models Genesis code reads LUNA16.
    f.orientation = "ras"
    f.patch_shape = (64, 64, 32)  # training and inference patch; each divisible by 8
    f.foreground_fraction = 0.33  # patches centred on foreground (nnU-Net's oversampling)
    f.patches_per_case = 64  # training patches per case and epoch
    f.val_patches_per_case = 8  # fixed validation patches per case
    f.val_fraction = 0.2  # cases (classification: volumes) held out, drawn with split_seed
    f.split_seed = 0  # the training / validation split
    f.label_fraction = 1.0  # of the training cases used (nested: 10% within 25% for one seed)
    f.flip_prob = 0.5  # per axis; the same flips on image and label
    f.init = "pretrained"  # scratch | pretrained
    f.pretrained = ""  # pretraining workdir, or .pt / .pth / .safetensors / .h5 weights; "" = this workdir
    f.load = ("encoder", "decoder", "output")  # parts copied; classification: encoder (+ head)
    f.freeze_encoder = False  # train everything but the (pretrained) encoder
    f.run_dir = "finetune"  # the run's folder, under the workdir
    i = f.inference = ml_collections.ConfigDict()  # sliding windows over whole validation cases
    i.overlap = 0.5  # fraction of a window shared with its neighbour
    i.batch_size = 4  # windows per forward pass
    i.blending = "gaussian"  # how overlapping windows are averaged: gaussian | constant
    # The loop's keys are pretraining's (config.train); these differ.
    t = f.train = config.train.copy_and_resolve_references()
    t.objective = "finetune"  # a marker: the objective follows finetune.task
    t.schedule = "constant"  # no decay
    t.batch_size = 8  # global, as train.batch_size
    t.steps = 2000  # length of one fine-tuning run
    t.eval_every = 100  # between validation passes
    t.checkpoint_every = 100  # between checkpoints
    t.log_every = 10  # between progress lines
    t.patience = 15  # evaluations without a better validation loss before stopping
    t.sample_every = 0  # no restoration PNGs: fine-tuning does not restore


def _experiment(config: ml_collections.ConfigDict) -> None:
    # The label-efficiency grid (stage label_efficiency): one fine-tuning run per point.
    e = config.experiment = ml_collections.ConfigDict()
    e.label_fractions = (0.1, 0.25, 1.0)  # finetune.label_fraction values
    e.inits = ("scratch", "pretrained")  # finetune.init values
    e.seeds = (0, 1)  # finetune.train.seed values (mean +- sd over them)
    e.metric = ""  # the table's metric; "" = dice_class1 (segmentation) or auc (classification)


def _predict(config: ml_collections.ConfigDict) -> None:
    # New scans through the fine-tuned network (stage predict, transvw_jax/predict.py), read
    # as fine-tuning reads its data (finetune.normalization, orientation, patch_shape,
    # inference): run it with the fine-tuning config and workdir.
    p = config.predict = ml_collections.ConfigDict()
    # segmentation: a folder of volumes (an nnU-Net imagesTs folder: case_0000.nii.gz is case
    # "case") or one volume; classification: a volume,x,y,z[,label] candidates CSV.
    p.input = ""
    p.output = ""  # masks/, probabilities/, overlays/, report.json; "" = <workdir>/predict
    p.weights = ""  # a fine-tuning run folder or .pt/.safetensors/.h5 file; "" = <workdir>/<finetune.run_dir>
    p.labels = ""  # segmentation: label maps named like the cases (labelsTs): Dice / IoU in report.json
    p.save_probabilities = False  # also write the class probabilities, float16 .npz per scan
