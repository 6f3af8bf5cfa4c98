"""Per-group keeps under a MACs budget, from the weights alone (autodfp.compress.allocation)."""

import numpy as np
import pytest
import torch

import autodfp
from autodfp.compress.allocation import allocate_keeps
from autodfp.errors import AutoDFPError
from autodfp.measure.metrics import count_macs
from autodfp.models import build_model


def test_contribution_allocation_beats_uniform_on_resnet56_without_calibration():
    """Closed form only, ResNet-56 at 0.5 of the MACs, the lossless test images (measured
    72.96 % against 63.03 % for the uniform keep, both with the contribution selection)."""
    from autodfp.data import load_split
    from autodfp.measure.metrics import accuracy

    model, spec = build_model("resnet56")
    images = load_split("test-lossless")
    base_macs = count_macs(model, spec)
    top1, keeps = {}, {}
    for allocation in ("uniform", "contribution"):
        pruned = autodfp.prune(model, spec.example_input(), macs=0.5, allocation=allocation,
                               select="contribution", reconstruct="autodfp",
                               fidelity_images=0, mean=spec.mean, std=spec.std)
        assert count_macs(pruned.model, spec) <= 0.5 * base_macs
        top1[allocation] = accuracy(pruned.model, images, spec)
        keeps[allocation] = [a.keep for a in pruned.strategy.layers.values()]
    assert len(set(keeps["uniform"])) == 1
    assert max(keeps["contribution"]) - min(keeps["contribution"]) > 0.3
    assert top1["contribution"] > top1["uniform"] + 5.0, top1


def test_allocation_spends_the_budget_on_depthwise_and_chained_groups():
    """MobileNetV2 (expansions read by depthwise convs, projections feeding expansions): the
    counted MACs of the pruned model meet the budget and come close to it."""
    model, spec = build_model("mobilenetv2", pretrained=False)
    torch.manual_seed(0)
    for module in model.modules():  # BN statistics that differ between channels
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.1, 2.0)
            module.running_var.data.uniform_(0.5, 2.0)
    base_macs = count_macs(model, spec)
    keeps = allocate_keeps(model, spec, 0.6)
    from autodfp.measure.costmodel import counted_macs
    from autodfp.strategy import kept_channels

    channels = {n: m.out_channels for n, m in model.named_modules() if n in keeps}
    ratio = counted_macs(model, spec, {n: kept_channels(k, channels[n])
                                       for n, k in keeps.items()}) / base_macs
    assert 0.58 <= ratio <= 0.6
    assert min(keeps.values()) >= 0.2 - 1e-9
    assert len({round(k, 2) for k in keeps.values()}) > 3


@pytest.mark.parametrize("call, message", [
    (lambda m, x: allocate_keeps(m, None, 0.5, allocation="greedy"), "unknown allocation"),
    (lambda m, x: autodfp.prune(m, x, keep=0.5, allocation="uniform"), "allocation goes with"),
    (lambda m, x: autodfp.prune(m, x, macs=0.01), "no allocation reaches 0.01"),
])
def test_allocation_bad_input_is_one_clear_error(call, message):
    model, spec = build_model("resnet20", pretrained=False)
    with pytest.raises(AutoDFPError, match=message):
        call(model, spec.example_input())


def test_prune_cli_allocates_by_default_and_says_so(tmp_path, capsys):
    from launch.cli import main

    out = tmp_path / "small"
    assert main(["prune", "--model", "resnet20", "--macs", "0.6", "--calib", "none",
                 "--no-eval", "--fidelity-images", "0", "--no-onnx", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "keeps allocated by contribution" in said.out + said.err
    import json

    strategy = json.loads((out / "strategy.json").read_text())
    assert len({round(a["keep"], 3) for a in strategy["layers"].values()}) > 1
    report = json.loads((out / "report.json").read_text())
    assert report["ratios"]["macs"] <= 0.6
    assert main(["prune", "--model", "resnet20", "--keep", "0.5", "--allocate", "uniform",
                 "--out", str(tmp_path / "x")]) != 0
    assert "error: --allocate goes with --macs" in capsys.readouterr().err
    assert np.isfinite(report["ratios"]["macs"])


def test_allocation_baseline_in_the_search_harness():
    """The data-free allocation as a search baseline: same env, budget and reward set."""
    from envs.autodfp_env import AutoDFPEnv
    from envs.baselines import allocation_search

    env = AutoDFPEnv({"model": "resnet20", "macs_budget": 0.6, "reward_size": 100,
                      "calibration": None})
    outcome = allocation_search(env)
    assert outcome.strategy.select == "contribution"
    assert outcome.macs_ratio <= 0.6
    assert len({a.keep for a in outcome.strategy.layers.values()}) > 1
    assert outcome.reward > 0.3  # chance is 0.1
