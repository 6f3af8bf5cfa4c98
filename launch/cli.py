"""The ``autodfp`` command: the core commands plus search, resume, export and report."""

from __future__ import annotations

import sys
from pathlib import Path

from autodfp.cli import (add_core_commands, add_output_arguments, dispatch, new_parser,
                         whole_number)


def add_search_commands(sub) -> dict:
    search = sub.add_parser("search", help="run a SAC search (embedded local Ray by default)")
    search.add_argument("config", help="YAML config file or preset name (resnet20-quick, "
                                       "resnet56-half)")
    search.add_argument("--address", help="join an existing Ray cluster (ray://... or host:port)")
    search.add_argument("--name", help="run name (default: the config's)")
    search.add_argument("--storage", help="folder for run folders (default: the config's, runs/)")
    search.add_argument("--episodes", type=int, help="override the number of episodes")
    search.add_argument("--num-env-runners", type=int)
    search.add_argument("--cpus-per-runner", type=float)
    search.add_argument("--gpus-per-runner", type=float)

    resume = sub.add_parser("resume", help="continue a search from its last checkpoint")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument("--address")

    export = sub.add_parser("export", help="the best strategy of a run -> pruned model + report")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--rerank", type=whole_number("--rerank", minimum=0), default=0,
                        metavar="K", help="re-score the K best episodes on training images the "
                        "reward set does not hold and export the best of them (default 0: the "
                        "best reward)")
    export.add_argument("--rerank-images", type=whole_number("--rerank-images"), default=5000,
                        metavar="N", help="validation images for --rerank (default 5000)")
    add_output_arguments(export)

    report = sub.add_parser("report", help="plots of a run; --compare adds the baselines")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--compare", action="store_true",
                        help="also run uniform and random search at the same budget and "
                             "compare on the test images")
    return {"search": cmd_search, "resume": cmd_resume, "export": cmd_export,
            "report": cmd_report}


def cmd_search(args) -> int:
    from launch.config import SearchConfig
    from launch.search import run_search

    cfg = SearchConfig.load(args.config).to_dict()
    overrides = {"name": args.name, "storage": args.storage, "episodes": args.episodes,
                 "num_env_runners": args.num_env_runners,
                 "cpus_per_env_runner": args.cpus_per_runner,
                 "gpus_per_env_runner": args.gpus_per_runner}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    run_dir = run_search(SearchConfig.from_dict(cfg), address=args.address)
    _print_best(run_dir)
    return 0


def cmd_resume(args) -> int:
    from launch.search import resume_search

    _print_best(resume_search(args.run_dir, address=args.address))
    return 0


def _print_best(run_dir: Path) -> None:
    from launch.search import load_best

    best = load_best(run_dir)
    print(f"run folder: {run_dir}")
    budget = (f", budget share {best['budget_ratio']:.3f}"
              if isinstance(best.get("budget_ratio"), float) else "")
    print(f"best: reward-set accuracy {best['accuracy']:.4f} at MACs {best['macs_ratio']:.3f}"
          f"{budget} (episode {best['episode']}); next: autodfp export {run_dir} --out DIR")


def cmd_export(args) -> int:
    from autodfp.cli import check_out, write_pruned
    from autodfp.pruning import apply_strategy
    from autodfp.strategy import Strategy
    from launch.search import check_run_dir, load_best

    run_dir = check_run_dir(args.run_dir)
    best = load_best(run_dir)
    check_out(args.out, args.force)
    search = {"run": str(run_dir)}
    if args.rerank:
        from launch.rerank import rerank

        print(f"re-scoring the {args.rerank} best episodes on {args.rerank_images} validation "
              "images", file=sys.stderr, flush=True)
        best, pruned, rows = rerank(run_dir, args.rerank, args.rerank_images)
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
    from launch.report import compare_with_baselines, format_compare, plot_run
    from launch.search import check_run_dir

    run_dir = check_run_dir(args.run_dir)
    if args.compare:
        print(format_compare(compare_with_baselines(run_dir)))
    for path in plot_run(run_dir):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, sub = new_parser()
    handlers = {**add_core_commands(sub), **add_search_commands(sub)}
    return dispatch(parser, handlers, argv)


if __name__ == "__main__":
    sys.exit(main())
