"""SAC against random and uniform search on ResNet-56 at <= 50% of the MACs.

    python bench/search.py [--run RUN_DIR] [--episodes 400] [--reward-size 1000]
                           [--runners 0,1,2] [--throughput-episodes 30] [--no-calibration]
                           [--save-best examples/NAME.json] [--reward synthetic]
    python bench/search.py --mixed-precision --episodes 150 --reward-size 500 --runners ""
    python bench/search.py --throughput-only --runners 1,2,4,8 --gpus-per-runner 0.125 \
                           [--autocast]          # on a GPU machine

1. A SAC search (or an existing run folder, ``--run``), random search with as many episodes,
   and the best uniform strategy, all in the same env (same budget, reward set and, by
   default, the same calibration on synthetic images).
2. Best-so-far strategy of each method at episode milestones, evaluated on the lossless 1,017
   and the JPEG 10,000 test images (never used for the reward).
3. Episodes per second with 0 (in-process), 1 and 2 env runners, and the share of wall time the
   env spends in surgery + calibration + evaluation (the rest is RLlib and Tune overhead).
   ``--throughput-only`` first prints the env's speed levers side by side (:data:`LEVERS`, each
   row adding one, in-process, on the same seeded strategies): episodes/s, the evaluation's
   share of this CPU's float32 matmul rate, and how much each lever changed the rewards.

Writes ``bench/results/search.json`` (``search-uncalibrated.json`` with ``--no-calibration``,
``search-mixed.json`` with ``--mixed-precision``: ResNet-20, pruning + per-layer bits under a
weight-size budget) and ``search.png``; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from autodfp.data import load_split
from autodfp.io import atomic_write_text
from autodfp.measure.metrics import accuracy, matmul_gflops
from autodfp.pipeline import apply_strategy
from autodfp.strategy import Strategy
from envs.autodfp_env import AutoDFPEnv
from envs.baselines import allocation_search, uniform_search
from launch.config import SearchConfig
from launch.rerank import episode_strategy
from launch.search import load_episodes, load_run_config, run_search

ENV = {"model": "resnet56", "macs_budget": 0.5, "keep_lower": 0.2, "reconstruct": "autodfp"}
MIXED_ENV = {"model": "resnet20", "macs_budget": 1.0, "keep_lower": 0.2, "reconstruct": "autodfp",
             "quantize": {"budget": "weight_bytes", "budget_ratio": 0.1}}
"""``--mixed-precision``: pruning + per-layer bits under a weight-size budget (10 % of the float
model's bytes), on ResNet-20 to keep it a CPU-sized run."""


def strategy_from_episode(env: AutoDFPEnv, episode: dict) -> Strategy:
    return episode_strategy(Strategy(**env.strategy_fields(), layers={}),
                            env.strategy_layer_names(), episode)


def best_so_far(env: AutoDFPEnv, episodes: list[dict], milestones: list[int]) -> dict:
    """Milestone -> (reward, strategy) of the best episode among the first ``milestone``."""
    out, best = {}, None
    for i, episode in enumerate(episodes, start=1):
        if best is None or episode["accuracy"] > best["accuracy"]:
            best = episode
        if i in milestones:
            out[i] = (best["accuracy"], strategy_from_episode(env, best))
    return out


def random_episodes(env: AutoDFPEnv, n: int, seed: int) -> list[dict]:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    episodes = []
    for _ in tqdm(range(n), desc="random search", unit="episode", mininterval=10):
        env.reset()
        done = False
        while not done:
            _, reward, done, _, info = env.step(rng.random(env.action_space.shape[0]))
        layers = info["strategy"]["layers"]
        episodes.append({"accuracy": reward, "keep": [v["keep"] for v in layers.values()],
                         "coef": [v["coef"] for v in layers.values()],
                         **({"bits": [v["bits"] for v in layers.values()]} if env.quant else {})})
    return episodes


def load_or_run_random(env: AutoDFPEnv, n: int, path: Path | None) -> tuple[list[dict], float]:
    """``n`` random-search episodes (seed 1) and the seconds they took, cached in ``path``."""
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved["env"] == dataclasses.asdict(env.config) and len(saved["episodes"]) >= n:
            return saved["episodes"][:n], saved["seconds"] * n / len(saved["episodes"])
        print(f"{path} was made for another env or fewer episodes: running again",
              file=sys.stderr)
    start = time.perf_counter()
    episodes = random_episodes(env, n, seed=1)
    seconds = time.perf_counter() - start
    if path is not None:
        atomic_write_text(path, json.dumps({"env": dataclasses.asdict(env.config),
                                            "episodes": episodes, "seconds": seconds}))
    return episodes, seconds


def device_name(gpus_per_runner: float) -> str:
    """What every throughput row ran on."""
    import os

    import torch

    if gpus_per_runner > 0 and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU, {gpus_per_runner:g} per runner)"
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


def autocast_check(env_config: dict, strategies: int = 6, seed: int = 0) -> dict:
    """Rewards of the same strategies (uniform + random) in float32 and under autocast, on the
    device the env picks: the largest difference, in points."""
    fp32 = AutoDFPEnv({**env_config, "autocast": False})
    low = AutoDFPEnv({**env_config, "autocast": True})
    picked = [uniform_search(fp32).strategy]
    picked += [strategy_from_episode(fp32, e) for e in random_episodes(fp32, strategies - 1, seed)]
    pairs = [(fp32.evaluate(s) * 100, low.evaluate(s) * 100) for s in picked]
    return {"device": fp32.device, "rewards_percent": pairs,
            "max_abs_diff_points": max(abs(a - b) for a, b in pairs)}


LEVERS = [
    ("previous settings: batch 500, NCHW, BN unfolded, every image",
     {"eval_batch_size": 500, "channels_last": False, "fold_batchnorm": False, "race_images": 0}),
    ("+ batch 128", {"channels_last": False, "fold_batchnorm": False, "race_images": 0}),
    ("+ channels-last", {"fold_batchnorm": False, "race_images": 0}),
    ("+ BatchNorm folded", {"race_images": 0}),
    ("+ racing (250 images first, top 10): the defaults", {}),
    ("+ bfloat16 autocast (option)", {"autocast": True}),
]
"""In-process env levers, each row adding one to the row above (``--throughput-only``)."""


def lever_rows(base_env: dict, episodes: int, seed: int = 3) -> list[dict]:
    """Each lever of :data:`LEVERS` in-process (no RLlib), on the same seeded random
    strategies: episodes/s, where the time went, the evaluation's share of the matmul rate,
    and the largest reward difference from the first row on the candidates both scored in
    full."""
    rate = matmul_gflops(2048, 5)
    rows, reference = [], None
    for label, changes in LEVERS:
        env = AutoDFPEnv({**base_env, **changes})
        rng = np.random.default_rng(seed)
        rewards, timings, flop = [], [], 0.0
        start = time.perf_counter()
        for _ in range(episodes):
            env.reset()
            done = False
            while not done:
                _, reward, done, _, info = env.step(rng.random(env.action_space.shape[0]))
            rewards.append(reward)
            timings.append(info["timing"])
            flop += 2 * env._macs.macs_of_kept(env._kept) * info["timing"]["scored_images"]
        wall = time.perf_counter() - start
        full = [t["scored_images"] == len(env.reward.resident) for t in timings]
        reference = reference or (rewards, full)
        diffs = [abs(a - b) * 100 for a, b, f, g in zip(rewards, reference[0], full, reference[1])
                 if f and g]
        eval_s = sum(t["eval_s"] for t in timings)
        rows.append({"lever": label, "episodes_per_s": episodes / wall,
                     **{f"{k}_mean": float(np.mean([t[k] for t in timings]))
                        for k in ("surgery_s", "calibrate_s", "eval_s")},
                     "eval_gflops": flop / 1e9 / max(eval_s, 1e-9),
                     "matmul_gflops": rate, "full_share": float(np.mean(full)),
                     "max_reward_diff_points": max(diffs) if diffs else float("nan")})
        print_levers(rows[-1:], header=len(rows) == 1)
    return rows


def print_levers(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"| in-process env (random actions, same strategies) | episodes/s | surgery s/ep | "
              f"calibration s/ep | eval s/ep | eval GFLOP/s (share of {rows[0]['matmul_gflops']:.0f}"
              f" matmul) | scored in full | largest reward change (points) |")
        print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lever']} | {r['episodes_per_s']:.3f} | {r['surgery_s_mean']:.2f} | "
              f"{r['calibrate_s_mean']:.2f} | {r['eval_s_mean']:.2f} | {r['eval_gflops']:.0f} "
              f"({r['eval_gflops'] / r['matmul_gflops']:.0%}) | {r['full_share']:.0%} | "
              f"{r['max_reward_diff_points']:.2f} |", flush=True)


def throughput(runners: int, episodes: int, env_config: dict, storage: Path,
               gpus_per_runner: float = 0.0, cpus_per_runner: float = 1.0) -> dict:
    cfg = SearchConfig(name=f"throughput-{runners}", storage=str(storage), episodes=episodes,
                       warmup_episodes=min(10, episodes), num_env_runners=runners,
                       gpus_per_env_runner=gpus_per_runner if runners else 0.0,
                       cpus_per_env_runner=cpus_per_runner,
                       checkpoint_every=1000, env=env_config)
    start = time.perf_counter()
    run_dir = run_search(cfg)
    wall = time.perf_counter() - start
    logged = load_episodes(run_dir)
    stamps = [e["time"] for e in logged]
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    env_s = sum(e["timing"].get("surgery_s", 0) + e["timing"].get("calibrate_s", 0)
                + e["timing"].get("eval_s", 0) for e in logged)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else wall
    return {"runners": runners, "device": device_name(gpus_per_runner if runners else 0.0),
            "episodes": len(logged), "wall_s": wall,
            "episodes_per_s_steady": steady, "episodes_per_s_with_startup": len(logged) / wall,
            "env_share_of_steady_wall": env_s / max(span, 1e-9) / max(runners, 1),
            "surgery_s_mean": float(np.mean([e["timing"].get("surgery_s", 0) for e in logged])),
            "calibrate_s_mean": float(np.mean([e["timing"].get("calibrate_s", 0)
                                               for e in logged])),
            "eval_s_mean": float(np.mean([e["timing"].get("eval_s", 0) for e in logged]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="use this finished SAC run folder")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--reward-size", type=int, default=1000)
    parser.add_argument("--runners", default="0,1,2")
    parser.add_argument("--throughput-episodes", type=int, default=30)
    parser.add_argument("--lever-episodes", type=int, default=30,
                        help="with --throughput-only: in-process episodes per lever row (0: none)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the env-runner throughput part")
    parser.add_argument("--gpus-per-runner", type=float, default=0.0,
                        help="GPU share per env runner (e.g. 0.125: 8 runners on one GPU)")
    parser.add_argument("--cpus-per-runner", type=float, default=1.0)
    parser.add_argument("--autocast", action="store_true",
                        help="evaluate under float16 autocast (first prints its reward "
                             "difference from float32 on the same strategies)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="the closed-form reward of earlier versions (no calibration)")
    parser.add_argument("--save-best", type=Path,
                        help="write SAC's best strategy (reward set) to this JSON file")
    parser.add_argument("--random-file", type=Path,
                        help="random-search episodes: read from this JSON file if it exists, "
                             "else run them and write it (with --random-only: only that)")
    parser.add_argument("--reward", choices=("labelled", "synthetic"), default="labelled",
                        help="the env's reward: synthetic = closeness to the unpruned model on "
                             "held-out synthetic images, no labelled image read")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="joint pruning + bits under a weight-size budget (MIXED_ENV)")
    parser.add_argument("--no-random", action="store_true",
                        help="SAC and the baselines only, no random search (e.g. a second SAC "
                             "run with another env setting)")
    parser.add_argument("--random-only", action="store_true",
                        help="run the random search alone (--episodes of them) into --random-file")
    args = parser.parse_args()
    suffix = ("-uncalibrated" if args.no_calibration else "") + (
        "-mixed" if args.mixed_precision else "") + (
        "-synthetic-reward" if args.reward == "synthetic" else "")
    base_env = {**(MIXED_ENV if args.mixed_precision else ENV), "reward_size": args.reward_size,
                "reward": args.reward,
                **({"calibration": None} if args.no_calibration else {})}
    if args.random_only:
        if not args.random_file:
            parser.error("--random-only needs --random-file")
        load_or_run_random(AutoDFPEnv(base_env), args.episodes, args.random_file)
        return 0
    if args.throughput_only:
        env = {**base_env, "autocast": args.autocast}
        report = {}
        if args.lever_episodes:
            report["levers"] = lever_rows(base_env, args.lever_episodes)
        if args.autocast:
            report["autocast_check"] = autocast_check(env)
            print(f"autocast vs float32 on {report['autocast_check']['device']}: largest reward "
                  f"difference {report['autocast_check']['max_abs_diff_points']:.2f} points",
                  flush=True)
        speed = [throughput(int(r), args.throughput_episodes, env,
                            Path(tempfile.mkdtemp(prefix="autodfp-bench-")),
                            args.gpus_per_runner, args.cpus_per_runner)
                 for r in args.runners.split(",") if r]
        if speed:
            print_throughput(speed)
        layout = ("-gpu" if args.gpus_per_runner else "") + ("-autocast" if args.autocast else "")
        atomic_write_text(args.out / f"search-throughput{suffix}{layout}.json",
                          json.dumps({**report, "rows": speed}, indent=1))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="autodfp-bench-"))
    try:
        if args.run:
            run_dir = args.run.resolve()
            env_config = load_run_config(run_dir).env
        else:
            env_config = base_env
            cfg = SearchConfig(name="sac", storage=str(scratch), episodes=args.episodes,
                               warmup_episodes=max(10, args.episodes // 10), env=env_config)
            run_dir = run_search(cfg)
        sac = load_episodes(run_dir)
        n = len(sac)
        env = AutoDFPEnv(env_config)
        milestones = sorted({m for m in (10, 25, 50, 100, 200, 400, 800, n) if m <= n})
        rand, random_s = (([], 0.0) if args.no_random
                          else load_or_run_random(env, n, args.random_file))
        uniform = uniform_search(env)
        tests = [load_split("test-lossless"), load_split("test-jpeg")]
        known: dict[str, dict] = {}

        def test_acc(strategy: Strategy) -> dict:
            key = strategy.to_json()
            if key not in known:
                model, spec = env.base
                pruned = apply_strategy(strategy, (copy.deepcopy(model), spec),
                                        calibrator=env.reward.calibrator)
                known[key] = {t.name: accuracy(pruned.model, t, pruned.spec) for t in tests}
            return known[key]

        rows = []
        for label, episodes in (("SAC", sac), ("random", rand)):
            for m, (reward, strategy) in best_so_far(env, episodes, milestones).items():
                acc = test_acc(strategy)
                rows.append({"method": label, "episodes": m, "reward": reward,
                             "lossless": acc["test-lossless"], "jpeg": acc["test-jpeg"],
                             "macs_ratio": env.macs_ratio_of(strategy),
                             **_budget_column(env, strategy)})
                if label == "SAC" and m == n and args.save_best:
                    strategy.save(args.save_best)
        for baseline in (uniform, *([] if env.quant else [allocation_search(env)])):
            acc = test_acc(baseline.strategy)
            rows.append({"method": baseline.name, "episodes": 0, "reward": baseline.reward,
                         "lossless": acc["test-lossless"], "jpeg": acc["test-jpeg"],
                         "macs_ratio": baseline.macs_ratio,
                         **_budget_column(env, baseline.strategy)})
        calibration = ("no calibration" if env.config.calibration is None else
                       f"calibrated ({env._template.calibration.order} on "
                       f"{env._template.calibration.count} synthetic images"
                       + (f", {env._template.calibration.products} products"
                          if env._template.calibration.products != "float64" else "") + ")")
        if env.config.autocast:
            calibration += ", autocast evaluation"
        budget = (f"weight bytes <= {env.quant.budget_ratio}" if env.quant
                  else f"MACs <= {env.config.macs_budget}")
        reward_set = (f"{env.config.synthetic_reward_images} held-out synthetic images "
                      "(reward exp(-KL), no label read)" if env.config.reward == "synthetic"
                      else f"{env.config.reward_size} training images")
        print(f"## {env.config.model}, {budget}, reward set {reward_set}, {calibration}\n")
        reward_column = "reward exp(-KL)" if env.config.reward == "synthetic" else "reward-set acc"
        print(f"| method | episodes | {reward_column} | lossless 1,017 % | JPEG 10,000 % | MACs ratio |"
              + (" weight-bytes ratio |" if env.quant else ""))
        print("|---|---|---|---|---|---|" + ("---|" if env.quant else ""))
        for r in rows:
            print(f"| {r['method']} | {r['episodes']} | {r['reward']:.4f} | {r['lossless']:.2f} | "
                  f"{r['jpeg']:.2f} | {r['macs_ratio']:.3f} |"
                  + (f" {r['budget_ratio']:.3f} |" if env.quant else ""))
        if rand:
            print(f"\nrandom search: {n / random_s:.2f} episodes/s (env alone, no RLlib)\n",
                  flush=True)

        speed = [throughput(int(r), args.throughput_episodes, env_config,
                            scratch / "throughput")
                 for r in args.runners.split(",") if args.runners]
        print_throughput(speed)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / f"search{suffix}.json", json.dumps(
            {"rows": rows, "throughput": speed, "run": str(run_dir), "env": env_config,
             "random_episodes_per_s": n / random_s if rand else None}, indent=1))
        reward_note = "\nreward on synthetic images, no label" if env.config.reward == "synthetic" else ""
        plot(rows, args.out / f"search{suffix}.png",
             f"{budget}, {calibration}, action_mode {env.config.action_mode}{reward_note}",
             env.config.model)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def print_throughput(speed: list[dict]) -> None:
    """One row per runner count; the env share is surgery + calibration + evaluation, the
    rest of the wall time is RLlib (SAC updates, sampling, metrics) and Tune."""
    print("| device | env runners | episodes/s (steady) | incl. start-up | env share of wall | "
          "surgery s/ep | calibration s/ep | eval s/ep |")
    print("|---|---|---|---|---|---|---|---|")
    for s in speed:
        print(f"| {s['device']} | {s['runners']} | {s['episodes_per_s_steady']:.3f} | "
              f"{s['episodes_per_s_with_startup']:.3f} | {s['env_share_of_steady_wall']:.0%} | "
              f"{s['surgery_s_mean']:.2f} | {s.get('calibrate_s_mean', 0):.2f} | "
              f"{s['eval_s_mean']:.2f} |", flush=True)


def _budget_column(env: AutoDFPEnv, strategy: Strategy) -> dict:
    return {"budget_ratio": env.budget_ratio_of(strategy)} if env.quant else {}


def plot(rows: list[dict], path: Path, subtitle: str, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, images in zip(axes, ("lossless", "jpeg"), ("lossless 1,017", "JPEG 10,000")):
        for method in ("SAC", "random"):
            pts = [(r["episodes"], r[key]) for r in rows if r["method"] == method]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        for baseline, style in zip((r for r in rows if r["episodes"] == 0), ("--", ":")):
            ax.axhline(baseline[key], color="grey", linestyle=style,
                       label=baseline["method"].split(" (")[0])
        ax.set(xscale="log", xlabel="episodes", ylabel=f"best-so-far top-1 %, {images}")
    axes[0].legend()
    fig.suptitle(f"{model}, no fine-tuning\n{subtitle}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
