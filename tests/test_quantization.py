"""Data-free k-bit weight quantization: codes, compensation, replay, export, cost, the env."""

import copy
import json

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from autodfp.calibrate.refit import CalibrationConfig
from autodfp.export import load_pruned, load_quantized, write_model_folder
from autodfp.measure.metrics import accuracy, conv_and_linear_layers, model_cost
from autodfp.models import build_model
from autodfp.pipeline import apply_strategy, uniform_strategy
from autodfp.quantize.weights import (QuantConfig, distinct_values_per_channel, pack_codes,
                                     quantize_weight, unpack_codes)
from autodfp.strategy import LayerAction, Strategy
from autodfp.calibrate.synthetic import SynthConfig
from envs.autodfp_env import AutoDFPEnv
from tests.conftest import run_cli

SMALL_CALIBRATION = CalibrationConfig(count=64, synth=SynthConfig(batch_size=64, steps=30))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_codes_are_symmetric_k_bit_levels_within_half_a_step(bits):
    model, _ = build_model("resnet20")
    weight = model.get_submodule("layer2.0.conv1").weight
    q = quantize_weight(weight, bits, "max")
    levels = 2 ** (bits - 1) - 1
    assert q.codes.abs().max() <= levels
    assert distinct_values_per_channel(q.dequantize()) <= 2 ** bits - 1
    error = (q.dequantize() - weight.detach()).abs().reshape(weight.shape[0], -1).amax(1)
    assert torch.all(error <= q.scale / 2 * (1 + 1e-5))
    assert torch.equal(unpack_codes(pack_codes(q), bits, tuple(q.codes.shape)), q.codes)
    assert pack_codes(q).numel() == -(-weight.numel() * bits // 8)


def test_mse_clip_has_smaller_weight_error_than_max():
    model, _ = build_model("resnet20")
    weight = model.get_submodule("layer3.1.conv2").weight.detach()
    errors = {clip: ((quantize_weight(weight, 3, clip).dequantize() - weight) ** 2).sum()
              for clip in ("max", "mse")}
    assert errors["mse"] < errors["max"]


def test_bits_in_a_strategy_replay_bit_for_bit_and_survive_json():
    strategy = uniform_strategy("resnet20", 0.7, bits=4, reconstruct="autodfp", coef=0.5)
    strategy.quantization = QuantConfig(compensate="dfq")
    again = Strategy.from_dict(json.loads(strategy.to_json()))
    assert again.layer_bits == strategy.layer_bits and len(again.layer_bits) == 20
    first, second = apply_strategy(strategy), apply_strategy(again)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(first.quantized) == set(conv_and_linear_layers(first.model))


def test_strategies_without_bits_keep_their_json():
    strategy = uniform_strategy("resnet20", 0.5)
    data = strategy.to_dict()
    assert "quantization" not in data
    assert all(set(layer) == {"keep", "coef"} for layer in data["layers"].values())


def test_a_strategy_cannot_prune_a_layer_that_is_no_group():
    strategy = uniform_strategy("resnet20", 1.0, bits=6)
    strategy.layers["layer1.0.conv2"] = LayerAction(0.5, 1.0, 6)
    with pytest.raises(Exception, match="not a prunable group"):
        apply_strategy(strategy)


def test_three_bit_calibration_beats_plain_rounding_on_real_images(lossless):
    """ResNet-20 at keep 0.8, 3-bit weights: the default compensation (per-channel scale and
    shift fitted on synthetic images) against plain rounding, on the lossless test images."""
    scores = {}
    for compensate in ("none", "calibrate"):
        strategy = uniform_strategy("resnet20", 0.8, bits=3)
        strategy.calibration = SMALL_CALIBRATION
        strategy.quantization = QuantConfig(compensate=compensate)
        pruned = apply_strategy(strategy)
        scores[compensate] = accuracy(pruned.model, lossless, pruned.spec)
    assert scores["calibrate"] > scores["none"] + 5, scores


def test_udfc_scale_matches_a_monte_carlo_estimate_under_its_model():
    """E[h h_q] / E[h_q^2] by quadrature against sampling the model it assumes: isotropic
    inputs through the float and the 3-bit filter, then the BN's Gaussian and a ReLU."""
    from autodfp.quantize.weights import udfc_scales
    from autodfp.compress.reconstruction import BNStats

    model, _ = build_model("resnet20")
    conv, bn = model.layer2[1].conv1, model.layer2[1].bn1
    q = quantize_weight(conv.weight, 3, "max")
    scales = udfc_scales(conv.weight, q, bn)
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    wq = q.dequantize().double().reshape(conv.out_channels, -1)
    x = torch.randn(200_000, w.shape[1], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    mean, sd = (torch.from_numpy(v) for v in BNStats.of(bn).activation_gaussian())
    norm = w.norm(dim=1)
    h = torch.relu(mean + sd * (x @ w.T) / norm)
    hq = torch.relu(mean + sd * (x @ wq.T) / norm)
    alive = (hq * hq).mean(0) > 1e-6  # a channel that is never positive keeps factor 1
    sampled = (h * hq).mean(0)[alive] / (hq * hq).mean(0)[alive]
    assert alive.sum() >= 0.9 * len(alive)
    assert np.allclose(scales[alive.numpy()], sampled.numpy(), rtol=0.02, atol=0.01)
    assert scales.min() < 0.99  # the regression shrinks: see docs/quantization.md


def test_dfq_bias_correction_moves_the_bn_mean_by_the_expected_shift():
    model, spec = build_model("resnet20")
    plain, corrected = copy.deepcopy(model), copy.deepcopy(model)
    bits = {"layer1.0.conv2": 2}
    apply = __import__("autodfp.quantize.weights", fromlist=["quantize_model"]).quantize_model
    apply(plain, bits, QuantConfig(compensate="none"), spec.example_input())
    apply(corrected, bits, QuantConfig(compensate="dfq"), spec.example_input())
    moved = corrected.layer1[0].bn2.running_mean - plain.layer1[0].bn2.running_mean
    assert moved.abs().max() > 1e-4  # conv2 reads relu(bn1): its expected input is known
    assert torch.equal(corrected.layer1[0].conv2.weight, plain.layer1[0].conv2.weight)


def test_resnet56_keep_08_six_bit_export_keeps_accuracy_and_64_values(tmp_path, lossless):
    """The issue's check through the CLI (closed-form path, so no synthetic images are made):
    >= 91.5 % on the lossless 1,017, at most 64 distinct values per output channel, and the
    compact file reloads to the same weights."""
    out = tmp_path / "q"
    result = run_cli("prune", "--model", "resnet56", "--keep", "0.8", "--reconstruct", "udfc",
                     "--calib", "none", "--bits", "6", "--quant", "dfq", "--no-eval", "--no-onnx",
                     "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    model, spec, strategy = load_pruned(out)
    compact, _, _ = load_quantized(out)
    for (name, a), b in zip(model.state_dict().items(), compact.state_dict().values()):
        assert torch.equal(a, b), name
    for name in strategy.layer_bits:
        assert distinct_values_per_channel(model.get_submodule(name).weight) <= 64
    assert accuracy(model, lossless, spec) >= 91.5
    report = json.loads((out / "report.json").read_text())
    assert report["ratios"]["weight_bytes"] < 0.2 * 32 / 32 + 0.01
    assert report["compact_file_bytes"] == (out / "model.q.pt").stat().st_size


def independent_bytes(folder) -> int:
    """Bytes a quantized folder needs, counted from its compact file: packed codes, one float32
    step per channel, and every other tensor at its size (batch counters aside)."""
    payload = torch.load(folder / "model.q.pt", weights_only=True)
    total = payload["codes"].numel() * payload["codes"].element_size()
    total += payload["floats"].numel() * payload["floats"].element_size()
    return total + sum(t.numel() * t.element_size() for k, t in payload["other"].items()
                       if not k.endswith("num_batches_tracked"))


def float_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if not k.endswith("num_batches_tracked"))


QUANT_ENV = {"model": "resnet20", "reward_size": 60, "macs_budget": 1.0, "calibration": None,
             "quantize": {"budget": "weight_bytes", "budget_ratio": 0.09, "compensate": "dfq"}}


def test_mixed_precision_env_keeps_every_episode_within_its_byte_budget(tmp_path):
    env = AutoDFPEnv(QUANT_ENV)
    check_env(env, skip_render_check=True)
    assert env.action_space.shape == (3,)
    base, _ = build_model("resnet20")
    rng = np.random.default_rng(1)
    seen_bits = set()
    for episode in range(3):
        env.reset()
        terminated = False
        actions = np.ones((9, 3)) if episode == 0 else rng.random((9, 3))  # greedy first
        for action in actions:
            obs, reward, terminated, _, info = env.step(action)
            assert env.observation_space.contains(obs)
        assert terminated and info["budget_ratio"] <= 0.09 + 1e-9
        strategy = Strategy.from_dict(info["strategy"])
        seen_bits |= set(strategy.layer_bits.values())
        pruned = apply_strategy(strategy)
        folder = write_model_folder(pruned, {}, tmp_path / f"e{episode}", onnx=False) and \
            tmp_path / f"e{episode}"
        assert independent_bytes(folder) <= 0.09 * float_bytes(base)
        assert model_cost(pruned.model, pruned.spec, strategy.layer_bits).weight_bytes == \
            independent_bytes(folder)
    assert len(seen_bits) > 2


def test_bitops_budget_holds_on_the_pruned_quantized_model():
    env = AutoDFPEnv({**QUANT_ENV, "quantize": {"budget": "bitops", "budget_ratio": 0.1,
                                                "compensate": "none"}})
    base, spec = build_model("resnet20")
    limit = 0.1 * model_cost(base, spec).bitops
    rng = np.random.default_rng(2)
    for episode in range(3):
        env.reset()
        for action in (np.ones((9, 3)) if episode == 0 else rng.random((9, 3))):
            _, _, terminated, _, info = env.step(action)
        strategy = Strategy.from_dict(info["strategy"])
        pruned = apply_strategy(strategy)
        assert model_cost(pruned.model, spec, strategy.layer_bits).bitops <= limit
        assert info["budget_ratio"] <= 0.1 + 1e-9


def test_mixed_precision_budget_unreachable_at_min_bits_is_one_line():
    with pytest.raises(Exception, match="unreachable.*min_bits=4"):
        AutoDFPEnv({**QUANT_ENV, "quantize": {"budget_ratio": 0.02, "min_bits": 4}})


def test_weight_size_budget_search_exports_within_its_budget(tmp_path):
    """A tiny SAC search under a weight-bytes budget, then its export, counted independently
    from the compact file."""
    config = tmp_path / "mixed.yaml"
    config.write_text(
        "name: mixed\nepisodes: 4\nwarmup_episodes: 2\ncheckpoint_every: 1\n"
        "buffer_capacity: 2000\n"
        "env: {model: resnet20, reward_size: 40, macs_budget: 1.0, calibration: null,\n"
        "      quantize: {budget: weight_bytes, budget_ratio: 0.09, compensate: dfq}}\n")
    result = run_cli("search", config, "--storage", tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "budget share 0.0" in result.stdout
    episodes = [json.loads(line) for line in next((tmp_path / "runs" / "mixed").glob(
        "AutoDFPSAC*/episodes.jsonl")).read_text().splitlines()]
    assert len(episodes) >= 4 and all(len(e["bits"]) == 20 for e in episodes)
    out = tmp_path / "export"
    result = run_cli("export", tmp_path / "runs" / "mixed", "--out", out, "--no-onnx", "--no-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    base, _ = build_model("resnet20")
    assert independent_bytes(out) <= 0.09 * float_bytes(base)


def test_a_damaged_compact_file_is_one_clear_error(tmp_path):
    from autodfp.errors import AutoDFPError

    strategy = uniform_strategy("resnet20", 0.8, bits=4)
    strategy.quantization = QuantConfig(compensate="none")
    write_model_folder(apply_strategy(strategy), {}, tmp_path / "m", onnx=False)
    data = (tmp_path / "m" / "model.q.pt").read_bytes()
    (tmp_path / "m" / "model.q.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AutoDFPError, match="cannot load"):
        load_quantized(tmp_path / "m")
    payload = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    torch.save({**payload, "format": "autodfp-qmodel/1"}, tmp_path / "m" / "model.q.pt")
    with pytest.raises(AutoDFPError, match="damaged"):
        load_quantized(tmp_path / "m")
