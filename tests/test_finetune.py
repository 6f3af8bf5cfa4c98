"""Recovery training: plain fine-tuning, resume, PDP (N:M, unstructured, channel), REPrune loop.
Tiny budgets: a few steps on a few hundred real CIFAR-10 training images."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from autodfp.data import load_split
from autodfp.errors import AutoDFPError
from autodfp.export import load_pruned
from autodfp.recover.finetune import FinetuneConfig, TrainingImages, train
from autodfp.models import build_model
from autodfp.recover.pdp import PDPMasks, SparsityTarget, nm_rows
from autodfp.recover.reprune import REPruneLoop
from autodfp.strategy import kept_channels
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def train_npz(tmp_path_factory):
    """256 class-stratified CIFAR-10 training images with labels, as a user's .npz."""
    images = load_split("reward", reward_size=256, seed=3)
    path = tmp_path_factory.mktemp("data") / "train256.npz"
    np.savez(path, x=images.x, y=images.y)
    return path


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "r20"
    done = run_cli("prune", "--model", "resnet20", "--keep", "0.5", "--calib", "none",
                   "--no-eval", "--no-onnx", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def independent_macs(model: nn.Module, input_size=(3, 32, 32)) -> int:
    """Multiply-accumulates of convs and linears, counted from their output shapes."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] \
                * module.kernel_size[1]
            total += output.numel() * per_output
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return total


def small_set(n=64):
    images = load_split("reward", reward_size=n, seed=5)
    return TrainingImages(images.name, images.x, images.y)


def test_training_lowers_the_loss_on_real_images():
    model, spec = load_pruned_model()
    config = FinetuneConfig(epochs=6, loss="ce", batch_size=64, lr=0.05, augment=False)
    result = train(model, spec, small_set(), config)
    assert result.steps == 6 and len(result.losses) == 6
    assert result.losses[-1] < 0.7 * result.losses[0]


def load_pruned_model():
    from autodfp.pipeline import apply_strategy, uniform_strategy

    pruned = apply_strategy(uniform_strategy("resnet20", 0.5))
    return pruned.model, pruned.spec


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import autodfp.recover.finetune as finetune

    teacher, spec = build_model("resnet20")
    config = FinetuneConfig(epochs=2, batch_size=16, steps_per_epoch=3)
    images = small_set()
    whole, _ = load_pruned_model()
    train(whole, spec, images, config, teacher=teacher)

    saves = []
    real_save = finetune._save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        saves.append(1)
        if len(saves) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save_checkpoint", save_then_die)
    checkpoint = tmp_path / "ckpt.pt"
    resumed, _ = load_pruned_model()
    with pytest.raises(KeyboardInterrupt):
        train(resumed, spec, images, config, teacher=teacher, checkpoint=checkpoint,
              checkpoint_every=1)
    monkeypatch.setattr(finetune, "_save_checkpoint", real_save)
    resumed, _ = load_pruned_model()
    result = train(resumed, spec, images, config, teacher=teacher, checkpoint=checkpoint,
                   checkpoint_every=1)
    assert result.resumed_from_step == 4 and result.steps == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    other = FinetuneConfig(epochs=2, batch_size=16, steps_per_epoch=3, lr=0.01)
    fresh, _ = load_pruned_model()
    with pytest.raises(AutoDFPError, match="different finetune"):
        train(fresh, spec, images, other, teacher=teacher, checkpoint=checkpoint)


def test_finetune_cli_writes_a_loadable_folder_at_the_same_macs(tmp_path, pruned_folder,
                                                                 train_npz):
    out = tmp_path / "tuned"
    done = run_cli("finetune", pruned_folder, "--data", train_npz, "--steps-per-epoch", "2",
                   "--batch-size", "32", "--no-onnx", "--out", out)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    source = json.loads((pruned_folder / "report.json").read_text())
    assert report["pruned"]["macs"] == source["pruned"]["macs"]
    assert report["finetune"]["steps"] == 2 and report["finetune"]["loss"] == "ce+kd"
    assert set(report["finetune"]["accuracy_before"]) == {"test-lossless", "test-jpeg"}
    assert "before training" in done.stdout
    tuned, _, _ = load_pruned(out)
    start, _, _ = load_pruned(pruned_folder)
    assert not torch.equal(tuned.linear.weight, start.linear.weight)
    assert not (tmp_path / "tuned.finetune-checkpoint.pt").exists()


def test_pdp_two_of_four_export_has_at_most_two_nonzeros_in_every_group(tmp_path,
                                                                        pruned_folder,
                                                                        train_npz):
    out = tmp_path / "nm"
    done = run_cli("finetune", pruned_folder, "--method", "pdp", "--sparsity", "2:4",
                   "--data", train_npz, "--steps-per-epoch", "2", "--batch-size", "32",
                   "--no-onnx", "--no-eval", "--out", out)
    assert done.returncode == 0, done.stderr
    model, _, _ = load_pruned(out)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.shape[1] % 4 == 0:
            nonzero = (nm_rows(module.weight.detach(), 4) != 0).sum(1)
            assert int(nonzero.max()) <= 2, name
            checked += 1
    assert checked == 19  # every conv but the 3-channel stem, and the classifier
    method = json.loads((out / "report.json").read_text())["finetune"]["method"]
    assert method["dense_layers"] == ["conv1"]
    assert method["zero_share"] >= 0.49


def test_pdp_unstructured_reaches_its_sparsity_per_layer():
    model, spec = build_model("resnet20")
    masks = PDPMasks(model, spec.example_input(), SparsityTarget.parse("0.8", None))
    masks.before_step(99, 100)
    summary = masks.finish()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            zero = float((module.weight == 0).float().mean())
            assert 0.79 <= zero <= 0.81
    assert summary["zero_share"] == pytest.approx(0.8, abs=0.01)


def test_pdp_channel_export_is_within_its_macs_budget(tmp_path, train_npz):
    out = tmp_path / "channel"
    done = run_cli("finetune", "--model", "resnet20", "--method", "pdp", "--macs", "0.5",
                   "--data", train_npz, "--steps-per-epoch", "2", "--batch-size", "32",
                   "--no-onnx", "--no-eval", "--out", out)
    assert done.returncode == 0, done.stderr
    model, spec, _ = load_pruned(out)
    base, _ = build_model("resnet20")
    assert independent_macs(model) <= 0.5 * independent_macs(base)
    assert independent_macs(model) >= 0.45 * independent_macs(base)


def test_reprune_loop_removes_exactly_what_it_switched_off():
    model, spec = build_model("resnet20")
    loop = REPruneLoop(model, spec.example_input(), keep=0.5)
    loop.before_step(0, 1)  # too short a run for a ramp: one selection at the target
    x = load_split("test-lossless").x[:16]
    from autodfp.data import to_tensor

    x = to_tensor(x, spec.mean, spec.std)
    with torch.no_grad():
        masked = model.eval()(x)
    before = {name: group.channels for name, group in loop.graph.groups.items()}
    summary = loop.finish()
    with torch.no_grad():
        removed = model(x)
    assert torch.allclose(masked, removed, atol=1e-5)
    for name, count in summary["channels"].items():
        assert count == kept_channels(0.5, before[name])
        assert model.get_submodule(name).out_channels == count


def test_reprune_schedule_ramps_to_the_target_then_holds():
    model, spec = build_model("resnet20")
    loop = REPruneLoop(model, spec.example_input(), keep=0.5, reselections=4)
    schedule = loop._schedule(100)
    shares = [schedule[s] for s in sorted(schedule)]
    assert shares == sorted(shares, reverse=True) and shares[-1] == 0.5
    assert max(schedule) == 75


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--method", "reprune"], "method reprune needs keep"),
    (["--keep", "0.5"], "go with method pdp or reprune"),
    (["--method", "pdp", "--sparsity", "5:4"], "0 < N < M"),
    (["--method", "pdp"], "one target"),
    (["--method", "reprune", "--keep", "1"], "must be in (0, 1)"),
    (["--data", "synthetic", "--loss", "ce"], "no labels"),
    (["--device", "tpu9"], "not a torch device"),
    (["--synthetic-images", "8"], "goes with --data synthetic"),
    pytest.param(["--device", "cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_finetune_input_is_one_line_and_writes_nothing(tmp_path, pruned_folder, train_npz,
                                                           args, message):
    out = tmp_path / "out"
    data = [] if "--data" in args else ["--data", train_npz]
    done = run_cli("finetune", pruned_folder, *data, *args, "--out", out)
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_data_or_a_folder_that_is_not_a_model_is_one_line(tmp_path, pruned_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notmodel").mkdir()
    cases = [
        (["finetune", pruned_folder], "required: --data"),
        (["finetune", pruned_folder, "--data", tmp_path / "nowhere"], "not found"),
        (["finetune", pruned_folder, "--data", tmp_path / "empty"], "no class sub-folders"),
        (["finetune", tmp_path / "notmodel", "--data", "cifar10-train"], "not a pruned-model"),
    ]
    for args, message in cases:
        done = run_cli(*args, "--out", tmp_path / "out")
        assert done.returncode == 2, args
        assert done.stderr.startswith("error:") and message in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()
