import json

import pytest
import torch

from tests.conftest import run_cli


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


@pytest.mark.parametrize("args,fragment", [
    (["--model", "resnet57", "--keep", "0.5"], "unknown model 'resnet57'"),
    (["--model", "resnet20", "--keep", "1.5"], "keep ratio must be in (0, 1]"),
    (["--model", "resnet20", "--keep", "0"], "keep ratio must be in (0, 1]"),
    (["--model", "vgg16_bn", "--keep", "0.5"], "no pretrained weights ship"),
    (["--keep", "0.5"], "give --model and --keep"),
])
def test_prune_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    result = run_cli("prune", *args, "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_missing_shared_folder(tmp_path):
    result = run_cli("prune", "--model", "resnet20", "--keep", "0.5", "--out", tmp_path / "o",
                     env={"AUTODFP_SHARED": str(tmp_path / "missing")})
    assert_one_line_error(result, "shared data folder not found")
    assert not (tmp_path / "o").exists()


def test_mismatched_and_corrupt_checkpoints(tmp_path):
    from autodfp.models import get_spec
    wrong = get_spec("resnet32").default_checkpoint()
    result = run_cli("prune", "--model", "resnet20", "--checkpoint", wrong, "--keep", "0.5",
                     "--out", tmp_path / "o")
    assert_one_line_error(result, "unexpected key 'layer1.3.conv1.weight'")
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(get_spec("resnet20").default_checkpoint().read_bytes()[:5000])
    result = run_cli("prune", "--model", "resnet20", "--checkpoint", corrupt, "--keep", "0.5",
                     "--out", tmp_path / "o")
    assert_one_line_error(result, "cannot load checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.th"]


def test_non_empty_output_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    result = run_cli("prune", "--model", "resnet20", "--keep", "0.5", "--out", tmp_path / "out")
    assert_one_line_error(result, "not empty")


def test_eval_of_a_missing_folder():
    result = run_cli("eval", "/nonexistent/run")
    assert_one_line_error(result, "pruned model not found")
