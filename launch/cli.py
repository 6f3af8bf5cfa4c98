"""The ``autodfp`` command: the core commands (:mod:`launch.commands`, no Ray) plus search,
sweep, resume, export and report, which need the ``search`` extra."""

from __future__ import annotations

import functools
import os
import sys

from autodfp.errors import AutoDFPError
from launch.commands import (add_core_commands, add_output_arguments, dispatch, new_parser,
                             whole_number)

SEARCH_EXTRA = ("ray", "gymnasium", "yaml", "matplotlib")
"""Top-level packages of the ``search`` extra."""


def needs_search_extra(command):
    """One ``error:`` line, not a traceback, when the search extra is not installed."""
    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in SEARCH_EXTRA:
                raise
            raise AutoDFPError(f"autodfp {args.command} needs the search extra ({exc.name} is "
                               "not installed): pip install 'autodfp[search]'") from None
    return run


def add_search_commands(sub) -> dict:
    search = sub.add_parser("search", help="run a SAC search (embedded local Ray by default)")
    _add_search_arguments(search)
    sweep = sub.add_parser("sweep", help="one SAC search per MACs budget, concurrently, in one "
                                         "Tune experiment; plots the accuracy-vs-MACs front")
    _add_search_arguments(sweep)
    sweep.add_argument("--budgets", required=True, type=_budget_list, metavar="B1,B2,...",
                       help="MACs budgets, e.g. 0.3,0.4,0.5,0.6,0.7")

    resume = sub.add_parser("resume", help="continue a search or sweep from its last checkpoint")
    resume.add_argument("run_dir", help="run folder: a path or a storage URI")
    resume.add_argument("--address")
    resume.add_argument("--dashboard", action="store_true", help=DASHBOARD_HELP)

    export = sub.add_parser("export", help="the best strategy of a run -> pruned model + report")
    export.add_argument("run_dir", help="run folder: a path or a storage URI")
    export.add_argument("--budget", type=float, help="in a sweep: the trial of this MACs budget")
    export.add_argument("--rerank", type=whole_number("--rerank", minimum=0), default=0,
                        metavar="K", help="re-score the K best episodes on training images the "
                        "reward set does not hold and export the best of them (default 0: the "
                        "best reward)")
    export.add_argument("--rerank-images", type=whole_number("--rerank-images"), default=5000,
                        metavar="N", help="validation images for --rerank (default 5000)")
    add_output_arguments(export)

    report = sub.add_parser("report", help="plots of a run; --compare adds the baselines")
    report.add_argument("run_dir", help="run folder: a path or a storage URI")
    report.add_argument("--compare", action="store_true",
                        help="also run uniform and random search at the same budget and "
                             "compare on the test images")
    handlers = {"search": cmd_search, "sweep": cmd_sweep, "resume": cmd_resume,
                "export": cmd_export, "report": cmd_report}
    return {name: needs_search_extra(command) for name, command in handlers.items()}


DASHBOARD_HELP = ("start the Ray dashboard on 127.0.0.1 (embedded Ray only; off by default) "
                  "and print its address")


def _add_search_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config file or preset name (resnet20-quick, "
                                       "resnet56-half, resnet56-gpu, ...)")
    parser.add_argument("--address", help="join an existing Ray cluster (host:port or "
                                          "ray://host:port; `auto`: the one this node is in)")
    parser.add_argument("--name", help="run name (default: the config's)")
    parser.add_argument("--storage", help="where run folders go: a folder, or a URI such as "
                                          "s3://bucket/runs (default: the config's, runs/)")
    parser.add_argument("--episodes", type=whole_number("--episodes"),
                        help="override the number of episodes (per trial in a sweep)")
    parser.add_argument("--num-env-runners", type=whole_number("--num-env-runners", minimum=0))
    parser.add_argument("--cpus-per-runner", type=float)
    parser.add_argument("--gpus-per-runner", type=float)
    parser.add_argument("--dashboard", action="store_true", help=DASHBOARD_HELP)


def _budget_list(text: str) -> list[float]:
    import argparse

    from autodfp.errors import AutoDFPError

    try:
        from launch.config import check_budget
    except ModuleNotFoundError as exc:
        raise argparse.ArgumentTypeError(f"autodfp sweep needs the search extra ({exc.name} is "
                                         "not installed): pip install 'autodfp[search]'") from None

    try:
        budgets = [check_budget(float(b)) for b in text.split(",") if b.strip()]
    except (ValueError, AutoDFPError) as exc:
        raise argparse.ArgumentTypeError(f"--budgets: {exc}") from None
    if len(budgets) < 1 or len(set(budgets)) != len(budgets):
        raise argparse.ArgumentTypeError(f"--budgets needs distinct numbers in (0, 1], got {text!r}")
    return sorted(budgets)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _ray_settings(args) -> str | None:
    """Environment Ray reads when it is imported, so set before that: the cluster address
    (returned) and, with ``--dashboard`` on an embedded Ray, token authentication (the
    dashboard then answers only requests that carry the token)."""
    address = _cluster_address(args.address)
    if getattr(args, "dashboard", False) and not address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    return address


def _cluster_address(address: str | None) -> str | None:
    """``--address``, else ``$RAY_ADDRESS`` (what `ray job submit` sets for its entrypoint).
    Ray turns a loopback address into this machine's network IP, where a cluster started with
    ``--node-ip-address 127.0.0.1`` does not listen: for a loopback address, keep loopback
    (Ray reads the switch when it is imported, so this runs first)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        host = address.split("://", 1)[-1].rsplit(":", 1)[0]
        if host in LOOPBACK_HOSTS:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return address


def _search_config(args, **more):
    from launch.config import SearchConfig

    cfg = SearchConfig.load(args.config).to_dict()
    overrides = {"name": args.name, "storage": args.storage, "episodes": args.episodes,
                 "num_env_runners": args.num_env_runners,
                 "cpus_per_env_runner": args.cpus_per_runner,
                 "gpus_per_env_runner": args.gpus_per_runner, **more}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return SearchConfig.from_dict(cfg)


def cmd_search(args) -> int:
    address = _ray_settings(args)
    from launch.search import run_search

    run = run_search(_search_config(args), address=address, dashboard=args.dashboard)
    _print_best(run)
    return 0


def cmd_sweep(args) -> int:
    from launch.search import run_search

    address = _ray_settings(args)
    from launch.report import format_front, plot_front

    cfg = _search_config(args, sweep_budgets=args.budgets)
    run = run_search(cfg, address=address, dashboard=args.dashboard)
    _print_best(run)
    print(f"wrote {plot_front(run)}")
    print(format_front(run))
    return 0


def cmd_resume(args) -> int:
    address = _ray_settings(args)
    from launch.search import resume_search

    _print_best(resume_search(args.run_dir, address=address, dashboard=args.dashboard))
    return 0


def _print_best(run) -> None:
    from envs.autodfp_env import REWARD_NAMES
    from launch.search import load_best, load_run_config, trial_budgets

    print(f"run folder: {run}")
    reward = REWARD_NAMES[load_run_config(run).env_config().reward]
    trials = trial_budgets(run)
    for trial, budget in trials:
        best = load_best(run, trial)
        share = (f", budget share {best['budget_ratio']:.3f}"
                 if isinstance(best.get("budget_ratio"), float) else "")
        swept = f" [budget {budget:g}]" if budget is not None else ""
        print(f"best{swept}: {reward} {best['accuracy']:.4f} at MACs "
              f"{best['macs_ratio']:.3f}{share} (episode {best['episode']})")
    print(f"next: autodfp export {run} --out DIR"
          + (" --budget B" if trials[0][1] is not None else ""))


def cmd_export(args) -> int:
    from launch.commands import check_out, write_pruned
    from autodfp.pipeline import apply_strategy
    from autodfp.strategy import Strategy
    from launch.search import check_run_dir, load_best, pick_trial

    run_dir = check_run_dir(args.run_dir)
    trial = pick_trial(run_dir, args.budget)
    best = load_best(run_dir, trial)
    check_out(args.out, args.force)
    search = {"run": str(run_dir), "trial": trial.name}
    if args.rerank:
        from launch.rerank import rerank

        print(f"re-scoring the {args.rerank} best episodes on {args.rerank_images} validation "
              "images", file=sys.stderr, flush=True)
        best, pruned, rows = rerank(run_dir, args.rerank, args.rerank_images, trial)
        search.update(selected_by=f"validation ({args.rerank_images} training images, "
                                  "disjoint from the reward set)", candidates=rows)
    else:
        pruned = apply_strategy(Strategy.from_dict(best["strategy"]))
    search.update(episode=best["episode"], reward_accuracy=best["accuracy"],
                  macs_ratio_model=best["macs_ratio"])
    from envs.autodfp_env import search_images
    from launch.search import load_run_config

    splits = None if args.no_eval else search_images(
        load_run_config(run_dir).env_config(), pruned.spec)[1]
    write_pruned(pruned, args, {"search": search}, splits=splits)
    return 0



def cmd_report(args) -> int:
    from launch.report import compare_with_baselines, format_compare, format_front, plot_run
    from launch.search import check_run_dir, load_run_config

    run_dir = check_run_dir(args.run_dir)
    if args.compare:
        print(format_compare(compare_with_baselines(run_dir)))
    for path in plot_run(run_dir):
        print(f"wrote {path}")
    if load_run_config(run_dir).sweep_budgets is not None:
        print(format_front(run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, sub = new_parser()
    handlers = {**add_core_commands(sub), **add_search_commands(sub)}
    return dispatch(parser, handlers, argv)


if __name__ == "__main__":
    sys.exit(main())
