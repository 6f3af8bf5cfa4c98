import json

import pytest
import torch

from autodfp.errors import AutoDFPError
from autodfp.export import load_pruned, write_model_folder
from autodfp.measure.metrics import accuracy, model_cost
from autodfp.models import build_model
from autodfp.pipeline import apply_strategy, checkpoint_digest, prunable_groups, uniform_strategy
from autodfp.strategy import LayerAction, Strategy


def mixed_strategy():
    groups = list(prunable_groups("resnet20"))
    layers = {name: LayerAction(0.3 + 0.07 * i, 0.5 + 0.05 * i) for i, name in enumerate(groups)}
    return Strategy("resnet20", layers, "similarity", "autodfp",
                    checkpoint_sha256=checkpoint_digest("resnet20", None))


def test_strategy_json_replays_bit_identical_weights(tmp_path):
    strategy = mixed_strategy()
    first = apply_strategy(strategy)
    strategy.save(tmp_path / "strategy.json")
    replayed = apply_strategy(Strategy.load(tmp_path / "strategy.json"))
    a, b = first.model.state_dict(), replayed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.channels == replayed.channels
    assert first.channels["layer1.0.conv1"] == round(0.3 * 16)


def test_pruned_model_is_physically_smaller():
    pruned = apply_strategy(uniform_strategy("resnet56", 0.5))
    base, spec = build_model("resnet56")
    before, after = model_cost(base, spec), model_cost(pruned.model, spec)
    assert after.macs / before.macs == pytest.approx(0.504, abs=0.01)
    assert after.params < 0.51 * before.params
    assert pruned.model.layer3[8].conv1.weight.shape == (32, 64, 3, 3)


def test_exports_reload_and_give_the_same_accuracy(tmp_path, lossless):
    pruned = apply_strategy(mixed_strategy())
    acc = accuracy(pruned.model, lossless, pruned.spec)
    out = tmp_path / "export"
    report = write_model_folder(pruned, {"note": "test"}, out)
    assert json.loads((out / "report.json").read_text())["note"] == "test"
    model, spec, strategy = load_pruned(out)
    assert strategy.to_dict() == pruned.strategy.to_dict()
    assert accuracy(model, lossless, spec) == acc
    scripted = torch.jit.load(str(out / "model.ts"))
    x = spec.example_input(4)
    with torch.no_grad():
        assert torch.allclose(scripted(x), pruned.model(x), atol=1e-5)
    if report["exports"]["model.onnx"].startswith("ONNX"):
        onnx = pytest.importorskip("onnx")
        onnx.checker.check_model(onnx.load(str(out / "model.onnx")))


def test_an_existing_output_is_not_overwritten_and_no_scratch_is_left(tmp_path):
    pruned = apply_strategy(uniform_strategy("resnet20", 0.5))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AutoDFPError, match="not empty"):
        write_model_folder(pruned, {}, out, onnx=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    write_model_folder(pruned, {}, out, overwrite=True, onnx=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "model.ts", "report.json",
                                                     "strategy.json"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    pruned = apply_strategy(uniform_strategy("resnet20", 0.5))
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        write_model_folder(pruned, {}, tmp_path / "out", onnx=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mobilenetv2", "vgg16_bn"])
def test_untrained_zoo_models_prune_export_and_reload(name, tmp_path):
    model, spec = build_model(name, pretrained=False)
    groups = prunable_groups(name)
    strategy = Strategy(name, {g: LayerAction(0.5) for g in groups}, "l1", "neuron-merging")
    pruned = apply_strategy(strategy, base=(model, spec))
    write_model_folder(pruned, {}, tmp_path / name, onnx=False)
    reloaded, _, _ = load_pruned(tmp_path / name)
    x = spec.example_input(2)
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned.model(x))
    assert model_cost(reloaded, spec).params < 0.7 * model_cost(build_model(name, pretrained=False)[0], spec).params


def test_strategy_errors(tmp_path):
    with pytest.raises(AutoDFPError, match="keep ratio"):
        LayerAction(1.5)
    with pytest.raises(AutoDFPError, match="keep ratio"):
        LayerAction(0.0)
    with pytest.raises(AutoDFPError, match="not a prunable group.*residual-coupled"):
        apply_strategy(Strategy("resnet20", {"conv1": LayerAction(0.5)}))
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(AutoDFPError, match="cannot read strategy"):
        Strategy.load(tmp_path / "s.json")
    tampered = uniform_strategy("resnet20", 0.5)
    tampered.checkpoint_sha256 = "0" * 64
    with pytest.raises(AutoDFPError, match="sha256 mismatch"):
        apply_strategy(tampered)


def test_corrupt_pruned_model_file(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(AutoDFPError, match="cannot load"):
        load_pruned(tmp_path)
