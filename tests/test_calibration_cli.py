"""The calibration through the real CLI: no dataset present, replay, synth, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from autodfp.data import shared_dir
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error

TINY = ("--calib-images", "24", "--synth-steps", "4")


@pytest.fixture
def weights_only(tmp_path):
    """A shared folder with the ResNet-20 weights and no dataset at all."""
    models = tmp_path / "weights-only" / "models" / "cifar10"
    models.mkdir(parents=True)
    shutil.copy(shared_dir() / "models" / "cifar10" / "resnet20-12fca82f.th", models)
    return {"AUTODFP_SHARED": str(models.parents[1]), "AUTODFP_CACHE": str(tmp_path / "cache")}


def test_prune_with_no_dataset_present_calibrates_and_replays_bit_identically(
        tmp_path, weights_only):
    out = tmp_path / "calibrated"
    result = run_cli("prune", "--model", "resnet20", "--keep", "0.5", "--no-eval", *TINY,
                     "--no-onnx", "--out", out, env=weights_only)
    assert result.returncode == 0, result.stderr
    assert "accuracy not measured: no image was read" in result.stdout
    assert "calibration=refit on 24 synthetic images" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == {} and report["calibration"] == "refit"
    assert len(report["refitted"]) == 18 and 0.49 < report["ratios"]["macs"] < 0.52
    strategy = json.loads((out / "strategy.json").read_text())
    assert strategy["calibration"]["count"] == 24 and strategy["calibration"]["images"] == "synthetic"

    again = run_cli("prune", "--strategy", out / "strategy.json", "--no-eval", "--no-onnx",
                    "--out", tmp_path / "again", env=weights_only)
    assert again.returncode == 0, again.stderr
    a = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "again" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_synth_writes_images_a_grid_and_their_settings(tmp_path):
    out = tmp_path / "synth"
    result = run_cli("synth", "--model", "resnet20", "--count", "16", "--steps", "3",
                     "--out", out, env={"AUTODFP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    images = torch.load(out / "images.pt", weights_only=True)
    assert images.shape == (16, 3, 32, 32)
    meta = json.loads((out / "synth.json").read_text())
    assert meta["config"]["count"] == 16 and meta["config"]["steps"] == 3
    from PIL import Image
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (16 * 34 * 2, 34 * 2)
    again = run_cli("synth", "--model", "resnet20", "--count", "16", "--steps", "3",
                    "--out", tmp_path / "synth2", env={"AUTODFP_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr
    assert torch.equal(images, torch.load(tmp_path / "synth2" / "images.pt", weights_only=True))


def test_bad_calibration_data_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((30, 16, 16, 3), dtype=np.uint8))
    gray = tmp_path / "gray.npz"
    np.savez(gray, x=np.zeros((30, 32, 32, 1), dtype=np.uint8))
    few = tmp_path / "few.npz"
    np.savez(few, x=np.zeros((5, 32, 32, 3), dtype=np.uint8))
    for data, fragment in ((empty, "holds no images"), (small, "the model takes 32x32"),
                           (gray, "must be uint8 (N,H,W,3)"),
                           (few, "holds 5 images; calibration asks for 24")):
        out = tmp_path / f"out-{data.stem}"
        result = run_cli("prune", "--model", "resnet20", "--keep", "0.5", "--calib-data", data,
                         "--calib-images", "24", "--no-eval", "--out", out)
        assert_one_line_error(result, fragment)
        assert not out.exists()
    strategy = tmp_path / "s.json"
    run_cli("prune", "--model", "resnet20", "--keep", "0.9", "--calib", "none", "--no-eval",
            "--no-onnx", "--out", tmp_path / "plain")
    shutil.copy(tmp_path / "plain" / "strategy.json", strategy)
    result = run_cli("prune", "--strategy", strategy, "--calib", "refit", "--out", tmp_path / "x")
    assert_one_line_error(result, "a strategy file fixes its calibration")
