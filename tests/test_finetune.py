"""Fine-tuning: weight transfer, losses, patch sources, whole runs, the label-efficiency stage."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from transvw_jax import checkpointing, configuration, evaluation, export, finetune, losses
from transvw_jax.data import labeled, patches, synthetic
from transvw_jax.errors import CheckpointError, ConfigError
from transvw_jax.models import EncoderClassifier, UNet3D, YNet3D, init_variables

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from conftest import zeros_like_model  # noqa: E402

from configs import demo_finetune  # noqa: E402

WIDTH = 4


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(dict(tree))).items()}


@pytest.fixture(scope="module")
def pretrained_ynet():
    """YNet3D variables with every array perturbed (BN scales and biases start as constants,
    which a fresh model would share)."""
    model = YNet3D(num_classes=3, width=WIDTH)
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda a: (a + rng.uniform(0.1, 0.2, a.shape)).astype(a.dtype),
                        jax.device_get(init_variables(model, jax.random.key(7))))


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory, pretrained_ynet):
    """A workdir holding a pretraining checkpoint (as the pretrain stage leaves it)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    checkpointing.save(workdir, 3, pretrained_ynet)
    return workdir


@pytest.fixture(scope="module")
def labeled_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("labeled")
    synthetic.write_labeled_dataset(directory, 6, shape=(32, 32, 16), seed=1, spacing=(10.0, 10.0, 20.0))
    return directory


def tiny_config(labeled_dir, pretrained, **finetune_overrides):
    config = demo_finetune.get_config("runlocal")
    config.finetune.dataset_dir = str(labeled_dir)
    config.finetune.pretrained = str(pretrained)
    config.finetune.train.steps = 2
    config.finetune.update(finetune_overrides)
    return config


# --------------------------------------------------------------------------- weights


def test_pretrained_weights_land_in_encoder_and_decoder_not_in_the_new_output(pretrained_ynet):
    fresh = jax.device_get(init_variables(UNet3D(out_channels=2, width=WIDTH, activation="none"),
                                          jax.random.key(0)))
    merged, report = finetune.transfer(fresh, pretrained_ynet, ("encoder", "decoder", "output"))
    got, before, source = flat(merged), flat(fresh), flat(pretrained_ynet)
    for key, value in got.items():
        if key.split("/")[1].startswith(("down_tr", "up_tr")):
            np.testing.assert_array_equal(value, source[key], err_msg=key)
            assert not np.array_equal(value, before[key]), key
        else:  # out_tr: 2 classes here, 1 restoration channel there -> kept fresh
            assert key.startswith("params/out_tr/")
            np.testing.assert_array_equal(value, before[key])
    assert sorted(report["reinitialised"]) == ["params/out_tr/final_conv/bias",
                                               "params/out_tr/final_conv/kernel"]
    assert len(report["loaded"]) == len(got) - 2


def test_encoder_only_leaves_the_decoder_fresh(pretrained_ynet):
    fresh = jax.device_get(init_variables(UNet3D(out_channels=1, width=WIDTH), jax.random.key(0)))
    merged, report = finetune.transfer(fresh, pretrained_ynet, ("encoder",))
    got, before = flat(merged), flat(fresh)
    assert all(k.split("/")[1].startswith("down_tr") for k in report["loaded"])
    for key in report["fresh"]:
        np.testing.assert_array_equal(got[key], before[key])
    assert any("up_tr" in k for k in report["fresh"])


def test_classifier_takes_the_head_conv_and_reinitialises_the_dense(pretrained_ynet):
    fresh = jax.device_get(init_variables(EncoderClassifier(num_classes=1, width=WIDTH), jax.random.key(0)))
    merged, report = finetune.transfer(fresh, pretrained_ynet, ("encoder", "head"))
    got, source = flat(merged), flat(pretrained_ynet)
    np.testing.assert_array_equal(got["params/clc_out/conv1/kernel"], source["params/clc_out/conv1/kernel"])
    assert "params/clc_out/fc1/kernel" in report["reinitialised"]
    assert got["params/clc_out/fc1/kernel"].shape == (32 * WIDTH, 1)


def test_transfer_errors_name_the_key(pretrained_ynet):
    wider = zeros_like_model(UNet3D(width=2 * WIDTH))
    with pytest.raises(CheckpointError, match=r"ckpt: params/down_tr\d+/.* has shape .* model.width"):
        finetune.transfer(wider, pretrained_ynet, ("encoder",), source="ckpt")
    encoder_only = zeros_like_model(EncoderClassifier(num_classes=2, width=WIDTH))
    unet = zeros_like_model(UNet3D(width=WIDTH))
    with pytest.raises(CheckpointError, match=r"has no params/up_tr.* to load the decoder"):
        finetune.transfer(unet, encoder_only, ("encoder", "decoder"))


def test_read_pretrained_from_a_workdir_and_from_an_export(pretrain_workdir, pretrained_ynet, tmp_path):
    where, from_ckpt = finetune.read_pretrained(pretrain_workdir)
    assert where.endswith("checkpoints/3")
    path = export.save(tmp_path / "w.safetensors", pretrained_ynet)
    _, from_file = finetune.read_pretrained(path)
    for a, b in ((from_ckpt, pretrained_ynet), (from_file, pretrained_ynet)):
        fa, fb = flat(a), flat(b)
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_allclose(fa[k], fb[k], rtol=0, atol=0, err_msg=k)
    with pytest.raises(CheckpointError, match="no best/ or checkpoints/"):
        finetune.read_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such pretraining workdir"):
        finetune.read_pretrained(tmp_path / "missing")


# --------------------------------------------------------------------------- losses


def test_segmentation_terms_and_soft_dice_on_hand_computed_cases():
    labels = jnp.zeros((1, 4, 4, 2), jnp.int32).at[0, :2].set(1)  # 16 of 32 voxels foreground
    perfect = jnp.where(jax.nn.one_hot(labels, 2) > 0, 50.0, -50.0)
    ce, inter, total = losses.segmentation_terms(perfect, labels, 2)
    assert float(ce[0]) < 1e-6
    assert float(losses.soft_dice(inter.sum(0), total.sum(0))) == pytest.approx(1.0, abs=1e-6)
    uniform = jnp.zeros((1, 4, 4, 2, 2))  # p = 1/2 everywhere
    ce, inter, total = losses.segmentation_terms(uniform, labels, 2)
    assert float(ce[0]) == pytest.approx(np.log(2.0), rel=1e-6)
    # foreground: intersection 16 * 0.5 = 8, total 32 * 0.5 + 16 = 32 -> Dice 0.5
    assert float(losses.soft_dice(inter.sum(0), total.sum(0))) == pytest.approx(0.5, rel=1e-5)


def test_classification_terms_binary_and_multiclass():
    loss, score = losses.classification_terms(jnp.array([[0.0], [100.0]]), jnp.array([1, 1]))
    np.testing.assert_allclose(loss, [np.log(2.0), 0.0], atol=1e-6)
    np.testing.assert_allclose(score, [0.5, 1.0], atol=1e-6)
    loss, probs = losses.classification_terms(jnp.zeros((1, 4)), jnp.array([2]))
    np.testing.assert_allclose(loss, [np.log(4.0)], rtol=1e-6)
    assert probs.shape == (1, 4)


# --------------------------------------------------------------------------- data


def test_subsets_are_nested_and_seeded():
    names = [f"c{i}" for i in range(20)]
    small, large = finetune.subset_names(names, 0.1, 3), finetune.subset_names(names, 0.25, 3)
    assert len(small) == 2 and len(large) == 5 and set(small) <= set(large)
    assert finetune.subset_names(names, 0.1, 4) != small or finetune.subset_names(names, 0.25, 4) != large
    assert finetune.subset_names(names[:3], 0.1, 0) and len(finetune.subset_names(names, 1.0, 0)) == 20


def test_patch_source_is_deterministic_and_oversamples_foreground(labeled_dir, tmp_path):
    ds = labeled.read_nnunet(labeled_dir)
    cached = patches.cache_cases(ds.cases, 2, tmp_path / "cache")
    fg_only = patches.PatchSource(cached, (16, 16, 8), 24, foreground_fraction=1.0, seed=0)
    items = [fg_only[i] for i in range(len(fg_only))]
    assert all(it["cube"].shape == (16, 16, 8) and it["cube"].dtype == np.uint16 for it in items)
    with_fg = [i for i in range(len(fg_only)) if np.load(cached[i % len(cached)].foreground).size]
    assert with_fg
    assert all(items[i]["label"].any() for i in with_fg)
    again = patches.PatchSource(cached, (16, 16, 8), 24, foreground_fraction=1.0, seed=0)
    np.testing.assert_array_equal(again[5]["cube"], items[5]["cube"])
    big = patches.PatchSource(cached, (40, 40, 8), 2, foreground_fraction=0.0, seed=0)  # larger than the case
    assert big[0]["cube"].shape == (40, 40, 8) and big[0]["label"].shape == (40, 40, 8)


def test_a_changed_case_is_recached(labeled_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(labeled_dir, copy)
    case = labeled.read_nnunet(copy).cases[0]
    first = patches.cache_cases([case], 2, tmp_path / "cache")[0]
    before = np.load(first.label).sum()
    img = nib.load(case.label)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), case.label)
    patches.cache_cases([case], 2, tmp_path / "cache")
    assert before > 0 and np.load(first.label).sum() == 0


# --------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_segmentation_run_with_a_frozen_pretrained_encoder(labeled_dir, pretrain_workdir, pretrained_ynet,
                                                           tmp_path):
    """The encoder trains nothing and keeps exactly the pretrained arrays; the decoder moves;
    the run leaves a split, a pretrained report, a whole-volume evaluation and a summary, and
    resumes to more steps."""
    config = tiny_config(labeled_dir, pretrain_workdir, freeze_encoder=True, label_fraction=0.5)
    result = finetune.finetune(config, tmp_path)
    run_dir = tmp_path / "finetune"
    _, _, final = checkpointing.read_stored_variables(run_dir)  # best/, a trained step
    got, source = flat(final), flat(pretrained_ynet)
    encoder = [k for k in got if k.split("/")[1].startswith("down_tr")]
    assert any(k.startswith("batch_stats/") for k in encoder)  # bn="standard": running statistics too
    for key in encoder:
        np.testing.assert_array_equal(got[key], source[key], err_msg=key)
    assert any(not np.array_equal(got[k], source[k]) for k in got if k.startswith("params/up_tr"))
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["validation"]) == 2 and split["train_pool"] == 4 and len(split["train"]) == 2
    assert json.loads((run_dir / "pretrained.json").read_text())["source"].endswith("checkpoints/3")
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert sorted(report["cases"]) == split["validation"]
    for name in split["validation"]:
        mask = nib.load(run_dir / "eval" / "masks" / f"{name}.nii.gz")
        image = nib.load(labeled_dir / "imagesTr" / f"{name}_0000.nii.gz")
        np.testing.assert_allclose(mask.affine, image.affine)
        assert mask.shape == image.shape
        assert (run_dir / "eval" / "overlays" / f"{name}.png").is_file()
    assert set(result["final"]) == {"dice_class1", "iou_class1"} and result["step"] == 2
    assert json.loads((run_dir / "finetune_summary.json").read_text())["step"] == 2

    config.finetune.train.steps = 4  # resume from step 2
    assert finetune.finetune(config, tmp_path)["step"] == 4
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [2, 4]
    config.finetune.label_fraction = 1.0  # another split in the same run directory
    with pytest.raises(ConfigError, match="split.json: this run was started on another split"):
        finetune.finetune(config, tmp_path)
    config.finetune.label_fraction = 0.5
    config.finetune.foreground_fraction = 0.9  # other patches: resuming would mix two runs
    with pytest.raises(ConfigError, match="started with other finetune.foreground_fraction"):
        finetune.finetune(config, tmp_path)


@pytest.mark.slow
def test_classification_run_reports_auc(labeled_dir, pretrain_workdir, tmp_path):
    config = tiny_config(labeled_dir, pretrain_workdir, task="classification",
                         candidates_csv=str(labeled_dir / "candidates.csv"), load=("encoder",),
                         val_fraction=0.5)
    config.finetune.train.batch_size = 8
    result = finetune.finetune(config, tmp_path)
    report = json.loads((tmp_path / "finetune" / "eval" / "report.json").read_text())
    assert set(report["summary"]) == {"loss", "accuracy", "auc"}
    assert 0.0 <= report["summary"]["auc"] <= 1.0 and set(report["labels"]) == {0, 1}
    split = json.loads((tmp_path / "finetune" / "split.json").read_text())
    candidates = labeled.read_candidates(labeled_dir / "candidates.csv")
    val = [c for c in candidates if str(c.volume) in set(split["validation"])]
    assert report["labels"] == [c.label for c in val]  # every candidate once, padding dropped
    assert report["summary"]["auc"] == pytest.approx(evaluation.roc_auc(report["scores"], report["labels"]))
    assert result["final"] == report["summary"]


@pytest.mark.parametrize("key, value, message", [
    ("task", "detection", "finetune.task: 'detection' is not one of"),
    ("init", "imagenet", "finetune.init: 'imagenet'"),
    ("load", ("encoder", "neck"), "finetune.load: unknown part 'neck'"),
    ("label_fraction", 0.0, r"finetune.label_fraction must be in \(0, 1\]"),
    ("patch_shape", (16, 16, 12), "finetune.patch_shape must be 3 positive sizes divisible by 8"),
    ("normalization", "none", "finetune.normalization: 'none' is not one of"),
])
def test_config_errors_name_the_key(labeled_dir, pretrain_workdir, key, value, message):
    config = tiny_config(labeled_dir, pretrain_workdir)
    config.finetune[key] = value
    with pytest.raises(ConfigError, match=message):
        configuration.validate(config, stages=("finetune",))


def test_freezing_a_random_encoder_is_refused(labeled_dir, pretrain_workdir):
    config = tiny_config(labeled_dir, pretrain_workdir, freeze_encoder=True, init="scratch")
    with pytest.raises(ConfigError, match="freeze_encoder=True needs init='pretrained'"):
        configuration.validate(config, stages=("finetune",))


def test_experiment_is_checked_before_any_run(labeled_dir, tmp_path):
    config = tiny_config(labeled_dir, tmp_path / "no_pretraining")
    with pytest.raises(ConfigError, match="no_pretraining: no such pretraining workdir"):
        configuration.validate(config, stages=("label_efficiency",))
    config.finetune.pretrained = str(tmp_path)
    config.experiment.inits = ("scratch", "imagenet")
    with pytest.raises(ConfigError, match="experiment.inits: 'imagenet'"):
        configuration.validate(config, stages=("label_efficiency",))
    config.experiment.inits = ("scratch",)
    config.experiment.metric = "dcie"
    with pytest.raises(ConfigError, match="experiment.metric: 'dcie'"):
        configuration.validate(config, stages=("label_efficiency",))
    config.experiment.metric = ""
    config.experiment.seeds = ()
    with pytest.raises(ConfigError, match="must be non-empty"):
        configuration.validate(config, stages=("label_efficiency",))


def test_demo_finetune_config_validates(tmp_path):
    from transvw_jax import stages

    config = demo_finetune.get_config()
    config.finetune.pretrained = str(tmp_path)
    stages.validate(config)
    assert config.finetune.train.steps * config.finetune.train.batch_size >= 1000
    assert config.model.bn == "standard"


def test_classification_config_errors(labeled_dir, pretrain_workdir):
    config = tiny_config(labeled_dir, pretrain_workdir, task="classification")
    with pytest.raises(ConfigError, match="has no decoder or output"):
        configuration.validate(config, stages=("finetune",))
    config.finetune.load = ("encoder",)
    with pytest.raises(ConfigError, match="candidates_csv is empty"):
        configuration.validate(config, stages=("finetune",))


def test_class_count_disagreeing_with_dataset_json(labeled_dir, pretrain_workdir, tmp_path):
    config = tiny_config(labeled_dir, pretrain_workdir, num_classes=3)
    with pytest.raises(ConfigError, match="finetune.num_classes=3 but .*dataset.json lists 2 classes"):
        finetune.finetune(config, tmp_path)


@pytest.mark.slow
def test_label_efficiency_stage_from_the_command_line(labeled_dir, pretrain_workdir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "transvw_jax.main", "--config", "configs/demo_finetune.py:runlocal",
         "--workdir", str(tmp_path), f"--config.finetune.pretrained={pretrain_workdir}",
         "--config.experiment.label_fractions=(1.0,)", "--config.finetune.train.steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "label_efficiency.md").read_text().splitlines()
    assert table[0].startswith("| labels | training cases | init | dice_class1")
    assert [row.split("|")[3].strip() for row in table[2:]] == ["scratch", "pretrained"]
    rows = json.loads((tmp_path / "label_efficiency.json").read_text())["rows"]
    assert all(0.0 <= r["mean"] <= 1.0 for r in rows)
    assert "label efficiency table:" in proc.stderr


def test_orientation_is_validated_and_recorded_for_resume():
    config = demo_finetune.get_config()
    assert config.finetune.orientation == "ras"  # the default outside the LUNA16 configs
    configuration.validate(config, stages=("finetune",))
    config.finetune.orientation = "reference"
    configuration.validate(config, stages=("finetune",))
    assert "orientation" in finetune.RESUME_SETTINGS  # another orientation is other data
    config.finetune.orientation = "lps"
    with pytest.raises(ConfigError) as info:
        configuration.validate(config, stages=("finetune",))
    assert str(info.value) == "finetune.orientation: 'lps' is not one of ras, reference"
