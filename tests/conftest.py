import os
import subprocess
import sys
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
