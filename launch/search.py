"""Run, resume and inspect SAC searches through Ray Tune.

A run folder ``<storage>/<name>`` (a local path or a URI, :mod:`launch.storage`) holds Tune's
experiment state, ``search.json`` (our config) and one trial folder per trial with
``best.json``, ``episodes.jsonl``, ``progress.csv``, TensorBoard event files and checkpoints.

The driver loads the model, the reward images and the calibration set once
(:class:`envs.autodfp_env.EnvAssets`) and puts them in the Ray object store; env runners get
them from there (:class:`launch.algorithm.ObjectStoreEnv`), so a worker node needs the package alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from autodfp.errors import AutoDFPError
from launch.algorithm import BEST_FILE, EPISODES_FILE, TRIAL_PREFIX
from launch.config import SearchConfig
from launch.storage import Location

SEARCH_FILE = "search.json"
TUNE_STATE_FILE = "tuner.pkl"
"""What Tune writes into a run folder when the search starts; `Tuner.restore` reads it."""


def build_algorithm_config(cfg: SearchConfig, steps_per_episode: int, cpus_per_runner: float,
                           assets_ref=None, run: str | None = None):
    """SAC for ``cfg``; ``assets_ref``: the env's assets in the object store (None: every env
    loads its own); ``run``: the run folder that the episode log and best strategy go to."""
    from ray.rllib.algorithms.sac import SACConfig

    # SAC warns, per config copy, that it runs on the new API stack; we chose that stack.
    logging.getLogger("ray.rllib").setLevel(logging.ERROR)

    from launch.algorithm import ASSETS_KEY, AutoDFPSAC, ObjectStoreEnv, episode_book

    # Remote runners get as many torch threads as CPUs reserved for them; the in-process
    # runner (num_env_runners=0) shares the algorithm's process and every CPU of its machine
    # (the trial starts with one thread).
    threads = max(1, int(cpus_per_runner)) if cfg.num_env_runners else -1
    env_config = {**cfg.env, "torch_threads": threads}
    if assets_ref is not None:
        env_config[ASSETS_KEY] = [assets_ref]  # in a list: Ray passes a nested ref untouched
    return (
        SACConfig(algo_class=AutoDFPSAC)
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(ObjectStoreEnv, env_config=env_config)
        .callbacks(episode_book(run, cfg.reward_to_all_steps))
        .fault_tolerance(restart_failed_env_runners=True,
                         delay_between_env_runner_restarts_s=cfg.restart_delay_s)
        .env_runners(num_env_runners=cfg.num_env_runners,
                     num_cpus_per_env_runner=cpus_per_runner,
                     num_gpus_per_env_runner=cfg.gpus_per_env_runner,
                     custom_resources_per_env_runner=dict(cfg.runner_resources),
                     batch_mode="complete_episodes",
                     rollout_fragment_length=steps_per_episode,
                     sample_timeout_s=cfg.sample_timeout_s)
        .training(gamma=cfg.gamma, n_step=1, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
                  initial_alpha=cfg.initial_alpha,
                  training_intensity=(cfg.updates_per_episode * cfg.batch_size
                                      / (steps_per_episode * (cfg.num_env_runners + 1))),
                  alpha_lr=cfg.alpha_lr, train_batch_size_per_learner=cfg.batch_size,
                  num_steps_sampled_before_learning_starts=cfg.warmup_episodes * steps_per_episode,
                  replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer",
                                        "capacity": cfg.buffer_capacity,
                                        "alpha": 0.6, "beta": 0.4})
        .reporting(min_sample_timesteps_per_iteration=steps_per_episode, min_time_s_per_iteration=0,
                   metrics_num_episodes_for_smoothing=10)
        .debugging(seed=cfg.seed, log_level="ERROR")
    )


JOIN_TIMEOUT_S = 15.0
"""How long joining a cluster may take to answer a TCP connection before we give up."""


def check_reachable(address: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Fail in one line when nothing answers at ``address`` (Ray itself retries for minutes).
    ``auto`` (the cluster this machine belongs to) is left to Ray."""
    import socket

    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise AutoDFPError(f"--address must be host:port or ray://host:port, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = (f"no answer in {timeout_s:.0f} s" if isinstance(exc, TimeoutError)
               else (exc.strerror or str(exc)).lower())
        raise AutoDFPError(f"cannot reach the Ray cluster at {address}: {why} (is `ray start "
                           "--head` running there, and is the port open?)") from None


@contextlib.contextmanager
def _stderr_to_file():
    """Send this process's stderr (file descriptor 2, which Ray's C++ core writes to) to a
    temporary file for the duration of the block; yields a list that then holds its lines."""
    sys.stderr.flush()
    saved, lines = os.dup(2), []
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(log.read().decode(errors="replace").strip().splitlines())


def init_ray(address: str | None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Tune snapshots its experiment state at most this often: after kill -9 a resume starts
    # from the checkpoint recorded in the last snapshot (default "auto" can lag ~10 s).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    kwargs = dict(log_to_driver=False, include_dashboard=False, logging_level="ERROR",
                  configure_logging=True)
    if address:  # callers ran check_reachable before their slow work
        if dashboard:
            print("note: --dashboard starts the dashboard of an embedded Ray; a cluster has "
                  "its own (`ray dashboard cluster.yaml`, or port 8265 of its head)",
                  file=sys.stderr)
        try:
            with _stderr_to_file() as ray_log:  # Ray's core warns once a second while retrying
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            last = ray_log[-1:]
            raise AutoDFPError(f"cannot join the Ray cluster at {address}: "
                               f"{str(exc).splitlines()[0]}"
                               + (f" (Ray said: {last[0].split('] ', 1)[-1][:160]})"
                                  if last else "")) from None
        return
    if dashboard:  # with token authentication (the CLI sets RAY_AUTH_MODE before Ray loads)
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1")
    context = ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    if dashboard:
        print(f"Ray dashboard: http://{context.dashboard_url} (loopback only; its token: "
              "`ray get-auth-token`)", file=sys.stderr, flush=True)


def fit_resources(cfg: SearchConfig, local: bool) -> float:
    """CPUs per env runner that fit the cluster, or a clear error."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_gpus = cfg.num_env_runners * cfg.gpus_per_env_runner
    if need_gpus > gpus:
        raise AutoDFPError(f"{cfg.num_env_runners} env runner(s) x {cfg.gpus_per_env_runner} GPU "
                           f"need {need_gpus:g} GPUs; the cluster has {gpus:g}")
    for name, amount in cfg.runner_resources.items():
        have = total.get(name, 0.0)
        if cfg.num_env_runners * amount > have:
            raise AutoDFPError(f"{cfg.num_env_runners} env runner(s) x {amount:g} {name!r} need "
                               f"{cfg.num_env_runners * amount:g}; the cluster has {have:g} "
                               f"(nodes offer it with `ray start --resources '{{\"{name}\": N}}'`)")
    if cfg.num_env_runners == 0:
        return cfg.cpus_per_env_runner
    free = cpus - 1.0  # the algorithm (and its learner) keep one CPU
    need = cfg.num_env_runners * cfg.cpus_per_env_runner
    if need <= free:
        return cfg.cpus_per_env_runner
    if local and free > 0:
        fitted = round(free / cfg.num_env_runners, 3)
        print(f"note: {cfg.num_env_runners} env runners x {cfg.cpus_per_env_runner:g} CPU do not "
              f"fit {cpus:g} CPUs; using {fitted:g} CPU each", file=sys.stderr)
        return fitted
    raise AutoDFPError(f"{cfg.num_env_runners} env runners x {cfg.cpus_per_env_runner:g} CPU need "
                       f"{need + 1:g} CPUs with the algorithm; the cluster has {cpus:g}. "
                       f"Lower --num-env-runners or --cpus-per-runner")


def _tuner_options(cfg: SearchConfig, run) -> dict:
    from ray import tune

    from launch.algorithm import trial_folder_name

    return dict(
        tune_config=tune.TuneConfig(trial_dirname_creator=trial_folder_name),
        run_config=tune.RunConfig(
            name=run.name, storage_path=run.uri.rsplit("/", 1)[0],
            stop={"autodfp/episodes_total": cfg.episodes},
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=cfg.checkpoint_every,
                                                    checkpoint_at_end=True, num_to_keep=3),
            failure_config=tune.FailureConfig(max_failures=cfg.max_trial_failures),
            # on URI storage: uploads each trial's working folder (per-episode TensorBoard
            # events) into its trial folder, at every checkpoint and at most every 10 s between
            sync_config=tune.SyncConfig(sync_artifacts=True, sync_period=10),
            callbacks=[ProgressLine(cfg.episodes)], verbose=0))


def _param_space(config, budgets: list[float] | None):
    """The SAC config, or with ``budgets`` a grid over the env's MACs budget (one trial each)."""
    if not budgets:
        return config
    from ray import tune

    space = config.to_dict()
    space["env_config"] = {**space["env_config"], "macs_budget": tune.grid_search(budgets)}
    return space


def run_search(cfg: SearchConfig, address: str | None = None,
               dashboard: bool = False) -> Location:
    """Start a new search; returns the run folder. With ``cfg.sweep_budgets``, one trial per
    MACs budget, run concurrently as far as resources allow (``autodfp sweep``)."""
    import ray
    from ray import tune

    from launch.algorithm import AutoDFPSAC

    run = Location.of(cfg.storage).child(cfg.name)
    if run.is_dir() and not run.is_empty():
        raise AutoDFPError(f"run folder {run} exists; `autodfp resume {run}` continues "
                           "it, or pass another --name")
    if address:
        check_reachable(address)  # before minutes of data loading and image synthesis
    budgets = cfg.sweep_budgets
    steps, assets = load_assets(cfg, budgets)
    init_ray(address, dashboard=dashboard)
    cpus = fit_resources(cfg, local=address is None)
    assets = ray.put(assets)
    run.makedirs()
    cfg.save(run, SEARCH_FILE)
    config = build_algorithm_config(cfg, steps, cpus, assets, run.uri)
    tuner = tune.Tuner(AutoDFPSAC, param_space=_param_space(config, budgets),
                       **_tuner_options(cfg, run))
    _fit(tuner)
    return run


def resume_search(run_dir: str | Path, address: str | None = None,
                  dashboard: bool = False) -> Location:
    import ray
    from ray import tune

    from launch.algorithm import AutoDFPSAC

    run = check_run_dir(run_dir)
    cfg = load_run_config(run)  # a corrupt search.json fails here, in one line
    budgets = cfg.sweep_budgets
    if not run.is_file(TUNE_STATE_FILE):
        raise AutoDFPError(f"{run} has no Tune state ({TUNE_STATE_FILE}): the search never "
                           "started or the folder was copied in part; start a new search")
    where = describe_latest_checkpoint(run)
    if address:
        check_reachable(address)  # before Tune's restore
    steps, assets = load_assets(cfg, budgets)
    init_ray(address, dashboard=dashboard)
    cpus = fit_resources(cfg, local=address is None)
    # The object references of the first start died with its driver: fresh ones, same config.
    config = build_algorithm_config(cfg, steps, cpus, ray.put(assets), run.uri)
    print(f"resuming {run.name}: latest checkpoint on disk is {where}; Tune resumes from "
          "the last one its experiment state recorded", file=sys.stderr)
    try:
        tuner = tune.Tuner.restore(run.uri, trainable=AutoDFPSAC, resume_unfinished=True,
                                   resume_errored=True,
                                   param_space=_param_space(config, budgets))
    except Exception as exc:  # Tune raises many types for a damaged experiment state
        raise AutoDFPError(f"cannot restore the search in {run}: its Tune state is damaged "
                           f"({type(exc).__name__}: "
                           f"{_first_line(exc)})") from None
    _fit(tuner)
    return run


def _fit(tuner) -> None:
    result_grid = tuner.fit()
    errors = [r.error for r in result_grid if r.error is not None]
    if errors:
        raise AutoDFPError(f"the search failed: {_root_cause(errors[0])}")
    print(file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _root_cause(error: BaseException) -> str:
    """The last line of a (remote) error, which names the original exception; Ray wraps an
    env runner's error in several layers. An AutoDFPError from a worker keeps its text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def load_assets(cfg: SearchConfig, budgets: list[float] | None = None):
    """The env's assets, loaded once in this process, and the steps of an episode. An env is
    built on them (one per budget of a sweep), so that a bad config fails here, in one line,
    not in Ray. Synthetic calibration images are made first, with a progress bar."""
    from envs.autodfp_env import AutoDFPEnv, EnvAssets

    env_config = cfg.env_config()
    if env_config.calibration is not None:
        _prepare_synthetic_images(env_config)
    assets = EnvAssets.load(env_config)
    for budget in budgets or [env_config.macs_budget]:
        env = AutoDFPEnv({**cfg.env, "macs_budget": budget}, assets=assets)
    return len(env.group_names), assets.portable()


def _prepare_synthetic_images(env_config) -> None:
    from autodfp.models import build_model
    from autodfp.calibrate.synthetic import cache_path, synthetic_images

    model, spec = build_model(env_config.model, env_config.checkpoint,
                              input_spec=env_config.input_spec())
    calibration = env_config.calibration_config(spec.input_size)
    if (calibration.images != "synthetic"
            or cache_path(model, spec.input_size, calibration.synth, spec.mean, spec.std).is_file()):
        return
    print(f"synthesising {calibration.count} calibration images for {env_config.model} "
          f"({calibration.synth.steps} steps per batch; once, then cached)", file=sys.stderr,
          flush=True)
    start = time.monotonic()
    synthetic_images(model, spec.input_size, calibration.synth, mean=spec.mean, std=spec.std,
                     progress=True)
    print(f"calibration images ready in {time.monotonic() - start:.0f} s", file=sys.stderr,
          flush=True)


def check_run_dir(run_dir: str | Path | Location) -> Location:
    run = run_dir if isinstance(run_dir, Location) else Location.of(run_dir)
    if not run.is_dir():
        raise AutoDFPError(f"run folder not found: {run}")
    if not run.is_file(SEARCH_FILE):
        raise AutoDFPError(f"{run} is not an autodfp run folder (no {SEARCH_FILE})")
    return run


def load_run_config(run_dir: str | Path | Location) -> SearchConfig:
    run = check_run_dir(run_dir)
    try:
        return SearchConfig.from_dict(json.loads(run.read_text(SEARCH_FILE)))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutoDFPError(f"corrupt {run}/{SEARCH_FILE}: {exc}") from None


def trial_dirs(run_dir: str | Path | Location) -> list[Location]:
    """The run's trial folders (one per budget in a sweep), in Tune's order."""
    run = check_run_dir(run_dir)
    return [run.child(name) for name in run.list_dirs() if name.startswith(TRIAL_PREFIX)]


def trial_dir(run_dir: str | Path | Location) -> Location:
    trials = trial_dirs(run_dir)
    if not trials:
        raise AutoDFPError(f"{run_dir} holds no trial folder yet (did the search start?)")
    return trials[0]


def trial_budgets(run_dir) -> list[tuple[Location, float | None]]:
    """Each trial folder with its MACs budget in a sweep (None in a plain search)."""
    run = check_run_dir(run_dir)
    trials = trial_dirs(run)
    if not trials:
        raise AutoDFPError(f"{run} holds no trial folder yet (did the search start?)")
    if load_run_config(run).sweep_budgets is None:
        return [(trials[0], None)]
    pairs = []
    for trial in trials:
        try:
            params = json.loads(trial.read_text("params.json"))
            pairs.append((trial, float(params["env_config"]["macs_budget"])))
        except (AutoDFPError, ValueError, KeyError, TypeError):
            continue  # a trial Tune had not yet started
    return sorted(pairs, key=lambda pair: pair[1])


def pick_trial(run_dir, budget: float | None) -> Location:
    """The trial of ``budget`` in a sweep (required there), or the run's only trial."""
    pairs = trial_budgets(run_dir)
    if pairs[0][1] is None:
        if budget is not None:
            raise AutoDFPError(f"{run_dir} is a search, not a sweep: drop --budget")
        return pairs[0][0]
    budgets = ", ".join(f"{b:g}" for _, b in pairs)
    if budget is None:
        raise AutoDFPError(f"{run_dir} is a sweep: pick a trial with --budget ({budgets})")
    for trial, b in pairs:
        if abs(b - budget) < 1e-9:
            return trial
    raise AutoDFPError(f"{run_dir} has no trial at budget {budget:g} ({budgets})")


def describe_latest_checkpoint(run: Location) -> str:
    try:
        checkpoints = [n for n in trial_dir(run).list_dirs() if n.startswith("checkpoint_")]
    except AutoDFPError:
        checkpoints = []
    if not checkpoints:
        return "the start (no checkpoint was written)"
    return checkpoints[-1]


def load_best(run_dir: str | Path | Location, trial: Location | None = None) -> dict:
    """The best episode a run (or one of its trials) recorded: accuracy, macs_ratio and its
    strategy."""
    trial = trial or trial_dir(run_dir)
    if not trial.is_file(BEST_FILE):
        raise AutoDFPError(f"{run_dir} has no best strategy yet (no episode finished)")
    try:
        best = json.loads(trial.read_text(BEST_FILE))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutoDFPError(f"corrupt {trial}/{BEST_FILE}: {exc}") from None
    if not (isinstance(best, dict) and isinstance(best.get("strategy"), dict)
            and _is_number(best.get("accuracy")) and _is_number(best.get("macs_ratio"))):
        raise AutoDFPError(f"corrupt {trial}/{BEST_FILE}: expected accuracy, macs_ratio and "
                           "strategy")
    return best


def load_episodes(run_dir: str | Path | Location, trial: Location | None = None) -> list[dict]:
    """Every complete episode record of a run (or one of its trials), in order; torn or
    garbled lines (a killed driver, a damaged disk) are skipped."""
    trial = trial or trial_dir(run_dir)
    if not trial.is_file(EPISODES_FILE):
        return []
    episodes = []
    for line in trial.read_bytes(EPISODES_FILE).decode(errors="replace").splitlines():
        try:
            episode = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _is_episode(episode):
            episodes.append(episode)
    return episodes


EPISODE_LISTS = ("keep", "coef")


def _is_episode(record) -> bool:
    return (isinstance(record, dict)
            and all(_is_number(record.get(k)) for k in ("accuracy", "macs_ratio", "time"))
            and all(isinstance(record.get(k), list) and all(map(_is_number, record[k]))
                    for k in EPISODE_LISTS)
            and isinstance(record.get("timing", {}), dict)
            and (record.get("bits") is None or (
                isinstance(record["bits"], list) and len(record["bits"]) == len(record["keep"])
                and all(b is None or (isinstance(b, int) and not isinstance(b, bool))
                        for b in record["bits"]))))


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class ProgressLine(Callback):
    """One live line per result: iteration, episodes, best accuracy so far, episodes per
    minute, env runner restarts (and the trial's budget in a sweep)."""

    def __init__(self, episodes: int):
        self.episodes = episodes
        self.setup()

    def setup(self, **info):
        """Called by Tune at the start of every fit, including one after a resume."""
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.done_before: dict[str, int] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        stats = result.get("autodfp", {})
        if trial.trial_id not in self.done_before:
            self.done_before[trial.trial_id] = (stats.get("episodes_total", 0)
                                                - stats.get("episodes_this_iter", 0))
            if result.get("training_iteration", 1) > 1:
                print(f"continuing at iteration {result['training_iteration']} "
                      f"({self.done_before[trial.trial_id]} episodes restored)", file=sys.stderr)
        done = stats.get("episodes_total", 0)
        rate = ((done - self.done_before[trial.trial_id])
                / max(time.monotonic() - self.start, 1e-9) * 60)
        budget = (f", budget {stats['best_budget_ratio']:.3f}" if "best_budget_ratio" in stats
                  else "")
        env = result.get("config", {}).get("env_config", {})
        swept = env.get("macs_budget")
        prefix = f"[MACs {swept:g}] " if len(trials) > 1 and swept is not None else ""
        restarts = stats.get("env_runner_restarts", 0)
        line = (f"{prefix}iter {result.get('training_iteration', 0):4d} | episodes "
                f"{done}/{self.episodes}"
                f" | best {'reward' if env.get('reward') == 'synthetic' else 'acc'} "
                f"{stats.get('best_accuracy', float('nan')):.4f}"
                f" @ MACs {stats.get('best_macs_ratio', float('nan')):.3f}{budget}"
                f" | last mean {stats.get('accuracy_mean', float('nan')):.4f}"
                f" | {rate:.1f} episodes/min" + (f" | {restarts} runner restarts" if restarts else ""))
        live = self.tty and len(trials) == 1
        print(("\r" + line) if live else line, end="" if live else "\n",
              file=sys.stderr, flush=True)
