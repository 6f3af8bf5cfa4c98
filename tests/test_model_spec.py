"""Any model, any data: input specs from flags, model cards and model attributes; ImageNet-style
image trees; a real ImageNet model (EfficientNet-Lite1) on real ImageNet images (Imagenette)."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from autodfp.data import load_user_data, shared_dir
from autodfp.export import load_pruned
from autodfp.models import build_model, get_spec, weights_sha256
from launch.cli import main

RESNET20_LOSSLESS = 91.64  # measured with the shipped weights (shared/README.md)


def _cli(capfd, *args):
    """Run the CLI in this process; its captured stdout and stderr (``.out``, ``.err``)."""
    capfd.readouterr()
    assert main([str(a) for a in args]) == 0, capfd.readouterr().err[-2000:]
    return capfd.readouterr()


def _top1(stdout: str, split: str) -> float:
    return float(re.search(rf"top-1 {split} \(\d+\): ([\d.]+)%", stdout).group(1))


def _resnet20_for_half_normalisation(path) -> None:
    """ResNet-20 re-parameterised to take (x - 0.5) / 0.5 instead of ImageNet statistics:
    conv1 scaled per input channel, its constant shift folded into bn1 (exact but at the
    zero-padded border), so the published accuracy holds only when fed as it expects."""
    model, spec = build_model("resnet20")
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    with torch.no_grad():
        weight = model.conv1.weight
        shift = (weight * ((0.5 - mean) / std).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
        weight.mul_((0.5 / std).view(1, 3, 1, 1))
        model.bn1.running_mean.sub_(shift)
    torch.save(model.state_dict(), path)


def test_flags_feed_a_resnet_trained_with_its_own_normalisation(tmp_path, capfd, lossless):
    checkpoint = tmp_path / "resnet20-half.pt"
    _resnet20_for_half_normalisation(checkpoint)
    np.savez(tmp_path / "lossless.npz", x=lossless.x, y=lossless.y)  # the 1,017 alone: faster
    data = ["--data", tmp_path / "lossless.npz"]
    flags = ["--model", "resnet20", "--checkpoint", checkpoint, "--mean", "0.5", "--std", "0.5"]
    fed_right = _top1(_cli(capfd, "eval", *flags, *data).out, "lossless")
    assert abs(fed_right - RESNET20_LOSSLESS) <= 0.5
    fed_wrong = _top1(_cli(capfd, "eval", *flags[:4], *data).out, "lossless")
    assert fed_wrong < fed_right - 5  # the flags matter

    pruned_top1 = {}
    for name, model_flags in (("half", flags), ("shipped", flags[:2])):
        out = tmp_path / name
        _cli(capfd, "prune", *model_flags, *data, "--macs", "0.5", "--calib", "none",
             "--reconstruct", "autodfp", "--no-onnx", "--out", out)
        report = json.loads((out / "report.json").read_text())
        assert report["ratios"]["macs"] <= 0.5
        pruned_top1[name] = report["pruned"]["accuracy"]["lossless"]
    assert pruned_top1["half"] > 30  # chance is 10
    assert abs(pruned_top1["half"] - pruned_top1["shipped"]) <= 1.5  # the same model, fed right
    out = tmp_path / "half"
    strategy = json.loads((out / "strategy.json").read_text())
    assert strategy["input"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    model, spec, _ = load_pruned(out)
    assert spec.mean == (0.5,) * 3 and spec.sources["mean"] == "given"


def test_pretrained_factory_with_its_own_input_attributes_and_a_model_card(tmp_path, capfd):
    model, spec = build_model("tests.user_models:pretrained_tiny_net")  # no checkpoint needed
    assert spec.input_size == (3, 16, 16) and spec.std == (0.25,) * 3
    assert spec.sources["input_size"] == "model attributes"

    card = tmp_path / "card.yaml"
    card.write_text("model: tests.user_models:pretrained_tiny_net\ninput_size: [3, 24, 24]\n")
    out = tmp_path / "pruned"
    said = _cli(capfd, "prune", "--model-card", card, "--keep", "0.5", "--calib", "none",
                "--no-eval", "--no-onnx", "--out", out).err
    assert "input 3x24x24, mean 0.5,0.5,0.5, std 0.25,0.25,0.25 (from given, model attributes)" \
        in said
    assert "weights as tests.user_models:pretrained_tiny_net returns them" in said
    strategy = json.loads((out / "strategy.json").read_text())
    assert strategy["input"] == {"input_size": [3, 24, 24]}
    assert strategy["checkpoint"] is None
    assert strategy["checkpoint_sha256"] == weights_sha256(model)  # replay checks the weights
    pruned, spec, _ = load_pruned(out)
    assert spec.input_size == (3, 24, 24) and spec.mean == (0.5,) * 3
    assert pruned(torch.zeros(2, 3, 24, 24)).shape == (2, 10)


def _reference_fit(image: Image.Image, side: int, crop_ratio: float) -> np.ndarray:
    """The usual ImageNet evaluation transform, written out independently."""
    image = image.convert("RGB")
    short = int(side / crop_ratio)
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize(size, Image.BILINEAR)
    left, top = round((size[0] - side) / 2), round((size[1] - side) / 2)
    return np.asarray(image.crop((left, top, left + side, top + side)))


def test_image_trees_of_any_size_are_resized_cropped_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODFP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root, sizes = tmp_path / "tree", [(50, 70), (64, 48), (33, 33), (90, 40)]
    images = {}
    for i in range(260):  # enough to take the cached, batched path
        w, h = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        folder = root / ("b" if i % 3 else "a")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        images[f"{folder.name}/{i:03d}.png"] = Image.fromarray(pixels)
    with tarfile.open(tmp_path / "tree.tar", "w") as tar:
        tar.add(root, arcname="val")

    data = load_user_data(root, input_size=(3, 32, 32))
    assert isinstance(data.x, np.memmap) and data.num_classes == 2
    order = sorted(images, key=lambda n: (n.split("/")[0], n))
    expected = np.stack([_reference_fit(images[n], 32, 0.875) for n in order])
    assert np.array_equal(np.asarray(data.x), expected)
    assert list(data.y) == [0 if n.startswith("a/") else 1 for n in order]
    again = load_user_data(root, input_size=(3, 32, 32))  # read back from the cache
    assert np.array_equal(np.asarray(again.x), expected)
    assert len(list((tmp_path / "cache").glob("images-tree-*.npy"))) == 1
    from_tar = load_user_data(tmp_path / "tree.tar", input_size=(3, 32, 32),
                              class_index={"a": 7, "b": 3})
    assert np.array_equal(np.asarray(from_tar.x), expected)
    assert set(from_tar.y) == {7, 3} and from_tar.num_classes is None


def test_crop_ratio_one_keeps_images_at_the_input_size_untouched(tmp_path, lossless):
    for i in range(12):
        folder = tmp_path / "tree" / f"c{lossless.y[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lossless.x[i]).save(folder / f"{i:02d}.png")
    data = load_user_data(tmp_path / "tree", input_size=(3, 32, 32), crop_ratio=1.0)
    assert sorted(map(bytes, data.x)) == sorted(map(bytes, lossless.x[:12]))


# --- a real ImageNet model on real ImageNet images ------------------------------------------

IMAGENETTE = "data/imagenette"


def _imagenette_subset(tmp_path, per_class: int) -> tuple:
    """``per_class`` images of each Imagenette class, as a tar like the shipped one."""
    source = shared_dir() / IMAGENETTE / "imagenette2_val_224px.tar"
    taken, out = {}, tmp_path / "imagenette-subset.tar"
    with tarfile.open(source) as tar, tarfile.open(out, "w") as sub:
        for member in tar:
            if member.isfile() and member.name.endswith(".JPEG"):
                wnid = member.name.split("/")[-2]
                if taken.get(wnid, 0) < per_class:
                    taken[wnid] = taken.get(wnid, 0) + 1
                    sub.addfile(member, tar.extractfile(member))
    return out, shared_dir() / IMAGENETTE / "imagenet_class_index.json"


def _plain_accuracy(model: nn.Module, tar_path, index_path, side: int, mean, std) -> float:
    """Top-1 over the 1,000 outputs, with PIL and torch alone."""
    index = json.loads(index_path.read_text())
    right = total = 0
    with tarfile.open(tar_path) as tar, torch.no_grad():
        for member in tar:
            if not member.isfile():
                continue
            image = Image.open(io.BytesIO(tar.extractfile(member).read()))
            pixels = np.array(_reference_fit(image, side, 0.875))  # writable
            x = torch.from_numpy(pixels).permute(2, 0, 1).float()
            x = (x / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
            right += int(model(x[None]).argmax(1).item() == index[member.name.split("/")[-2]])
            total += 1
    return 100.0 * right / total


def _conv_and_linear_macs(model: nn.Module, input_size) -> int:
    """An independent count: hooks on every conv and linear layer, nothing else."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * \
                module.kernel_size[1]
            total += output.numel() * per_output
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    for handle in handles:
        handle.remove()
    return total


def test_efficientnet_lite1_on_imagenette_eval_and_prune(tmp_path, capfd):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the imagenet extra")
    tar_path, index_path = _imagenette_subset(tmp_path, per_class=3)
    data = ["--data", tar_path, "--class-index", index_path]
    out = _cli(capfd, "eval", "--model", "efficientnet_lite1", *data).out
    ours = _top1(out, tar_path.stem)
    macs = float(re.search(r"([\d.]+)M MACs", out).group(1))
    model, spec = build_model("efficientnet_lite1")
    assert spec.input_size == (3, 240, 240)
    conv_and_linear = _conv_and_linear_macs(model, spec.input_size) / 1e6  # 600 M at 240x240
    assert conv_and_linear <= macs <= 1.06 * conv_and_linear  # the counter adds BN and ReLU6
    plain = _plain_accuracy(model, tar_path, index_path, 240, spec.mean, spec.std)
    assert abs(ours - plain) <= 0.2 and plain > 50  # 30 images: chance is 0.1 %

    pruned_dir = tmp_path / "pruned"
    _cli(capfd, "prune", "--model", "efficientnet_lite1", "--macs", "0.5", "--calib", "none",
         "--fidelity-images", "2", "--no-onnx", *data, "--out", pruned_dir)
    report = json.loads((pruned_dir / "report.json").read_text())
    pruned, pruned_spec, _ = load_pruned(pruned_dir)
    independent = (_conv_and_linear_macs(pruned, pruned_spec.input_size)
                   / _conv_and_linear_macs(model, spec.input_size))
    assert report["ratios"]["macs"] <= 0.5 and independent <= 0.505
    assert report["images"] == {tar_path.stem: 30}
    assert get_spec("efficientnet_lite1").dataset == "imagenet"
