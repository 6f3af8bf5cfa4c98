"""Plots and baseline comparison for a search run folder."""

from __future__ import annotations

import io
import json

import numpy as np

from autodfp.errors import AutoDFPError
from autodfp.measure.metrics import accuracy
from autodfp.pipeline import apply_strategy
from autodfp.strategy import Strategy
from envs.autodfp_env import REWARD_NAMES
from launch.search import (check_run_dir, load_best, load_episodes, load_run_config,
                           trial_budgets)
from launch.storage import Location

REPORT_DIR = "report"
COMPARE_FILE = "compare.json"
FRONT_FILE = "front.json"


def plot_run(run_dir) -> list[str]:
    """The report plots of a run (a path or URI), written into its ``report/`` folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = check_run_dir(run_dir)
    if load_run_config(run).sweep_budgets is not None:
        return [plot_front(run)]
    episodes = load_episodes(run)
    best = load_best(run)
    env = load_run_config(run).env_config()
    budget, reward = env.macs_budget, REWARD_NAMES[env.reward]
    out = run.child(REPORT_DIR)
    compare = _read_compare(run)
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
    ax.set(xlabel="episode", ylabel=reward, title="Reward over episodes")
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "rewards.png"))

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
    written.append(_save(fig, out, "keep_ratios.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([e["macs_ratio"] for e in episodes], acc, s=6, alpha=0.5, label="episodes")
    ax.scatter([best["macs_ratio"]], [best["accuracy"]], color="red", marker="*", s=120,
               label="best")
    ax.axvline(budget, color="grey", linestyle="--", label="MACs budget")
    ax.set(xlabel="MACs share of the original", ylabel=reward,
           title="Reward against MACs, every episode")
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "accuracy_vs_macs.png"))
    return written


def _save(fig, folder: Location, name: str) -> str:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(png, dpi=110, format="png")
    finally:
        plt.close(fig)
    folder.write_bytes(name, png.getvalue())  # whole or not at all
    return f"{folder}/{name}"


def sweep_front(run: Location, *, progress: bool = True) -> dict:
    """Per budget of a sweep: SAC's best episode and the best uniform keep, both on the
    reward set (the uniform ones evaluated here once, then kept in ``report/front.json``)."""
    from envs.autodfp_env import AutoDFPEnv, EnvAssets
    from envs.baselines import uniform_search

    cached = _read_json(run.child(REPORT_DIR), FRONT_FILE) or {}
    rows, assets = [], None
    cfg = load_run_config(run)
    for trial, budget in trial_budgets(run):
        try:
            best = load_best(run, trial)
        except AutoDFPError:  # a trial with no finished episode yet
            continue
        uniform = cached.get(f"{budget:g}")
        if uniform is None:
            assets = assets or EnvAssets.load(cfg.env_config())
            outcome = uniform_search(AutoDFPEnv({**cfg.env, "macs_budget": budget},
                                                assets=assets))
            uniform = {"label": outcome.name, "reward": outcome.reward,
                       "macs_ratio": outcome.macs_ratio}
            if progress:
                print(f"uniform baseline at MACs {budget:g}: {outcome.reward:.4f}", flush=True)
        rows.append({"budget": budget, "trial": trial.name, "sac": {
            "reward": best["accuracy"], "macs_ratio": best["macs_ratio"],
            "episode": best["episode"], "episodes": len(load_episodes(run, trial))},
            "uniform": uniform})
    front = {"rows": rows}
    run.child(REPORT_DIR).write_text(FRONT_FILE, json.dumps(
        {f"{r['budget']:g}": r["uniform"] for r in rows}, indent=2) + "\n")
    return front


def plot_front(run: Location) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep_front(run)["rows"]
    if not rows:
        raise AutoDFPError(f"{run}: no trial of the sweep has finished an episode yet")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["sac"]["macs_ratio"] for r in rows], [r["sac"]["reward"] for r in rows], "o-",
            label="SAC, best episode per budget")
    ax.plot([r["uniform"]["macs_ratio"] for r in rows], [r["uniform"]["reward"] for r in rows],
            "s--", label="uniform keep (best reconstruction)")
    for r in rows:
        ax.axvline(r["budget"], color="grey", linewidth=0.5, alpha=0.5)
    ax.set(xlabel="MACs share of the original",
           ylabel=REWARD_NAMES[load_run_config(run).env_config().reward],
           title="Reward against MACs: the sweep's front")
    ax.legend(fontsize=8)
    return _save(fig, run.child(REPORT_DIR), "front.png")


def format_front(run) -> str:
    rows = sweep_front(check_run_dir(run), progress=False)["rows"]
    lines = [f"{'budget':>6s} {'SAC MACs':>8s} {'SAC reward':>10s} {'uniform':>8s} {'episodes':>8s}"]
    for r in rows:
        lines.append(f"{r['budget']:6.2f} {r['sac']['macs_ratio']:8.3f} {r['sac']['reward']:10.4f} "
                     f"{r['uniform']['reward']:8.4f} {r['sac']['episodes']:8d}")
    return "\n".join(lines)


def compare_with_baselines(run_dir, *, progress: bool = True) -> dict:
    """SAC's best against uniform and random search at the same budget, on the test images."""
    from envs.autodfp_env import AutoDFPEnv, search_images
    from envs.baselines import allocation_search, random_search, uniform_search

    run_dir = check_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.sweep_budgets is not None:
        raise AutoDFPError(f"{run_dir} is a sweep: `autodfp report` draws its front against "
                           "the uniform baselines; --compare is for a single search")
    best = load_best(run_dir)
    episodes = max(len(load_episodes(run_dir)), 1)
    env = AutoDFPEnv(cfg.env)
    uniform = uniform_search(env)
    allocation = allocation_search(env) if env.quant is None else None
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
    if allocation is not None:
        rows["allocation"] = _row(allocation.name, allocation.strategy, allocation.reward,
                                  allocation.macs_ratio, test_sets, progress)
    result = {"episodes": episodes, "macs_budget": cfg.env_config().macs_budget, "rows": rows,
              "random_curve": random.curve}
    run_dir.child(REPORT_DIR).write_text(COMPARE_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _row(label, strategy, reward, macs_ratio, test_sets, progress) -> dict:
    pruned = apply_strategy(strategy)
    return {"label": label, "reward": reward, "macs_ratio": macs_ratio,
            "test": {s.name: accuracy(pruned.model, s, pruned.spec, progress=progress)
                     for s in test_sets},
            "strategy": strategy.to_dict()}


def _read_compare(run: Location) -> dict | None:
    return _read_json(run.child(REPORT_DIR), COMPARE_FILE)


def _read_json(folder: Location, name: str) -> dict | None:
    try:
        return json.loads(folder.read_text(name)) if folder.is_file(name) else None
    except (ValueError, UnicodeDecodeError):
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
