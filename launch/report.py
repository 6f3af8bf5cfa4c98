"""Plots and baseline comparison for a search run folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from autodfp.io import atomic_write_text
from autodfp.metrics import accuracy
from autodfp.pruning import apply_strategy
from autodfp.strategy import Strategy
from launch.search import load_best, load_episodes, load_run_config

REPORT_DIR = "report"
COMPARE_FILE = "compare.json"


def plot_run(run_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = load_episodes(run_dir)
    best = load_best(run_dir)
    budget = load_run_config(run_dir).env_config().macs_budget
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    compare = _read_compare(run_dir)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    index = [e["episode"] for e in episodes]
    acc = [e["accuracy"] for e in episodes]
    ax.scatter(index, acc, s=6, alpha=0.4, label="SAC episode")
    ax.plot(index, np.maximum.accumulate(acc) if acc else [], color="C0", label="SAC best so far")
    if compare and compare.get("random_curve"):
        ax.plot(range(len(compare["random_curve"])), compare["random_curve"], color="C1",
                label="random search best so far")
    if compare:
        ax.axhline(compare["rows"]["uniform"]["reward"], color="C2", linestyle="--",
                   label="best uniform")
    ax.set(xlabel="episode", ylabel="reward-set accuracy", title="Reward over episodes")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "rewards.png"))

    names = list(best["strategy"]["layers"])
    keep = [best["strategy"]["layers"][n]["keep"] for n in names]
    coef = [best["strategy"]["layers"][n]["coef"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 4))
    x = np.arange(len(names))
    ax.bar(x - 0.2, keep, 0.4, label="keep ratio")
    ax.bar(x + 0.2, coef, 0.4, label="reconstruction coef")
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    ax.set(ylim=(0, 1.05), title=f"Best strategy (episode {best['episode']}, "
                                 f"reward {best['accuracy']:.4f}, MACs {best['macs_ratio']:.3f})")
    bits = [best["strategy"]["layers"][n].get("bits") for n in names]
    if any(b is not None for b in bits):  # mixed precision: the weight bits on a second axis
        right = ax.twinx()
        right.plot(x, [b or np.nan for b in bits], "k.-", label="weight bits")
        right.set(ylabel="weight bits", ylim=(0, 8.5))
        right.legend(fontsize=8, loc="upper right")
    ax.legend(fontsize=8, loc="upper left")
    written.append(_save(fig, out / "keep_ratios.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([e["macs_ratio"] for e in episodes], acc, s=6, alpha=0.5, label="episodes")
    ax.scatter([best["macs_ratio"]], [best["accuracy"]], color="red", marker="*", s=120,
               label="best")
    ax.axvline(budget, color="grey", linestyle="--", label="MACs budget")
    ax.set(xlabel="MACs share of the original", ylabel="reward-set accuracy",
           title="Accuracy against MACs, every episode")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "accuracy_vs_macs.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def compare_with_baselines(run_dir: Path, *, progress: bool = True) -> dict:
    """SAC's best against uniform and random search at the same budget, on the test images."""
    from envs.autodfp_env import AutoDFPEnv, search_images
    from envs.baselines import random_search, uniform_search

    cfg = load_run_config(run_dir)
    best = load_best(run_dir)
    episodes = max(len(load_episodes(run_dir)), 1)
    env = AutoDFPEnv(cfg.env)
    uniform = uniform_search(env)
    random = random_search(env, episodes, seed=cfg.seed)
    test_sets = search_images(env.config, env._spec)[1]
    rows = {
        "sac": _row("SAC (best episode)", Strategy.from_dict(best["strategy"]), best["accuracy"],
                    best["macs_ratio"], test_sets, progress),
        "random": _row(f"random search ({episodes} episodes)", random.strategy, random.reward,
                       random.macs_ratio, test_sets, progress),
        "uniform": _row(uniform.name, uniform.strategy, uniform.reward, uniform.macs_ratio,
                        test_sets, progress),
    }
    result = {"episodes": episodes, "macs_budget": cfg.env_config().macs_budget, "rows": rows,
              "random_curve": random.curve}
    (run_dir / REPORT_DIR).mkdir(exist_ok=True)
    atomic_write_text(run_dir / REPORT_DIR / COMPARE_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _row(label, strategy, reward, macs_ratio, test_sets, progress) -> dict:
    pruned = apply_strategy(strategy)
    return {"label": label, "reward": reward, "macs_ratio": macs_ratio,
            "test": {s.name: accuracy(pruned.model, s, pruned.spec, progress=progress)
                     for s in test_sets},
            "strategy": strategy.to_dict()}


def _read_compare(run_dir: Path) -> dict | None:
    path = run_dir / REPORT_DIR / COMPARE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def format_compare(result: dict) -> str:
    names = list(next(iter(result["rows"].values()))["test"])
    short = {"test-lossless": "lossless", "test-jpeg": "JPEG"}
    heads = [short.get(n, n[-24:]) for n in names]
    cifar = names == ["test-lossless", "test-jpeg"]
    lines = [f"MACs budget {result['macs_budget']:.2f}; reward = accuracy on the reward split"
             + (" (training images); test = lossless 1,017 and JPEG 10,000" if cifar
                else f"; test = {', '.join(names)} (disjoint from it)"),
             f"{'method':44s} {'MACs':>6s} {'reward':>7s} "
             + " ".join(f"{h:>{max(len(h) + 1, 7)}s}" for h in heads)]
    for row in result["rows"].values():
        cells = " ".join(f"{row['test'][n]:{max(len(h) + 1, 7) - 1}.2f}%"
                         for n, h in zip(names, heads))
        lines.append(f"{row['label'][:44]:44s} {row['macs_ratio']:6.3f} {row['reward']:7.4f} "
                     f"{cells}")
    return "\n".join(lines)
