"""The bad-input matrix, through the real CLI: each case must end with exactly one ``error:``
line on stderr, exit status 2, no traceback, and nothing written.

Cases run the CLI's ``main`` in this process (the console script calls the same function;
a new Python per case would cost seconds of imports each); those that start Ray run the
installed entry point in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autodfp.models import get_spec
from launch.cli import main
from tests.conftest import run_cli

PRUNE = ["prune", "--model", "resnet20", "--keep", "0.5"]


def _checkpoint(name: str) -> Path:
    return get_spec(name).default_checkpoint()


def _truncated_checkpoint(tmp: Path) -> Path:
    path = tmp / "in" / "truncated.th"
    path.write_bytes(_checkpoint("resnet20").read_bytes()[:5000])
    return path


def _npz(tmp: Path, name: str, **arrays) -> Path:
    path = tmp / "in" / name
    np.savez(path, **arrays)
    return path


def _images(n: int, size: int, channels: int = 3) -> np.ndarray:
    return np.zeros((n, size, size, channels), np.uint8)


def _file(tmp: Path, name: str, text: str) -> Path:
    path = tmp / "in" / name
    path.write_text(text)
    return path


def _folder(tmp: Path, name: str, files: dict[str, str] | None = None) -> Path:
    """A folder under the case's input area holding ``files`` (name -> text)."""
    path = tmp / "in" / name
    path.mkdir()
    for file, text in (files or {}).items():
        (path / file).write_text(text)
    return path


def _empty_folder(tmp: Path) -> Path:
    return _folder(tmp, "empty")


def _non_empty_out(tmp: Path) -> Path:
    return _folder(tmp, "full", {"keep.txt": "mine"})


def _run_without_tune_state(tmp: Path) -> Path:
    return _folder(tmp, "run", {"search.json": json.dumps({"name": "run",
                                                          "env": {"model": "resnet20"}})})


def _corrupt_run(tmp: Path) -> Path:
    return _folder(tmp, "run", {"search.json": "{broken"})


def _class_tree(tmp: Path, classes: int) -> Path:
    """An ImageFolder tree of ``classes`` folders, two 40x48 PNGs each."""
    from PIL import Image

    root = tmp / "in" / "tree"
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 48), (c * 20, i * 90, 7)).save(root / f"class{c}" / f"{i}.png")
    return root


def _config(tmp: Path, text: str) -> Path:
    return _file(tmp, "search.yaml", text)


OUT = "{out}"
"""Stands for the output folder the case must not create."""

# name -> (arguments, made from the case's scratch folder; a fragment of the error line;
#          extra environment)
CASES = {
    "unknown model": (lambda t: ["prune", "--model", "resnet57", "--keep", "0.5", "--out", OUT],
                      "unknown model 'resnet57'", None),
    "keep 0": (lambda t: [*PRUNE[:3], "--keep", "0", "--out", OUT],
               "keep ratio must be in (0, 1]", None),
    "keep is text": (lambda t: [*PRUNE[:3], "--keep", "half", "--out", OUT],
                     "not a number: 'half'", None),
    "keep above 1": (lambda t: [*PRUNE[:3], "--keep", "1.5", "--out", OUT],
                     "keep ratio must be in (0, 1]", None),
    "no weights ship": (lambda t: ["prune", "--model", "vgg16_bn", "--keep", "0.5", "--out", OUT],
                        "no pretrained weights ship", None),
    "keep without model": (lambda t: ["prune", "--keep", "0.5", "--out", OUT],
                           "give --model and --keep", None),
    "mismatched checkpoint": (lambda t: [*PRUNE, "--checkpoint", _checkpoint("resnet32"),
                                         "--out", OUT],
                              "unexpected key 'layer1.3.conv1.weight'", None),
    "truncated checkpoint": (lambda t: [*PRUNE, "--checkpoint", _truncated_checkpoint(t),
                                        "--out", OUT], "cannot load checkpoint", None),
    "missing checkpoint": (lambda t: [*PRUNE, "--checkpoint", t / "in" / "none.th", "--out", OUT],
                           "checkpoint not found", None),
    "missing strategy": (lambda t: ["prune", "--strategy", t / "in" / "none.json", "--out", OUT],
                         "strategy file not found", None),
    "malformed strategy": (lambda t: ["prune", "--strategy", _file(t, "s.json", "{not json"),
                                      "--out", OUT], "cannot read strategy", None),
    "not a strategy": (lambda t: ["prune", "--strategy", _file(t, "s.json", '{"a": 1}'),
                                  "--out", OUT], "not an AutoDFP strategy", None),
    "strategy and keep": (lambda t: ["prune", "--strategy", _file(t, "s.json", "{}"), "--keep",
                                     "0.5", "--out", OUT], "either --keep or --strategy", None),
    "missing factory": (lambda t: ["prune", "--model", "tests.user_models:nothing_here", "--keep",
                                   "0.5", "--out", OUT], "cannot import model factory", None),
    "unwritable output": (lambda t: [*PRUNE, "--out", "/proc/autodfp-out"],
                          "cannot write the output folder /proc/autodfp-out", None),
    "non-empty output": (lambda t: [*PRUNE, "--out", _non_empty_out(t)], "not empty", None),
    "missing shared folder": (lambda t: [*PRUNE, "--out", OUT], "shared data folder not found",
                              {"AUTODFP_SHARED": "/nonexistent/shared"}),
    "calibration count 0": (lambda t: [*PRUNE, "--calib-images", "0", "--out", OUT],
                            "calibration image count must be at least 1", None),
    "calibration flags with none": (lambda t: [*PRUNE, "--calib", "none", "--calib-images", "8",
                                               "--out", OUT], "--calib none takes no", None),
    "missing calibration data": (lambda t: [*PRUNE, "--calib-data", t / "in" / "none",
                                            "--out", OUT], "calibration data not found", None),
    "empty calibration data": (lambda t: [*PRUNE, "--calib-data", _empty_folder(t),
                                          "--out", OUT], "holds no images", None),
    "wrong-size calibration data": (lambda t: [*PRUNE, "--calib-data",
                                               _npz(t, "c.npz", x=_images(300, 16)), "--out", OUT],
                                    "images are 16x16, the model takes 32x32", None),
    "missing eval data": (lambda t: ["eval", "--model", "resnet20", "--data", t / "in" / "x.npz"],
                          "data path not found", None),
    "empty eval data": (lambda t: ["eval", "--model", "resnet20", "--data", _empty_folder(t)],
                        "has no class sub-folders", None),
    "wrong-size eval data": (lambda t: ["eval", "--model", "resnet20", "--data",
                                        _npz(t, "e.npz", x=_images(10, 8),
                                             y=np.zeros(10, np.int64))],
                             "images are 8x8x3 (HxWxC), resnet20 takes 32x32x3", None),
    "eval labels out of range": (lambda t: ["eval", "--model", "resnet20", "--data",
                                            _npz(t, "e.npz", x=_images(10, 32),
                                                 y=np.full(10, 12, np.int64))],
                                 "labels range over 12..12 but resnet20 has 10 outputs", None),
    "ImageNet model on the CIFAR-10 test images": (
        lambda t: ["prune", "--model", "efficientnet_lite1", "--keep", "0.5", "--out", OUT],
        "efficientnet_lite1 takes 240x240x3; give images for it as data", None),
    "ImageNet model on folders without a class index": (
        lambda t: ["prune", "--model", "efficientnet_lite1", "--keep", "0.5", "--data",
                   _class_tree(t, 3), "--out", OUT],
        "efficientnet_lite1 has 1000 outputs but tree has 3 classes", None),
    "model that does not run at the input size": (
        lambda t: ["prune", "--model", "tests.user_models:fixed_size_net", "--input-size", "64",
                   "--keep", "0.5", "--out", OUT], "does not run on a 3x64x64 input", None),
    "input size of zero": (lambda t: [*PRUNE, "--input-size", "3,0,32", "--out", OUT],
                           "input size must be C,H,W", None),
    "mean for two channels": (lambda t: [*PRUNE, "--mean", "0.5,0.5", "--out", OUT],
                              "mean has 2 value(s) but the input has 3 channel(s)", None),
    "std of zero": (lambda t: [*PRUNE, "--std", "0", "--out", OUT], "std must be finite", None),
    "input flags with a strategy file": (
        lambda t: ["prune", "--strategy", _bits_strategy(t, 4), "--input-size", "64", "--out",
                   OUT], "a strategy file fixes the model's input", None),
    "unknown model card key": (lambda t: ["prune", "--model-card",
                                          _file(t, "card.yaml", "model: resnet20\nsize: 3\n"),
                                          "--keep", "0.5", "--out", OUT],
                               "unknown model card key(s)", None),
    "model card with text for a crop ratio": (
        lambda t: ["eval", "--model-card", _file(t, "card.yaml", "model: resnet20\ncrop_ratio: "
                                                 "abc\n")], "model card", None),
    "missing model card": (lambda t: [*PRUNE, "--model-card", t / "in" / "none.yaml", "--out",
                                      OUT], "model card not found", None),
    "fewer class folders than outputs": (
        lambda t: ["eval", "--model", "resnet20", "--data", _class_tree(t, 3)],
        "resnet20 has 10 outputs but tree has 3 classes", None),
    "class index without the folder": (
        lambda t: ["eval", "--model", "resnet20", "--data", _class_tree(t, 3), "--class-index",
                   _file(t, "index.json", '{"class0": 0, "class1": 1}')],
        "class index has no entry for folder(s) class2", None),
    "class index of text": (
        lambda t: ["eval", "--model", "resnet20", "--data", _class_tree(t, 3), "--class-index",
                   _file(t, "index.json", '{"class0": "zero"}')],
        "must map folder names to output indices", None),
    "missing search config": (lambda t: ["search", t / "in" / "none.yaml", "--storage", OUT],
                              "search config not found", None),
    "malformed search config": (lambda t: ["search", _config(t, "env: [unclosed\n"),
                                           "--storage", OUT], "cannot read search config", None),
    "unknown search key": (lambda t: ["search", _config(t, "episodes: 5\nlearning_rate: 3\n"),
                                      "--storage", OUT],
                           "unknown search config key(s): learning_rate", None),
    "unknown env key": (lambda t: ["search", _config(t, "env: {model: resnet20, flops: 0.5}\n"),
                                   "--storage", OUT], "unknown env_config key(s): flops", None),
    "search env with a zero std": (lambda t: ["search", _config(
        t, "env: {model: resnet20, std: [0, 1, 1]}\n"), "--storage", OUT],
        "std must be finite numbers > 0", None),
    "ImageNet model in a CIFAR-10 search": (lambda t: ["search", _config(
        t, "env: {model: efficientnet_lite1, reward_size: 20, calibration: null}\n"),
        "--storage", OUT], "efficientnet_lite1 takes 240x240x3", None),
    "out-of-range search value": (lambda t: ["search", _config(t, "episodes: -5\n"),
                                             "--storage", OUT], "episodes must be", None),
    "unreachable budget": (lambda t: ["search", _config(
        t, "env: {model: resnet20, macs_budget: 0.02, reward_size: 20, calibration: null}\n"),
        "--storage", OUT], "unreachable", None),
    "unreachable address": (lambda t: ["search", "resnet20-quick", "--address", "127.0.0.1:1",
                                       "--storage", OUT],
                            "cannot reach the Ray cluster at 127.0.0.1:1", None),
    "malformed address": (lambda t: ["search", "resnet20-quick", "--address", "somewhere",
                                     "--storage", OUT], "--address must be host:port", None),
    "GPUs that do not exist (subprocess)": (lambda t: ["search", _config(
        t, "num_env_runners: 1\ngpus_per_env_runner: 1\n"
           "env: {model: resnet20, reward_size: 20, calibration: null}\n"),
        "--storage", OUT], "GPUs; the cluster has 0", None),
    "runner resource no node offers (subprocess)": (lambda t: ["search", _config(
        t, "num_env_runners: 1\nrunner_resources: {worker: 1}\n"
           "env: {model: resnet20, reward_size: 20, calibration: null}\n"),
        "--storage", OUT], "'worker' need 1; the cluster has 0", None),
    "storage URI of an unknown scheme": (lambda t: ["search", "resnet20-quick", "--storage",
                                                    "ftp://host/runs"],
                                         "unknown scheme 'ftp'", None),
    "resume from an unknown scheme": (lambda t: ["resume", "s4://bucket/runs/x"],
                                      "unknown scheme 's4'", None),
    "sweep budget out of range": (lambda t: ["sweep", "resnet20-quick", "--budgets", "0.5,1.5",
                                             "--storage", OUT], "--budgets", None),
    "sweep budgets repeated": (lambda t: ["sweep", "resnet20-quick", "--budgets", "0.5,0.5",
                                          "--storage", OUT], "distinct", None),
    "negative runner restart delay": (lambda t: ["search", _config(t, "restart_delay_s: -1\n"),
                                                 "--storage", OUT], "restart_delay_s", None),
    "resume: not a run folder": (lambda t: ["resume", _empty_folder(t)],
                                 "not an autodfp run folder", None),
    "resume: missing run folder": (lambda t: ["resume", t / "in" / "none"],
                                   "run folder not found", None),
    "resume: corrupt run folder": (lambda t: ["resume", _corrupt_run(t)], "corrupt", None),
    "resume: no Tune state": (lambda t: ["resume", _run_without_tune_state(t)],
                              "has no Tune state (tuner.pkl)", None),
    "export without a run": (lambda t: ["export", _empty_folder(t), "--out", OUT],
                             "not an autodfp run folder", None),
    "export: negative --rerank": (lambda t: ["export", _empty_folder(t), "--rerank", "-1",
                                             "--out", OUT], "--rerank must be at least 0", None),
    "export: --rerank-images 0": (lambda t: ["export", _empty_folder(t), "--rerank", "3",
                                             "--rerank-images", "0", "--out", OUT],
                                  "--rerank-images must be at least 1", None),
    "report without a run": (lambda t: ["report", _empty_folder(t)],
                             "not an autodfp run folder", None),
    "eval of a missing folder": (lambda t: ["eval", t / "in" / "none"],
                                 "pruned model not found", None),
    "bits above 8": (lambda t: [*PRUNE, "--bits", "9", "--out", OUT],
                     "bits must be from 2 to 8, got 9", None),
    "bits not a number": (lambda t: [*PRUNE, "--bits", "six", "--out", OUT],
                          "bits must be a whole number", None),
    "--quant without --bits": (lambda t: [*PRUNE, "--quant", "dfq", "--out", OUT],
                               "--quant needs --bits", None),
    "strategy with 12-bit layer": (lambda t: ["prune", "--strategy", _bits_strategy(t, 12),
                                              "--out", OUT],
                                   "bits must be a whole number from 2 to 8, got 12", None),
    "strategy bits with --bits": (lambda t: ["prune", "--strategy", _bits_strategy(t, 4),
                                             "--bits", "4", "--out", OUT],
                                  "a strategy file fixes its bits", None),
    "size budget unreachable at min_bits": (lambda t: ["search", _config(
        t, "env: {model: resnet20, macs_budget: 1.0, reward_size: 20, calibration: null,\n"
           "      quantize: {budget: weight_bytes, budget_ratio: 0.02, min_bits: 4}}\n"),
        "--storage", OUT], "weight bytes budget 0.020 (quantize budget_ratio) is unreachable",
        None),
    "quantize min_bits above max_bits": (lambda t: ["search", _config(
        t, "env: {model: resnet20, quantize: {min_bits: 6, max_bits: 4}}\n"), "--storage", OUT],
        "quantize min_bits 6 exceeds max_bits 4", None),
    "quantize bits out of range": (lambda t: ["search", _config(
        t, "env: {model: resnet20, quantize: {max_bits: 16}}\n"), "--storage", OUT],
        "quantize max_bits must be a whole number from 2 to 8, got 16", None),
}


def _bits_strategy(tmp: Path, bits: int) -> Path:
    """A 4-bit ResNet-20 strategy with one layer at ``bits``."""
    from autodfp.pipeline import uniform_strategy

    data = uniform_strategy("resnet20", 0.5, bits=4).to_dict()
    data["layers"]["layer1.0.conv1"]["bits"] = bits
    return _file(tmp, "bits.json", json.dumps(data))


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(case: str, args: list, env: dict | None, monkeypatch, capfd) -> tuple[int, str, str]:
    if "(subprocess)" in case:
        result = run_cli(*args, env=env)
        return result.returncode, result.stdout, result.stderr
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_error_line_and_writes_nothing(tmp_path, case, monkeypatch, capfd):
    make_args, fragment, env = CASES[case]
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    args = [out if a == OUT else a for a in make_args(tmp_path)]
    before = _tree(tmp_path)
    code, stdout, stderr = _run(case, args, env, monkeypatch, capfd)
    assert code == 2, (code, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout
    assert _tree(tmp_path) == before, "something was written"
