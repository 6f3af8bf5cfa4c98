"""Synthetic calibration images and the calibration after pruning, on the real weights."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from autodfp.calibrate.refit import (GRAM_BLOCK_COLUMNS, CalibrationConfig, Calibrator,
                                     gram_matrix, reestimate_batchnorm, ridge_fit)
from autodfp.data import load_unlabeled, reward_split
from autodfp.errors import AutoDFPError
from autodfp.measure.metrics import accuracy
from autodfp.models import build_model
from autodfp.pipeline import apply_strategy, load_base, uniform_strategy
from autodfp.calibrate.synthetic import SynthConfig, cache_path, generate, synthetic_images

TINY = SynthConfig(count=48, batch_size=48, steps=12)
CALIB = CalibrationConfig(count=48, synth=TINY)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUTODFP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def resnet20():
    return build_model("resnet20")


def bn_mismatch(model, images):
    """Mean over BN layers of ||batch mean - running_mean|| at the BN inputs."""
    gaps = []

    def hook(module, inputs, output):
        gaps.append(float((inputs[0].mean((0, 2, 3)) - module.running_mean).norm()))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return float(np.mean(gaps))


def test_synthetic_images_match_bn_statistics_and_are_deterministic(resnet20):
    model, spec = resnet20
    images = generate(model, spec.input_size, TINY)
    assert images.shape == (48, 3, 32, 32) and images.dtype == torch.float32
    noise = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert bn_mismatch(model, images) < 0.7 * bn_mismatch(model, noise)
    assert torch.equal(images, generate(model, spec.input_size, TINY))
    other_seed = generate(model, spec.input_size, dataclasses.replace(TINY, seed=1))
    assert not torch.equal(images, other_seed)


def test_bfloat16_synthesis_matches_bn_statistics_and_is_its_own_setting(resnet20):
    model, spec = resnet20
    low = dataclasses.replace(TINY, bfloat16=True)
    images = generate(model, spec.input_size, low)
    noise = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert images.dtype == torch.float32
    assert bn_mismatch(model, images) < 0.7 * bn_mismatch(model, noise)
    assert torch.equal(images, generate(model, spec.input_size, low))
    assert cache_path(model, spec.input_size, low) != cache_path(model, spec.input_size, TINY)
    with pytest.raises(AutoDFPError, match="bfloat16 must be true or false"):
        SynthConfig(bfloat16="yes")


def test_synthetic_images_are_read_back_from_the_cache(resnet20, monkeypatch):
    model, spec = resnet20
    config = dataclasses.replace(TINY, count=8, steps=2)
    first = synthetic_images(model, spec.input_size, config)

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr("autodfp.calibrate.synthetic.generate", no_generation)
    assert torch.equal(first, synthetic_images(model, spec.input_size, config))
    with pytest.raises(AssertionError):  # other weights: another cache entry
        changed = copy.deepcopy(model)
        changed.linear.bias.data += 1
        synthetic_images(changed, spec.input_size, config)


def test_synth_config_rejects_bad_counts():
    with pytest.raises(AutoDFPError, match="count must be a positive integer"):
        SynthConfig(count=0)
    with pytest.raises(AutoDFPError, match="image count must be a positive integer"):
        CalibrationConfig(count=-3)
    with pytest.raises(AutoDFPError, match="unknown calibration key"):
        CalibrationConfig.from_dict({"order": "refit", "bogus": 1})


def test_ridge_fit_recovers_a_linear_map_and_pulls_toward_the_prior():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    fitted, bias = ridge_fit(x, x @ w.T + b, torch.zeros_like(w), 0.0, intercept=True)
    assert torch.allclose(fitted, w, atol=1e-9) and torch.allclose(bias, b, atol=1e-9)
    prior = torch.randn(4, 12, generator=g, dtype=torch.float64)
    pulled, _ = ridge_fit(x, x @ w.T + b, prior, 1e6, intercept=True)
    assert torch.allclose(pulled, prior, atol=1e-3)
    fitted32, bias32 = ridge_fit(x.float(), x @ w.T + b, torch.zeros_like(w), 0.0, True)
    assert fitted32.dtype == bias32.dtype == torch.float64  # float32 products, float64 solve
    assert torch.allclose(fitted32, w, atol=1e-4) and torch.allclose(bias32, b, atol=1e-4)


@pytest.mark.parametrize("columns", [1, GRAM_BLOCK_COLUMNS - 1, GRAM_BLOCK_COLUMNS,
                                     2 * GRAM_BLOCK_COLUMNS + 7, 576])
def test_blocked_gram_matrix_is_the_full_product(columns):
    x = torch.randn(300, columns, generator=torch.Generator().manual_seed(columns),
                    dtype=torch.float64)
    gram = gram_matrix(x)
    assert gram.shape == (columns, columns)
    assert torch.allclose(gram, x.T @ x, rtol=1e-12, atol=1e-10)


def test_calibration_leaves_the_models_memory_format_as_it_found_it(resnet20):
    base = load_base(uniform_strategy("resnet20", 1.0))
    strategy = uniform_strategy("resnet20", 0.5)
    strategy.calibration = CALIB
    plain = apply_strategy(strategy, (copy.deepcopy(base[0]), base[1])).model
    assert all(p.is_contiguous() for p in plain.parameters())
    calibrator = Calibrator.for_model(base[0], base[1], CALIB)
    model = copy.deepcopy(base[0]).to(memory_format=torch.channels_last)
    cl = apply_strategy(strategy, (model, base[1]), calibrator=calibrator).model
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in cl.parameters() if p.dim() == 4)
    for (name, a), b in zip(plain.state_dict().items(), cl.state_dict().values()):
        assert torch.equal(a, b), name  # the memory format a model arrives in changes nothing


def test_refit_recovers_most_of_the_accuracy_lost_to_pruning(resnet20, lossless):
    base = load_base(uniform_strategy("resnet20", 1.0))
    plain = apply_strategy(uniform_strategy("resnet20", 0.5), (copy.deepcopy(base[0]), base[1]))
    calibrated_strategy = uniform_strategy("resnet20", 0.5)
    calibrated_strategy.calibration = CALIB
    calibrated = apply_strategy(calibrated_strategy, (copy.deepcopy(base[0]), base[1]))
    before = accuracy(plain.model, lossless, plain.spec)
    after = accuracy(calibrated.model, lossless, calibrated.spec)
    assert after > before + 10, (before, after)
    # the coefficient is the refit's trust in the images: 0 stays near the closed form
    timid = dataclasses.replace(calibrated_strategy, layers={
        n: dataclasses.replace(a, coef=0.0) for n, a in calibrated_strategy.layers.items()})
    near_closed_form = apply_strategy(timid, (copy.deepcopy(base[0]), base[1]))
    middle = accuracy(near_closed_form.model, lossless, near_closed_form.spec)
    assert before - 2 < middle < after - 2, (before, middle, after)


def test_producer_refit_brings_kept_channels_back_toward_the_unpruned_ones(resnet20):
    base = load_base(uniform_strategy("resnet20", 1.0))
    strategy = uniform_strategy("resnet20", 0.5)
    kept = {}

    def output_of(model, layer, images):
        out = {}
        handle = model.get_submodule(layer).register_forward_hook(
            lambda m, i, o: out.setdefault("y", o.detach()))
        with torch.no_grad():
            model(images)
        handle.remove()
        return out["y"]

    errors = {}
    for producers in (False, True):
        strategy.calibration = dataclasses.replace(CALIB, refit_producers=producers)
        calibrator = Calibrator.for_model(*base, strategy.calibration)
        pruned = apply_strategy(strategy, (copy.deepcopy(base[0]), base[1]),
                                calibrator=calibrator)
        # with producers: every block's conv1 (kept outputs), then its conv2, in forward order
        assert pruned.refitted[:2] == (["layer1.0.conv1", "layer1.0.conv2"] if producers
                                       else ["layer1.0.conv2", "layer1.1.conv2"])
        assert len(pruned.refitted) == (18 if producers else 9)
        images = calibrator.images
        unpruned = output_of(base[0], "layer3.2.bn1", images)
        if not kept:  # the kept channels: the largest-L1 filters, as the strategy selects
            from autodfp.compress.selection import get_criterion
            kept["idx"] = get_criterion("l1").select(base[0].layer3[2].conv1.weight, 32)
        got = output_of(pruned.model, "layer3.2.bn1", images)
        errors[producers] = float((got - unpruned[:, kept["idx"]]).pow(2).mean())
    assert errors[True] < 0.75 * errors[False], errors


def test_refit_after_leaves_the_first_layers_at_their_closed_form_weights(resnet20):
    base = load_base(uniform_strategy("resnet20", 1.0))
    strategy = uniform_strategy("resnet20", 0.5)
    closed_form = apply_strategy(strategy, (copy.deepcopy(base[0]), base[1])).model
    strategy.calibration = dataclasses.replace(CALIB, refit_after=0.5)
    pruned = apply_strategy(strategy, (copy.deepcopy(base[0]), base[1]))
    every = Calibrator.for_model(*base, CALIB).targets  # the refittable layers, forward order
    assert pruned.refitted == list(every)[len(every) // 2:]
    weights = {n: m.weight for n, m in closed_form.named_modules() if hasattr(m, "weight")}
    for name, module in pruned.model.named_modules():
        if name in every and name not in pruned.refitted:
            assert torch.equal(module.weight, weights[name]), name
        elif name in pruned.refitted:
            assert not torch.equal(module.weight, weights[name]), name
    with pytest.raises(AutoDFPError, match="refit_after"):
        dataclasses.replace(CALIB, refit_after=1.0)


def test_calibration_replays_bit_identically(resnet20):
    strategy = uniform_strategy("resnet20", 0.6)
    strategy.calibration = CALIB
    a = apply_strategy(strategy).model.state_dict()
    b = apply_strategy(type(strategy).from_dict(strategy.to_dict())).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bn_reestimation_is_the_cumulative_average_over_the_images(resnet20):
    model = copy.deepcopy(resnet20[0])
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.conv1(images).mean((0, 2, 3))
    reestimate_batchnorm(model, images, batch_size=32)
    assert torch.allclose(model.bn1.running_mean, expected, atol=1e-5)
    assert not model.training and model.bn1.momentum == 0.1


def test_refit_follows_chained_groups_and_linear_consumers():
    """VGG: a conv that consumes one pruned group produces the next; the classifier is a
    linear consumer. The refit must use only the kept outputs and bring the pruned network's
    logits closer to the unpruned ones (random weights and images: shapes and maths only)."""
    torch.manual_seed(0)
    model, spec = build_model("vgg16_bn", pretrained=False)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reestimate_batchnorm(model, images)
        reference = model(images)
    strategy = uniform_strategy("vgg16_bn", 0.6)
    plain = apply_strategy(strategy, (copy.deepcopy(model), spec)).model
    strategy.calibration = dataclasses.replace(CALIB, count=64)
    calibrator = Calibrator.for_model(model, spec, strategy.calibration, images=images)
    refitted = apply_strategy(strategy, (copy.deepcopy(model), spec), calibrator=calibrator)
    assert "classifier" in refitted.refitted and "features.3" in refitted.refitted
    with torch.no_grad():
        err_plain = (plain(images) - reference).pow(2).mean()
        err_refit = (refitted.model(images) - reference).pow(2).mean()
    assert err_refit < 0.1 * err_plain, (err_plain, err_refit)


def test_real_unlabeled_images_calibrate_and_are_checked(tmp_path, resnet20, lossless):
    train = reward_split(64, seed=3)
    data = tmp_path / "calib.npz"
    np.savez(data, x=train.x)   # no labels: they are ignored anyway
    strategy = uniform_strategy("resnet20", 0.5)
    strategy.calibration = CalibrationConfig(images=str(data), count=64)
    pruned = apply_strategy(strategy)
    assert accuracy(pruned.model, lossless, pruned.spec) > 45
    with pytest.raises(AutoDFPError, match="holds 64 images; calibration asks for 65"):
        load_unlabeled(data, (3, 32, 32), count=65)
    np.savez(tmp_path / "small.npz", x=train.x[:, :16, :16])
    with pytest.raises(AutoDFPError, match="images are 16x16, the model takes 32x32"):
        load_unlabeled(tmp_path / "small.npz", (3, 32, 32), count=8)
    np.savez(tmp_path / "gray.npz", x=train.x[..., :1])
    with pytest.raises(AutoDFPError, match=r"must be uint8 \(N,H,W,3\)"):
        load_unlabeled(tmp_path / "gray.npz", (3, 32, 32), count=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoDFPError, match="holds no images"):
        load_unlabeled(tmp_path / "empty", (3, 32, 32), count=8)
