"""The Python API on a model the user holds (``autodfp.prune`` and friends)."""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import autodfp
from autodfp import AutoDFPError
from autodfp.models import build_model, weights_sha256
from autodfp.strategy import Strategy
from tests.conftest import ROOT
from tests.user_models import NeedsArguments, SmallCNN, ViewNet

X = torch.randn(1, 3, 32, 32)
FAST_CALIBRATION = {"order": "refit", "count": 32, "synth": {"steps": 5}}


def independent_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv and linear MACs counted by hand (output elements x inputs per output)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * module.in_channels // module.groups * kh * kw
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return total


SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import torch, torch.nn as nn
    import autodfp

    class MyNet(nn.Module):   # the user's own CNN, defined in their script
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 1.5)
        def forward(self, x):
            return self.body(x)

    from tests.test_api import independent_macs as hand_macs   # counted without autodfp

    model = MyNet().eval()
    x = torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = autodfp.prune(model, x, macs=0.5, calibration="refit")
    out = tempfile.mkdtemp() + "/small"
    autodfp.save(pruned, out)
    loaded = autodfp.load(out, model=MyNet())
    again = autodfp.apply(json.loads(pruned.strategy.to_json()), model, x)
    same = lambda a, b: all(torch.equal(p, q) for p, q in
                            zip(a.state_dict().values(), b.state_dict().values()))
    print(json.dumps({
        "hand_macs": hand_macs(pruned.model, x), "hand_base_macs": hand_macs(model, x),
        "macs": pruned.cost.macs, "base_macs": autodfp.cost(model, x).macs,
        "replay_identical": same(pruned.model, again.model),
        "load_identical": same(pruned.model, loaded.model),
        "input_untouched": all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()),
        "refitted": len(pruned.refitted), "fidelity": pruned.fidelity.agreement_percent,
        "ray_imported": any(m == "ray" or m.startswith("ray.") for m in sys.modules),
        "folder": out}))
""")


def test_a_users_own_cnn_prunes_saves_loads_and_replays_without_ray(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={"PYTHONPATH": str(ROOT),
                                                          **_env_without_pythonpath()})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hand_macs"] <= 0.505 * result["hand_base_macs"]
    assert result["macs"] / result["base_macs"] <= 0.505
    assert result["replay_identical"] and result["load_identical"] and result["input_untouched"]
    assert result["refitted"] > 0 and 0 <= result["fidelity"] <= 100
    assert not result["ray_imported"]


def _env_without_pythonpath():
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_groups_and_cost_of_a_residual_network():
    model, _ = build_model("resnet20")
    groups = autodfp.groups(model, X)
    assert "layer1.0.conv1" in groups.prunable and groups.prunable["layer1.0.conv1"] == 16
    assert any("residual-coupled" in why for why in groups.excluded.values())
    mobilenet, _ = build_model("mobilenetv2", pretrained=False)
    alone, coupled = (autodfp.groups(mobilenet, X, coupled=c) for c in (False, True))
    assert set(alone.prunable) < set(coupled.prunable)
    hand = independent_macs(model, X)  # conv + linear; the counter adds BN, ReLU and pooling
    assert hand <= autodfp.cost(model, X).macs <= 1.01 * hand


def test_a_collapsed_prune_warns_and_a_mild_one_does_not():
    model, _ = build_model("resnet20")
    with pytest.warns(UserWarning, match="agree"):
        collapsed = autodfp.prune(model, X, keep=0.1, fidelity_images=32)
    assert collapsed.fidelity.low
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mild = autodfp.prune(model, X, keep=0.95, fidelity_images=32)
    assert not mild.fidelity.low


def test_a_model_whose_forward_needs_nchw_is_calibrated_and_estimated_in_nchw():
    from autodfp.models import accepts_channels_last

    model = ViewNet().eval()
    assert not accepts_channels_last(model, X) and accepts_channels_last(SmallCNN().eval(), X)
    pruned = autodfp.prune(model, X, keep=0.5, calibration=FAST_CALIBRATION, fidelity_images=8)
    assert pruned.refitted and pruned.fidelity.images == 8
    assert all(p.is_contiguous() for p in pruned.model.parameters())


def test_a_classifier_reading_the_flattened_map_is_priced_per_channel():
    """The contribution allocation and selection (``macs=``) weigh a channel by every weight
    reading it: for a linear layer on the flattened C x H x W map, all H x W of its columns."""
    from autodfp.compress.graph import ChannelGraph
    from autodfp.compress.selection import consumer_reach

    model = ViewNet().eval()
    graph = ChannelGraph(model, X)
    group = next(g for g in graph.groups.values()
                 if any(isinstance(c, torch.nn.Linear) for c in g.consumers.values()))
    columns = model.classifier.weight.detach().double().reshape(10, group.channels, -1)
    assert consumer_reach(group) == pytest.approx((columns ** 2).sum(dim=(0, 2)).numpy())
    pruned = autodfp.prune(model, X, macs=0.8, calibration=None, fidelity_images=0)
    assert pruned.strategy.select == "contribution"
    assert 0.7 < pruned.cost.macs / pruned.base_cost.macs <= 0.8


def test_a_calibration_on_a_tensor_replays_only_with_the_same_tensor(lossless):
    from autodfp.data import to_tensor

    model = SmallCNN()
    images = to_tensor(lossless.x[:24], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pruned = autodfp.prune(model, X, keep=0.5, calibration="refit", calib_data=images,
                           fidelity_images=0)
    assert pruned.strategy.calibration.images == "given" and pruned.refitted
    with pytest.raises(AutoDFPError, match="same tensor as calib_data"):
        autodfp.apply(pruned.strategy, model, X)
    with pytest.raises(AutoDFPError, match="sha256 mismatch"):
        autodfp.apply(pruned.strategy, model, X, calib_data=images.flip(0))
    again = autodfp.apply(pruned.strategy, model, X, calib_data=images, fidelity_images=0)
    assert weights_sha256(again.model) == weights_sha256(pruned.model)


def test_float32_refit_products_stay_close_to_float64_and_replay_as_recorded(lossless):
    from autodfp.data import to_tensor

    model = SmallCNN()
    images = to_tensor(lossless.x[:24], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    exact, fast = (autodfp.prune(model, X, keep=0.5, calib_data=images, fidelity_images=0,
                                 calibration={"order": "refit", "products": products})
                   for products in ("float64", "float32"))
    assert fast.strategy.calibration.products == "float32" and fast.refitted
    assert weights_sha256(fast.model) != weights_sha256(exact.model)
    for a, b in zip(exact.model.state_dict().values(), fast.model.state_dict().values()):
        if a.is_floating_point():
            assert float((a - b).norm()) <= 1e-3 * float(a.norm()) + 1e-12
    again = autodfp.apply(fast.strategy, model, X, calib_data=images, fidelity_images=0)
    assert weights_sha256(again.model) == weights_sha256(fast.model)
    with pytest.raises(AutoDFPError, match="calibration products must be one of float64"):
        autodfp.prune(model, X, keep=0.5, calibration={"products": "float16"})


def test_the_default_calibration_above_64_px_differs_for_synthetic_and_real_images():
    from autodfp.api import _calibration
    from autodfp.calibrate.refit import DEFAULT_CALIBRATION, LARGE_INPUT_SYNTHETIC_REFIT
    from autodfp.models import ModelSpec

    spec = ModelSpec("user", SmallCNN, input_size=(3, 96, 96))
    synthetic = _calibration("refit", None, spec)
    assert synthetic.ridge == LARGE_INPUT_SYNTHETIC_REFIT["ridge"] != DEFAULT_CALIBRATION.ridge
    real = _calibration("refit", torch.zeros(4, 3, 96, 96), spec)
    assert (real.images, real.count, real.ridge, real.refit_after) == (
        "given", 4, DEFAULT_CALIBRATION.ridge, 0.0)


def test_registry_strategies_replay_on_the_object_and_other_weights_are_refused():
    strategy = Strategy.load(ROOT / "examples" / "resnet56-uniform-keep0.5.json")
    model, _ = build_model("resnet56")
    replayed = autodfp.apply(strategy, model, fidelity_images=0)
    assert weights_sha256(replayed.model) == OLD_STRATEGY_WEIGHTS["resnet56-uniform-keep0.5.json"]
    with torch.no_grad():
        model.conv1.weight.mul_(1.01)
    with pytest.raises(AutoDFPError, match="other weights"):
        autodfp.apply(strategy, model, fidelity_images=0)


OLD_STRATEGY_WEIGHTS = {  # the weights these files rebuilt before the library was reorganised
    "resnet56-uniform-keep0.5.json":
        "31fee2d3e246d952a63edb27913887a208f874fc205d0b84b43b513e14b1ac1b",
    "resnet56-sac-macs0.5.json":
        "386dcf3b63faa4a9668e74e7c29f68f6d008f2ecc45b2183c83fa6e21abbf579",
}


@pytest.mark.parametrize("name", sorted(OLD_STRATEGY_WEIGHTS))
def test_shipped_strategies_rebuild_the_same_weights_as_before(name):
    from autodfp.pipeline import apply_strategy

    pruned = apply_strategy(Strategy.load(ROOT / "examples" / name))
    assert weights_sha256(pruned.model) == OLD_STRATEGY_WEIGHTS[name]


def test_a_model_of_a_class_that_needs_arguments_loads_only_with_a_model(tmp_path):
    model = NeedsArguments(3)
    pruned = autodfp.prune(model, X, keep=0.5, fidelity_images=0)
    autodfp.save(pruned, tmp_path / "out")
    with pytest.raises(AutoDFPError, match="pass model="):
        autodfp.load(tmp_path / "out")
    loaded = autodfp.load(tmp_path / "out", model=NeedsArguments(3))
    assert weights_sha256(loaded.model) == weights_sha256(pruned.model)
    # a class that builds without arguments rebuilds itself by name
    small = autodfp.prune(SmallCNN(), X, keep=0.5, fidelity_images=0)
    autodfp.save(small, tmp_path / "small")
    assert weights_sha256(autodfp.load(tmp_path / "small").model) == weights_sha256(small.model)


@pytest.mark.parametrize("call, message", [
    (lambda: autodfp.prune(SmallCNN(), X), "give keep or macs"),
    (lambda: autodfp.prune(SmallCNN(), X, keep=0.5, macs=0.5), "give keep or macs"),
    (lambda: autodfp.prune(SmallCNN(), X, macs=1.5), "macs must be a share"),
    (lambda: autodfp.prune(SmallCNN(), X, keep=1.5), "keep ratio must be in"),
    (lambda: autodfp.prune(SmallCNN(), torch.randn(3, 32, 32), keep=0.5), "example_inputs must"),
    (lambda: autodfp.prune(SmallCNN(), torch.randn(1, 1, 32, 32), keep=0.5), "does not run"),
    (lambda: autodfp.prune("resnet20", X, keep=0.5), "model must be a torch.nn.Module"),
    (lambda: autodfp.prune(SmallCNN(), X, keep=0.5, calibration="sideways"),
     "calibration order must be"),
    (lambda: autodfp.prune(SmallCNN(), X, keep=0.5, calib_data=torch.zeros(4, 3, 32, 32)),
     "calib_data needs a calibration"),
    (lambda: autodfp.prune(SmallCNN(), X, keep=0.5, calibration="refit",
                           calib_data=torch.zeros(4, 3, 16, 16)), r"calib_data must be \(N, 3, 32"),
    (lambda: autodfp.prune(SmallCNN(), X, keep=0.5, quant="calibrate"), "quant needs bits"),
    (lambda: autodfp.prune(SmallCNN(), X, keep=0.5, mean=(0.5,)), "mean has 1 value"),
    (lambda: autodfp.apply({"format": "nope"}, SmallCNN(), X), "strategy"),
    (lambda: autodfp.save("model", "somewhere"), "save takes what autodfp.prune returns"),
])
def test_bad_arguments_are_one_error_naming_the_parameter(call, message):
    with pytest.raises(AutoDFPError, match=message) as caught:
        call()
    assert "--" not in str(caught.value)
