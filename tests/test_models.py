import pytest
import torch

from autodfp.errors import AutoDFPError
from autodfp.measure.metrics import accuracy, model_cost
from autodfp.models import REGISTRY, build_model


@pytest.mark.parametrize("name,expected", [("resnet56", 92.72), ("resnet20", 91.64)])
def test_shipped_resnets_reach_their_measured_accuracy(name, expected, lossless):
    model, spec = build_model(name)
    assert accuracy(model, lossless, spec) == pytest.approx(expected, abs=0.1)


def test_resnet56_cost_matches_the_paper():
    model, spec = build_model("resnet56")
    cost = model_cost(model, spec)
    assert 124e6 < cost.macs < 128e6          # 125.5M conv+fc MACs, plus BN
    assert 0.84e6 < cost.params < 0.87e6


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_zoo_model_runs_untrained(name):
    model, spec = build_model(name, pretrained=False)
    classes = 1000 if spec.dataset == "imagenet" else 10
    assert model(spec.example_input(2)).shape == (2, classes)


def test_no_weights_for_vgg_is_said():
    with pytest.raises(AutoDFPError, match="no pretrained weights ship for vgg16_bn"):
        build_model("vgg16_bn")


def test_unknown_model():
    with pytest.raises(AutoDFPError, match="unknown model 'resnet57'"):
        build_model("resnet57")


def test_mismatched_checkpoint_names_the_first_bad_key():
    from autodfp.models import get_spec
    wrong = get_spec("resnet20").default_checkpoint()
    with pytest.raises(AutoDFPError, match="missing key 'layer1.3.conv1.weight'"):
        build_model("resnet56", wrong)


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"\x80\x02not a checkpoint at all")
    with pytest.raises(AutoDFPError, match="cannot load checkpoint"):
        build_model("resnet20", bad)


def test_user_factory_with_checkpoint(tmp_path):
    model, _ = build_model("tests.user_models:tiny_net", pretrained=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "tiny.pt")
    loaded, spec = build_model("tests.user_models:tiny_net", tmp_path / "tiny.pt")
    x = spec.example_input(3)
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(AutoDFPError, match="cannot import model factory"):
        build_model("tests.user_models:absent", pretrained=False)
    with pytest.raises(AutoDFPError, match="not callable"):
        build_model("tests.user_models:NOT_A_FACTORY", pretrained=False)


def test_train_zoo_smoke_writes_fp16_weights_that_load(tmp_path):
    """bench/train_zoo.py with a tiny budget (the real run wants a GPU: see its docstring)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "bench/train_zoo.py", "--models", "mobilenetv2",
                           "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)[0]
    assert record["steps"] == 2 and record["top1_pct"] == record["top1_fp16_pct"]
    model, _ = build_model("mobilenetv2", tmp_path / "mobilenetv2-cifar10.pt")
    assert next(model.parameters()).dtype == torch.float32
    assert not list(tmp_path.glob("*.train-checkpoint.pt"))
