"""The predict stage: fine-tuned weights on scans (or candidates) never seen in training."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from transvw_jax import checkpointing, configuration, evaluation, export, finetune, predict
from transvw_jax.data import labeled, synthetic, volumes
from transvw_jax.errors import CheckpointError, ConfigError, DataError
from transvw_jax.models import abstract_variables

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import demo_finetune  # noqa: E402

CONFIG = "configs/demo_finetune.py:runlocal"


@pytest.fixture(scope="module")
def labeled_dir(tmp_path_factory):
    """Six labeled phantoms (nnU-Net raw layout + candidates.csv), as fine-tuning's tests use."""
    directory = tmp_path_factory.mktemp("labeled")
    synthetic.write_labeled_dataset(directory, 6, shape=(32, 32, 16), seed=1, spacing=(10.0, 10.0, 20.0))
    return directory


@pytest.fixture(scope="module")
def test_set(labeled_dir, tmp_path_factory):
    """A held-out set as nnU-Net lays it out: imagesTs/<case>_0000.nii.gz and labelsTs/<case>.nii.gz."""
    root = tmp_path_factory.mktemp("Dataset002_Test")
    (root / "imagesTs").mkdir()
    (root / "labelsTs").mkdir()
    for i in (0, 1):
        shutil.copy(labeled_dir / "imagesTr" / f"phantom_{i:04d}_0000.nii.gz", root / "imagesTs")
        shutil.copy(labeled_dir / "labelsTr" / f"phantom_{i:04d}.nii.gz", root / "labelsTs")
    return root


def cli(workdir, *overrides, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "transvw_jax.main", "--config", CONFIG, "--workdir", str(workdir), *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def message_lines(proc):
    """The user-facing lines of stderr: those that are not absl log lines."""
    return [line for line in proc.stderr.splitlines() if line and not re.match(r"[IWEF]\d{4} ", line)]


def random_variables(model, seed=0):
    """Variables of `model` without compiling an initialisation: random weights, unit
    running variances (a valid BatchNorm)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "var":
            return np.ones(leaf.shape, np.float32)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_variables(model))


def thresholder(x):
    """Probabilities of 2 classes from the intensity alone: a voxel-wise function, so the
    sliding-window blend gives it back exactly."""
    p = (x > 0.5).astype(jnp.float32)
    return jnp.stack([1.0 - p, p], axis=-1)


# --------------------------------------------------------------------------- scans


def test_scans_are_named_as_nnunet_or_plain_folders_name_them(test_set, tmp_path):
    cases = predict.find_scans(test_set / "imagesTs", test_set / "labelsTs")
    assert [c.name for c in cases] == ["phantom_0000", "phantom_0001"]
    assert cases[0].label == test_set / "labelsTs" / "phantom_0000.nii.gz"
    assert all(c.label is None for c in predict.find_scans(test_set / "imagesTs"))
    # A second channel is not a case (fine-tuning reads channel 0000 only).
    multi = tmp_path / "imagesTs"
    shutil.copytree(test_set / "imagesTs", multi)
    shutil.copy(multi / "phantom_0000_0000.nii.gz", multi / "phantom_0000_0001.nii.gz")
    assert [c.name for c in predict.find_scans(multi)] == ["phantom_0000", "phantom_0001"]
    # A plain folder: numbered file names are scans, not channels.
    plain = tmp_path / "scans"
    plain.mkdir()
    for name in ("patient_0000.nii.gz", "patient_0001.nii.gz"):
        shutil.copy(multi / "phantom_0000_0000.nii.gz", plain / name)
    assert [c.name for c in predict.find_scans(plain)] == ["patient_0000", "patient_0001"]
    assert [c.name for c in predict.find_scans(plain / "patient_0001.nii.gz")] == ["patient_0001"]
    (one,) = predict.find_scans(test_set / "imagesTs" / "phantom_0001_0000.nii.gz", test_set / "labelsTs")
    assert one.name == "phantom_0001" and one.label == test_set / "labelsTs" / "phantom_0001.nii.gz"
    (test_set / "labelsTs" / "phantom_0001.nii.gz").rename(tmp_path / "moved.nii.gz")
    try:
        with pytest.raises(DataError, match=r"phantom_0001_0000.nii.gz: case 'phantom_0001' has no label "
                                            r".*labelsTs/phantom_0001.nii.gz \(predict.labels\)"):
            predict.find_scans(test_set / "imagesTs", test_set / "labelsTs")
    finally:
        (tmp_path / "moved.nii.gz").rename(test_set / "labelsTs" / "phantom_0001.nii.gz")
    empty = tmp_path / "root"
    (empty / "imagesTs").mkdir(parents=True)
    with pytest.raises(DataError, match="root: no volumes .*did you mean .*imagesTs"):
        predict.find_scans(empty)


@pytest.mark.parametrize("orientation", ["ras", "reference"])
def test_masks_and_probabilities_keep_the_input_shape_and_affine(tmp_path, orientation):
    """A scan stored neither in RAS+ order nor with a diagonal affine (axes swapped and
    mirrored): in either orientation the mask comes back in the file's voxel order with
    its affine, and voxel for voxel it is the prediction of that voxel."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (20, 12, 9)).astype(np.int16)
    affine = np.array([[0.0, -0.8, 0.0, 10.0], [0.7, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "scan.nii.gz"))
    cases = predict.find_scans(tmp_path / "scan.nii.gz")
    report = predict.segment_cases(thresholder, cases, 2, (8, 8, 8), tmp_path / "out",
                                   orientation=orientation, save_probabilities=True)
    assert report == {"cases": {}, "summary": {}} and not (tmp_path / "out" / "report.json").exists()
    mask = nib.load(tmp_path / "out" / "masks" / "scan.nii.gz")
    assert mask.shape == hu.shape
    np.testing.assert_allclose(mask.affine, affine)
    expected = volumes.normalize_ct(hu) > 0.5
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected.astype(np.uint8))
    saved = np.load(tmp_path / "out" / "probabilities" / "scan.npz")
    probs = saved["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == hu.shape + (2,)
    np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(probs[..., 1] > 0.5, expected)
    np.testing.assert_allclose(saved["affine"], affine)
    assert (tmp_path / "out" / "overlays" / "scan.png").is_file()
    assert not list((tmp_path / "out").rglob(".*tmp*"))


def test_labeled_cases_are_scored_like_the_masks_written(test_set, tmp_path):
    cases = predict.find_scans(test_set / "imagesTs", test_set / "labelsTs")
    report = predict.segment_cases(thresholder, cases, 2, (16, 16, 8), tmp_path)
    for case in cases:
        mask = np.asarray(nib.load(tmp_path / "masks" / f"{case.name}.nii.gz").dataobj)
        truth = np.asarray(nib.load(case.label).dataobj)
        for c in (0, 1):
            by_hand = 2.0 * np.sum((mask == c) & (truth == c)) / (np.sum(mask == c) + np.sum(truth == c))
            assert report["cases"][case.name]["dice"][c] == pytest.approx(by_hand, abs=1e-12)
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_candidate_labels_are_optional_for_prediction(tmp_path):
    (tmp_path / "c.csv").write_text("volume,x,y,z\nscan1.nii.gz,10,20,5\n")
    (rows,) = labeled.read_candidates(tmp_path / "c.csv", require_label=False)
    assert rows.label is None and rows.centre == (10, 20, 5)
    with pytest.raises(DataError, match=r"c.csv:2: expected volume,x,y,z,label"):
        labeled.read_candidates(tmp_path / "c.csv")  # fine-tuning still needs them
    (tmp_path / "d.csv").write_text("volume,x,y,z,label\na.nii.gz,1,2,3,\nb.nii.gz,1,2,3,1\n")
    assert [r.label for r in labeled.read_candidates(tmp_path / "d.csv", require_label=False)] == [None, 1]
    with pytest.raises(DataError, match=r"d.csv:2: expected"):
        labeled.read_candidates(tmp_path / "d.csv")


# --------------------------------------------------------------------------- weights and config


def test_class_count_and_task_come_from_the_output_layer():
    config = demo_finetune.get_config("runlocal")
    seg = random_variables(finetune.make_model(config, 3))
    assert predict.num_classes_of(seg, "segmentation", "w") == 3
    with pytest.raises(CheckpointError, match=r"w: no params/clc_out/fc1/kernel: .*are segmentation weights"):
        predict.num_classes_of(seg, "classification", "w")
    config.finetune.task = "classification"
    clf = finetune.make_model(config, 2)
    assert predict.num_classes_of(random_variables(clf), "classification", "w") == 2  # one logit
    config.model.width = 8
    with pytest.raises(CheckpointError, match=r"w: params/.* has shape .* \(another model.width\?\)"):
        predict.fit_to_model(random_variables(clf), finetune.make_model(config, 2), "w")
    restoration = random_variables(finetune.make_model(demo_finetune.get_config("runlocal"), 1))
    with pytest.raises(CheckpointError, match=r"w: the output layer has 1 channel: pretraining"):
        predict.num_classes_of(restoration, "segmentation", "w")


def test_a_run_fine_tuned_on_other_data_settings_is_refused(tmp_path):
    config = demo_finetune.get_config("runlocal")
    settings = {k: config.finetune[k] for k in ("task", "normalization", "orientation", "patch_shape")}
    (tmp_path / "split.json").write_text(json.dumps({"settings": {**settings, "orientation": "reference"}}))
    with pytest.raises(ConfigError, match=r"split.json: the weights were fine-tuned with "
                                          r"finetune.orientation='reference', this config has 'ras'"):
        predict._check_run_settings(tmp_path, config.finetune)
    (tmp_path / "split.json").write_text(json.dumps({"settings": settings}))
    predict._check_run_settings(tmp_path, config.finetune)


def predict_config(**predict_keys):
    config = demo_finetune.get_config("runlocal")
    config.stages = ("predict",)
    config.predict.update(predict_keys)
    return config


def test_predict_config_errors_name_the_key(test_set, tmp_path):
    with pytest.raises(ConfigError, match=r"^predict.input is empty: name a folder of volumes"):
        configuration.validate(predict_config())
    with pytest.raises(ConfigError, match=r"^predict.input=.*missing: no such file or directory"):
        configuration.validate(predict_config(input=str(tmp_path / "missing")))
    images = str(test_set / "imagesTs")
    with pytest.raises(ConfigError, match=r"^predict.labels=.*: no such directory"):
        configuration.validate(predict_config(input=images, labels=str(tmp_path / "nolabels")))
    with pytest.raises(ConfigError, match=r"^predict.weights=.*: no such fine-tuning run directory"):
        configuration.validate(predict_config(input=images, weights=str(tmp_path / "w.safetensors")))
    with pytest.raises(ConfigError, match=r"^config.predict.input=gs://b/x: cloud-storage URLs"):
        configuration.validate(predict_config(input="gs://b/x"))
    config = predict_config(input=images)
    config.finetune.task = "classification"
    with pytest.raises(ConfigError, match=r"^predict.input=.*imagesTs: not a file \(expected a candidates"):
        configuration.validate(config)
    configuration.validate(predict_config(input=images, labels=str(test_set / "labelsTs")))


def test_missing_input_fails_in_one_line_naming_the_key(tmp_path):
    proc = cli(tmp_path, "--config.stages=('predict',)", f"--config.predict.input={tmp_path / 'nowhere'}")
    assert proc.returncode == 2, proc.stderr
    expected = (f"error: predict.input={tmp_path / 'nowhere'}: no such file or directory "
                "(expected a folder of volumes (or an nnU-Net imagesTs folder) or one volume)")
    assert message_lines(proc) == [expected]


def test_no_weights_fails_in_one_line_saying_how_to_get_them(test_set, tmp_path):
    proc = cli(tmp_path, "--config.stages=('predict',)", f"--config.predict.input={test_set / 'imagesTs'}")
    assert proc.returncode == 1, proc.stderr
    (line,) = message_lines(proc)
    assert line.startswith(f"error: {tmp_path / 'finetune'}: no fine-tuned weights")
    assert "fine-tune first" in line


# --------------------------------------------------------------------------- through the command


@pytest.mark.slow
def test_finetune_then_predict_a_held_out_set(labeled_dir, test_set, tmp_path):
    """Fine-tune from scratch (a few steps), then predict imagesTs with labelsTs, in one
    command: masks overlay the scans, the report's Dice is the masks' Dice, probabilities
    sum to 1, a progress line appears."""
    out = tmp_path / "out"
    proc = cli(tmp_path, "--config.stages=('finetune', 'predict')",
               f"--config.finetune.dataset_dir={labeled_dir}", "--config.finetune.init=scratch",
               "--config.finetune.train.steps=2", f"--config.predict.input={test_set / 'imagesTs'}",
               f"--config.predict.labels={test_set / 'labelsTs'}", f"--config.predict.output={out}",
               "--config.predict.save_probabilities=True")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predict: 2/2 cases (100.0%)" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["cases"]) == ["phantom_0000", "phantom_0001"]
    assert set(report["summary"]) == {"dice_class0", "dice_class1", "iou_class0", "iou_class1"}
    for name in report["cases"]:
        image = nib.load(test_set / "imagesTs" / f"{name}_0000.nii.gz")
        mask = nib.load(out / "masks" / f"{name}.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine)
        truth = np.asarray(nib.load(test_set / "labelsTs" / f"{name}.nii.gz").dataobj)
        scores = evaluation.dice_iou(np.asarray(mask.dataobj), truth, 2)
        np.testing.assert_allclose(report["cases"][name]["dice"], scores["dice"], rtol=0, atol=1e-12)
        probs = np.load(out / "probabilities" / f"{name}.npz")["probabilities"].astype(np.float32)
        assert probs.shape == image.shape + (2,)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=2e-3)
        assert (out / "overlays" / f"{name}.png").is_file()
    record = json.loads((out / "predict.json").read_text())
    assert record["weights"].startswith(str(tmp_path / "finetune" / "best")) and record["num_classes"] == 2


@pytest.fixture(scope="module")
def classification_run(labeled_dir, tmp_path_factory):
    """Weights of a classification run (written with the fine-tuning API, untrained) in
    <workdir>/finetune, and the predict stage run on the candidates CSV through the command."""
    workdir = tmp_path_factory.mktemp("classification")
    config = demo_finetune.get_config("runlocal")
    config.finetune.task = "classification"
    variables = random_variables(finetune.make_model(config, 2), seed=3)
    checkpointing.save(workdir / "finetune", 1, variables)
    proc = cli(workdir, *CLASSIFICATION, f"--config.predict.input={labeled_dir / 'candidates.csv'}")
    return workdir, variables, proc


CLASSIFICATION = ("--config.stages=('predict',)", "--config.finetune.task=classification",
                  "--config.finetune.load=('encoder',)", "--config.finetune.candidates_csv=unused.csv")


def test_classification_candidates_through_the_command(classification_run, labeled_dir):
    """Probabilities per candidate row in the CSV's order and naming; AUC and accuracy of
    the labeled rows, computed from those probabilities."""
    workdir, _, proc = classification_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"predict: \d+/\d+ candidates \(100.0%\)", proc.stderr)
    given = list(csv.DictReader((labeled_dir / "candidates.csv").open()))
    rows = list(csv.DictReader((workdir / "predict" / "probabilities.csv").open()))
    assert list(rows[0]) == ["volume", "x", "y", "z", "probability", "label"]
    assert [[r[k] for k in ("volume", "x", "y", "z", "label")] for r in rows] == [
        [g[k] for k in ("volume", "x", "y", "z", "label")] for g in given]
    p = np.array([float(r["probability"]) for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    assert ((0 <= p) & (p <= 1)).all()
    report = json.loads((workdir / "predict" / "report.json").read_text())
    assert set(report["summary"]) == {"loss", "accuracy", "auc"} and report["labels"] == y.tolist()
    assert report["summary"]["auc"] == pytest.approx(evaluation.roc_auc(p, y), abs=1e-5)
    assert report["summary"]["accuracy"] == pytest.approx(np.mean((p > 0.5) == y))


@pytest.mark.slow
def test_unlabeled_candidates_with_an_exported_weights_file(classification_run, labeled_dir, tmp_path):
    """The same weights exported to a file give the same probabilities for the same rows
    without labels, and no report."""
    workdir, variables, _ = classification_run
    given = list(csv.DictReader((labeled_dir / "candidates.csv").open()))
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("volume,x,y,z\n" + "".join(
        f"{labeled_dir / g['volume']},{g['x']},{g['y']},{g['z']}\n" for g in given))
    weights = export.save(tmp_path / "clf.safetensors", variables)
    proc = cli(tmp_path, *CLASSIFICATION, f"--config.predict.input={unlabeled}",
               f"--config.predict.weights={weights}", f"--config.predict.output={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = list(csv.DictReader((tmp_path / "out" / "probabilities.csv").open()))
    assert list(again[0]) == ["volume", "x", "y", "z", "probability"]
    assert again[0]["volume"] == str(labeled_dir / given[0]["volume"])  # absolute stays absolute
    first = list(csv.DictReader((workdir / "predict" / "probabilities.csv").open()))
    np.testing.assert_allclose([float(r["probability"]) for r in again],
                               [float(r["probability"]) for r in first], atol=1e-5)
    assert not (tmp_path / "out" / "report.json").exists()
