"""The search service end to end, with a tiny budget: Tune + SAC, kill -9, resume, export."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autodfp.data import reward_split
from autodfp.export import load_pruned
from autodfp.measure.metrics import accuracy
from tests.conftest import ROOT, kill_at_random_moments, run_cli

CONFIG = """
name: tiny
episodes: {episodes}
warmup_episodes: 2
checkpoint_every: 1
buffer_capacity: 2000
env: {{model: resnet20, reward_size: 50, macs_budget: 0.6, calibration: {{count: 16, synth: {{steps: 3}}}}}}
"""


def trial_dir(run_dir: Path) -> Path:
    return next(p for p in run_dir.iterdir() if p.name.startswith("AutoDFPSAC"))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Start a 40-episode search, kill -9 the driver after its second checkpoint, resume it."""
    root = tmp_path_factory.mktemp("search")
    config = root / "tiny.yaml"
    config.write_text(CONFIG.format(episodes=40))
    run_dir = root / "runs" / "tiny"
    driver = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "search", str(config), "--storage", str(root / "runs")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if run_dir.is_dir() and any(p.name != "checkpoint_000000"
                                    for p in run_dir.glob("AutoDFPSAC*/checkpoint_*")):
            break
        time.sleep(0.2)
    time.sleep(2.5)  # Tune snapshots its experiment state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
    assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    logged = (trial_dir(run_dir) / "episodes.jsonl").read_text().count("\n")
    assert logged < 40, "the search finished before it could be killed"
    driver.wait()
    before = json.loads((trial_dir(run_dir) / "best.json").read_text())
    resumed = run_cli("resume", run_dir)
    return run_dir, before, resumed


def test_resume_after_kill_continues_with_best_intact(killed_and_resumed):
    run_dir, before, resumed = killed_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming tiny: latest checkpoint on disk is checkpoint_" in resumed.stderr
    trial = trial_dir(run_dir)
    episodes = [json.loads(line) for line in (trial / "episodes.jsonl").read_text().splitlines()]
    assert [e["episode"] for e in episodes] == list(range(len(episodes)))
    assert len(episodes) >= 40
    # Every evaluated episode is logged. The iteration counter continues from the restored
    # checkpoint, so it goes back at most once, to where the resume started (never to 1).
    continued = re.search(r"continuing at iteration (\d+)", resumed.stderr)
    assert continued, resumed.stderr[-2000:]
    start = int(continued.group(1))
    iterations = [e["iteration"] for e in episodes]
    drops = [i for i in range(1, len(iterations)) if iterations[i] < iterations[i - 1]]
    assert start > 1 and len(drops) <= 1
    assert all(iterations[i] == start for i in drops)
    assert iterations[-1] >= start
    best = json.loads((trial / "best.json").read_text())
    assert best["accuracy"] == max(e["accuracy"] for e in episodes)
    assert best["accuracy"] >= before["accuracy"]          # the best found before the kill survives
    assert "best: reward-set accuracy" in resumed.stdout


def test_checkpoints_hold_the_replay_buffer(killed_and_resumed):
    import pickle
    run_dir, _, _ = killed_and_resumed
    checkpoint = sorted(trial_dir(run_dir).glob("checkpoint_*"))[-1]
    with open(checkpoint / "algorithm_state.pkl", "rb") as fh:
        state = pickle.load(fh)
    assert state["replay_buffer"]["_num_timesteps"] > 0


def test_exported_best_matches_its_episode_reward(killed_and_resumed, tmp_path):
    run_dir, _, _ = killed_and_resumed
    out = tmp_path / "exported"
    result = run_cli("export", run_dir, "--out", out, "--no-onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    best = json.loads((trial_dir(run_dir) / "best.json").read_text())
    model, spec, _ = load_pruned(out)
    assert accuracy(model, reward_split(50, 0), spec) / 100.0 == best["accuracy"]
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["reward_accuracy"] == best["accuracy"]
    assert report["ratios"]["macs"] <= 0.6 + 2e-3


def test_export_rerank_picks_among_the_best_episodes_on_validation_images(killed_and_resumed,
                                                                         tmp_path):
    run_dir, _, _ = killed_and_resumed
    out = tmp_path / "reranked"
    result = run_cli("export", run_dir, "--rerank", "3", "--rerank-images", "100", "--out", out,
                     "--no-onnx", "--no-eval")
    assert result.returncode == 0, result.stderr[-2000:]
    search = json.loads((out / "report.json").read_text())["search"]
    rows = search["candidates"]
    assert len(rows) == 3 and rows[0]["reward"] >= rows[1]["reward"] >= rows[2]["reward"]
    chosen = max(rows, key=lambda r: r["validation_percent"])
    assert search["episode"] == chosen["episode"] and "validation" in search["selected_by"]
    logged = {e["episode"]: e for e in map(json.loads, (trial_dir(run_dir) / "episodes.jsonl")
                                           .read_text().splitlines())}
    strategy = json.loads((out / "strategy.json").read_text())
    assert [a["keep"] for a in strategy["layers"].values()] == logged[chosen["episode"]]["keep"]


def test_export_killed_at_any_moment_leaves_no_folder_or_a_complete_one(killed_and_resumed,
                                                                       tmp_path):
    run_dir, _, _ = killed_and_resumed
    kill_at_random_moments(["export", run_dir, "--no-onnx"], tmp_path)


def test_report_draws_the_plots(killed_and_resumed):
    run_dir, _, _ = killed_and_resumed
    result = run_cli("report", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("rewards.png", "keep_ratios.png", "accuracy_vs_macs.png"):
        png = run_dir / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_with_a_remote_env_runner(tmp_path):
    """Episodes from a remote runner arrive read-only; the reward copy must still work."""
    config = tmp_path / "remote.yaml"
    config.write_text(CONFIG.format(episodes=4).replace("name: tiny", "name: remote"))
    result = run_cli("search", config, "--storage", tmp_path / "runs", "--num-env-runners", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    trial = trial_dir(tmp_path / "runs" / "remote")
    episodes = [json.loads(line) for line in (trial / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) >= 4
    assert json.loads((trial / "best.json").read_text())["accuracy"] > 0.05
    # TensorBoard: Tune's per-iteration scalars, and ours per episode (uploaded by Tune)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(folder):
        events = EventAccumulator(str(folder))
        events.Reload()
        return events

    tune_events = scalars(trial)
    tags = tune_events.Tags()["scalars"]
    for tag in ("best_accuracy", "best_macs_ratio", "accuracy_mean", "macs_ratio_mean",
                "env_runner_restarts", "best_keep/layer3.2.conv1"):
        assert f"ray/tune/autodfp/{tag}" in tags
    per_episode = scalars(trial / "episodes")
    accuracy_curve = per_episode.Scalars("episode/accuracy")
    assert [e.step for e in accuracy_curve] == [e["episode"] for e in episodes]
    assert [e.value for e in accuracy_curve] == pytest.approx([e["accuracy"] for e in episodes])
    best_curve = [e.value for e in per_episode.Scalars("episode/best_accuracy")]
    assert best_curve == pytest.approx(np.maximum.accumulate([e["accuracy"] for e in episodes]))


@pytest.mark.parametrize("preset", sorted(p.stem for p in
                                           (ROOT / "launch" / "presets").glob("*.yaml")))
def test_every_preset_is_a_valid_search_config(preset):
    from launch.config import SearchConfig

    config = SearchConfig.load(preset)
    assert config.name == preset and config.episodes > 0
    config.env_config()


API_SEARCH = """
import json, sys, torch
import autodfp
from tests.user_models import SmallCNN

result = autodfp.search(
    SmallCNN(), torch.randn(1, 3, 32, 32), macs=0.6, episodes=4, name="api",
    storage=sys.argv[1], out=sys.argv[2], warmup_episodes=2, checkpoint_every=1,
    buffer_capacity=2000,
    env={"reward_size": 50, "calibration": {"count": 16, "synth": {"steps": 3}}})
print(json.dumps({"run_dir": result.run_dir, "best": result.best["accuracy"],
                  "macs": result.pruned.cost.macs}))
"""


def test_search_api_on_a_users_model_object_runs_and_exports(tmp_path):
    import torch

    import autodfp
    from tests.user_models import SmallCNN

    done = subprocess.run([sys.executable, "-c", API_SEARCH, str(tmp_path / "runs"),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    episodes = (trial_dir(Path(result["run_dir"])) / "episodes.jsonl").read_text().splitlines()
    assert len(episodes) >= 4
    base = autodfp.cost(SmallCNN(), torch.randn(1, 3, 32, 32)).macs
    assert result["macs"] <= 0.6 * base * 1.01
    exported = autodfp.load(tmp_path / "out")  # SmallCNN rebuilds itself by name
    assert autodfp.cost(exported.model, torch.randn(1, 3, 32, 32)).macs == result["macs"]
