import json

import pytest
import torch

from tests.conftest import assert_complete_model_folder, kill_at_random_moments, run_cli


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_prune_writes_model_strategy_and_report_then_eval_reads_them(tmp_path):
    out = tmp_path / "r20"
    result = run_cli("prune", "--model", "resnet20", "--keep", "0.5", "--select", "l1",
                     "--reconstruct", "neuron-merging", "--calib", "none", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "top-1 test-lossless (1017) %" in result.stdout and "91.64" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["base"]["accuracy"]["test-lossless"] == pytest.approx(91.64, abs=0.1)
    assert report["base"]["accuracy"]["test-jpeg"] == pytest.approx(81.03, abs=0.1)
    assert 0.49 < report["ratios"]["macs"] < 0.52
    assert report["images"] == {"test-lossless": 1017, "test-jpeg": 10000}
    pruned_acc = report["pruned"]["accuracy"]["test-lossless"]
    assert 10 < pruned_acc < 91.64   # ResNet-20 has little redundancy: 15.4% here
    strategy = json.loads((out / "strategy.json").read_text())
    assert strategy["model"] == "resnet20" and len(strategy["layers"]) == 9

    again = run_cli("prune", "--strategy", out / "strategy.json", "--out", tmp_path / "again",
                    "--no-onnx")
    assert again.returncode == 0, again.stderr
    a = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "again" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    evaluated = run_cli("eval", out)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"test-lossless (1017): {pruned_acc:.2f}%" in evaluated.stdout


def test_eval_zoo_model_on_user_data(tmp_path, lossless):
    import numpy as np
    np.savez(tmp_path / "few.npz", x=lossless.x[:100], y=lossless.y[:100])
    result = run_cli("eval", "--model", "resnet20", "--data", tmp_path / "few.npz")
    assert result.returncode == 0, result.stderr
    assert "few (100):" in result.stdout


def test_models_lists_the_zoo():
    result = run_cli("models")
    assert result.returncode == 0
    assert "resnet56" in result.stdout and "27" in result.stdout
    assert "mobilenetv2" in result.stdout and "none ship" in result.stdout


def test_prune_killed_at_any_moment_leaves_no_folder_or_a_complete_one(tmp_path):
    """kill -9 at moments spread over a prune's life: --out is absent or complete, and a
    scratch folder left behind is cleaned by the next run."""
    args = ["prune", "--model", "resnet20", "--keep", "0.5", "--calib", "none", "--no-eval",
            "--no-onnx", "--fidelity-images", "0"]  # a first run that fills a cache is no timer
    kill_at_random_moments(args, tmp_path)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    again = run_cli(*args, "--out", tmp_path / "out0", "--force")
    assert again.returncode == 0, again.stderr
    assert_complete_model_folder(tmp_path / "out0")
    assert not [p for p in tmp_path.glob(".out0.*") if p in leftovers]
