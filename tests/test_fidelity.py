"""Large-input synthetic images, TF-style "same" convs in the refit, and the data-free fidelity
estimate every prune reports."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from autodfp.calibrate.refit import (DEFAULT_CALIBRATION, _conv_patches, _refittable,
                                     default_calibration, sample_positions)
from autodfp.errors import AutoDFPError
from autodfp.measure.fidelity import LOW_AGREEMENT_PERCENT, FidelityProbe, log_probs
from autodfp.calibrate.synthetic import SynthConfig, default_config, generate
from tests.conftest import run_cli


class SamePadConv(nn.Conv2d):
    """A TF-style "same" conv as the EfficientNet packages write it: its padding is a module
    applied inside forward, not ``self.padding``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return super().forward(self.static_padding(x))


class OddConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(torch.roll(x, 1, dims=-1))


@pytest.mark.parametrize("make", [
    lambda: SamePadConv(3, 8, 3, stride=2, bias=False),
    lambda: nn.Conv2d(3, 8, 3, stride=1, padding=1),
    lambda: nn.Conv2d(3, 8, (3, 5), stride=2, padding=(2, 1), dilation=(2, 1)),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_refit_patches_reproduce_the_conv_output(make, channels_last):
    torch.manual_seed(0)
    conv, x = make(), torch.randn(2, 3, 15, 15)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
    rows = sample_positions(2, y.shape[2], y.shape[3], y.shape[2] * y.shape[3],
                            torch.Generator().manual_seed(0))  # every position, borders too
    patches = _conv_patches(conv, x, rows)
    predicted = patches @ conv.weight.reshape(8, -1).double().T
    if conv.bias is not None:
        predicted += conv.bias.double()
    assert torch.allclose(predicted, y[rows[0], :, rows[1], rows[2]].double(), atol=1e-5)


def test_the_package_same_conv_is_refitted_right():
    utils = pytest.importorskip("efficientnet_lite_pytorch.utils")
    conv = utils.Conv2dStaticSamePadding(3, 4, 3, stride=2, image_size=16, bias=False)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        y = conv(x)
    rows = sample_positions(1, 8, 8, 64, torch.Generator().manual_seed(0))
    predicted = _conv_patches(conv, x, rows) @ conv.weight.reshape(4, -1).double().T
    assert torch.allclose(predicted, y[rows[0], :, rows[1], rows[2]].double(), atol=1e-5)


def test_a_conv_with_an_unknown_forward_is_not_refitted():
    assert _refittable(SamePadConv(3, 4, 3)) and not _refittable(OddConv(3, 4, 3))


def test_default_synthetic_recipe_by_input_size():
    assert default_config((3, 32, 32)) == SynthConfig()  # CIFAR images unchanged
    large = default_config((3, 240, 240))
    assert large.coarse_steps > 0 and large.clip and large.channels_last and large.jitter == 30
    assert default_calibration((3, 224, 224)).synth == dataclasses.replace(
        default_config((3, 224, 224)), count=default_calibration((3, 224, 224)).count)
    # above 64 px the refit on synthetic images trusts them less; on real images it does not
    large = default_calibration((3, 224, 224))
    assert (large.ridge, large.refit_after) == (1.0, 0.5)
    assert default_calibration((3, 224, 224), ridge=0.1).ridge == 0.1
    real = default_calibration((3, 224, 224), images="photos/")
    assert (real.ridge, real.refit_after) == (DEFAULT_CALIBRATION.ridge, 0.0)
    assert default_calibration((3, 32, 32)) == DEFAULT_CALIBRATION


class TinyBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        torch.manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.body(x)


def test_multi_resolution_clipped_images_are_in_range_and_deterministic():
    model, mean, std = TinyBNNet(), (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)
    config = dataclasses.replace(default_config((3, 80, 80)), count=3, batch_size=2,
                                 coarse_steps=3, steps=2, ce_weight=0.1)
    images = generate(model, (3, 80, 80), config, mean=mean, std=std)
    again = generate(model, (3, 80, 80), config, mean=mean, std=std)
    assert images.shape == (3, 3, 80, 80) and torch.equal(images, again)
    low = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    high = ((1 - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)
    assert (images >= low - 1e-6).all() and (images <= high + 1e-6).all()
    assert not images.isnan().any() and images.std() > 0.05
    assert all(p.requires_grad for p in model.parameters())  # the caller's model untouched


@pytest.mark.parametrize("field,value,said", [
    ("coarse_scale", 1.5, "coarse_scale must be in (0, 1]"),
    ("coarse_steps", -1, "coarse_steps must be an integer >= 0"),
    ("first_bn_weight", -2.0, "first_bn_weight must be a finite number >= 0"),
    ("clip", "yes", "clip must be true or false"),
])
def test_bad_synthetic_settings_fail_in_one_line(field, value, said):
    with pytest.raises(AutoDFPError, match=said.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        SynthConfig(**{field: value})


def test_a_bad_synthetic_setting_in_a_strategy_file_is_one_error_line(tmp_path):
    done = run_cli("prune", "--model", "resnet20", "--keep", "0.9", "--calib-images", "8",
                   "--synth-steps", "2", "--fidelity-images", "0", "--no-eval", "--no-onnx",
                   "--out", tmp_path / "ok", env={"AUTODFP_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    strategy = json.loads((tmp_path / "ok" / "strategy.json").read_text())
    strategy["calibration"]["synth"]["coarse_scale"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(strategy))
    done = run_cli("prune", "--strategy", tmp_path / "bad.json", "--out", tmp_path / "x")
    assert done.returncode == 2 and not (tmp_path / "x").exists()
    assert done.stderr.strip().splitlines()[-1] == ("error: synthetic coarse_scale must be in "
                                                     "(0, 1], got 3")


def test_estimate_of_a_model_against_itself_and_a_broken_copy():
    model = TinyBNNet().eval()
    images = torch.randn(32, 3, 16, 16)
    probe = FidelityProbe(log_probs(model, images), images)
    same = probe.estimate(model)
    assert same.agreement_percent == 100.0 and same.kl < 1e-6 and not same.low
    assert all(p.is_contiguous() for p in model.parameters())  # channels-last only inside
    broken = TinyBNNet().eval()
    with torch.no_grad():
        broken.body[-1].weight.zero_()
        broken.body[-1].bias.copy_(torch.arange(5.0))  # always class 4
    worse = probe.estimate(broken)
    assert worse.classes_predicted == 1 and worse.agreement_percent < 100.0


@pytest.mark.parametrize("no_eval", [True, False])
def test_a_collapsed_prune_says_so_and_a_mild_one_does_not(tmp_path, no_eval, lossless):
    data = tmp_path / "lossless.npz"
    np.savez(data, x=lossless.x[:300], y=lossless.y[:300])
    flags = ["--calib", "none", "--fidelity-images", "32", "--no-onnx",
             *(["--no-eval"] if no_eval else ["--data", data])]
    reports = {}
    for keep in ("0.1", "0.95"):
        out = tmp_path / keep
        done = run_cli("prune", "--model", "resnet20", "--keep", keep, *flags, "--out", out)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[keep] = (json.loads((out / "report.json").read_text()), done)
    collapsed, done = reports["0.1"]
    assert collapsed["fidelity"]["low"] and collapsed["fidelity"]["images"] == 32
    assert collapsed["fidelity"]["agreement_percent"] < LOW_AGREEMENT_PERCENT
    assert any(line.startswith("warning: ") and "held-out synthetic" in line
               for line in done.stderr.splitlines())
    assert "held-out synthetic %" in done.stdout and "LOW" in done.stdout
    mild, done = reports["0.95"]
    assert not mild["fidelity"]["low"] and "warning:" not in done.stderr
    if not no_eval:  # the estimate ranks the two as their real accuracy does
        assert (collapsed["pruned"]["accuracy"]["lossless"] + 20
                < mild["pruned"]["accuracy"]["lossless"])


def test_no_fidelity_images_no_estimate(tmp_path):
    done = run_cli("prune", "--model", "resnet20", "--keep", "0.5", "--calib", "none",
                   "--fidelity-images", "0", "--no-eval", "--no-onnx", "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fidelity" not in json.loads((tmp_path / "o" / "report.json").read_text())


def test_a_model_without_batchnorm_prunes_without_an_estimate(tmp_path):
    done = run_cli("prune", "--model", "tests.user_models:plain_net", "--keep", "0.5",
                   "--calib", "none", "--no-eval", "--no-onnx", "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fidelity: not estimated (the model has no BatchNorm" in done.stderr
    assert "fidelity" not in json.loads((tmp_path / "o" / "report.json").read_text())
