import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autodfp.data import load_split

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def lossless():
    return load_split("test-lossless")


@pytest.fixture(scope="session")
def jpeg_test():
    return load_split("test-jpeg")


def run_cli(*args, env=None, cwd=None):
    """Run the installed console entry point in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)],
                          capture_output=True, text=True, env=full_env, cwd=cwd or ROOT,
                          timeout=600)


def assert_complete_model_folder(out: Path) -> None:
    from autodfp.export import load_pruned

    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "model.ts", "report.json",
                                                     "strategy.json"]
    load_pruned(out)
    json.loads((out / "report.json").read_text())


def kill_at_random_moments(args: list, root: Path, kills: int = 3) -> list[bool]:
    """Run ``autodfp ARGS --out root/whole`` once to time it, then ``kills`` more times, each
    killed with SIGKILL at a seeded moment between 30 % and 100 % of that time, writing to
    ``root/out{i}``. Each ``--out`` must be absent or complete; returns which existed."""
    command = [sys.executable, "-m", "launch.cli", *map(str, args)]
    start = time.monotonic()
    done = subprocess.run([*command, "--out", str(root / "whole")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    life = time.monotonic() - start
    assert_complete_model_folder(root / "whole")
    outcomes = []
    for i, percent in enumerate(random.Random(0).sample(range(30, 100), kills)):
        out = root / f"out{i}"
        process = subprocess.Popen([*command, "--out", str(out)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(life * percent / 100)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():
            assert_complete_model_folder(out)
        outcomes.append(out.exists())
    assert not all(outcomes), "every kill came too late to test anything"
    return outcomes
