"""Episodes/s of the env's defaults in one source tree: run it per tree, alternating, to compare
two versions side by side on the same seeded random episodes (ResNet-56 at <= 50 % of the MACs,
1,000 reward images, in-process, no RLlib). Prints one JSON line with the rewards, so equal
rewards can be checked too.

    git worktree add /tmp/old-tree OLD_COMMIT
    for tree in /tmp/old-tree . /tmp/old-tree .; do
        python bench/env_versions.py --tree $tree --threads 2 --episodes 20
    done
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the source tree (a checkout of the repository) to measure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))  # before the installed package
    from envs.autodfp_env import AutoDFPEnv

    if not Path(sys.modules["envs"].__file__).resolve().is_relative_to(args.tree.resolve()):
        raise SystemExit(f"error: envs was imported from {sys.modules['envs'].__file__}, "
                         f"not from {args.tree}")
    env = AutoDFPEnv({"model": "resnet56", "macs_budget": 0.5, "reward_size": 1000,
                      "torch_threads": args.threads})
    rng = np.random.default_rng(args.seed)

    def episode() -> tuple[float, dict]:
        env.reset()
        done = False
        while not done:
            _, reward, done, _, info = env.step(rng.random(env.action_space.shape[0]))
        return reward, info["timing"]

    episode()  # warm-up, not counted
    start = time.perf_counter()
    results = [episode() for _ in range(args.episodes)]
    wall = time.perf_counter() - start
    print(json.dumps({"tree": str(args.tree),
                      "episodes_per_s": args.episodes / wall,
                      **{k: float(np.mean([t[k] for _, t in results]))
                         for k in ("surgery_s", "calibrate_s", "eval_s")},
                      "rewards": [r for r, _ in results]}))


if __name__ == "__main__":
    main()
