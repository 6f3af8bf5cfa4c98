"""Run, resume and inspect SAC searches through Ray Tune.

A run folder ``<storage>/<name>`` holds Tune's experiment state, ``search.json`` (our config)
and one trial folder with ``best.json``, ``episodes.jsonl``, ``progress.csv``, TensorBoard
event files and checkpoints.
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
from launch.config import SearchConfig

SEARCH_FILE = "search.json"
TUNE_STATE_FILE = "tuner.pkl"
"""What Tune writes into a run folder when the search starts; `Tuner.restore` reads it."""


def build_algorithm_config(cfg: SearchConfig, steps_per_episode: int, cpus_per_runner: float):
    from ray.rllib.algorithms.sac import SACConfig

    # SAC warns, per config copy, that it runs on the new API stack; we chose that stack.
    logging.getLogger("ray.rllib").setLevel(logging.ERROR)

    from envs.autodfp_env import AutoDFPEnv
    from launch.algorithm import AutoDFPSAC

    # Remote runners get as many torch threads as CPUs reserved for them; the in-process
    # runner (num_env_runners=0) keeps torch's default and shares the algorithm's process.
    threads = max(1, int(cpus_per_runner)) if cfg.num_env_runners else 0
    env_config = {**cfg.env, "torch_threads": threads}
    return (
        SACConfig(algo_class=AutoDFPSAC)
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(AutoDFPEnv, env_config=env_config)
        .env_runners(num_env_runners=cfg.num_env_runners,
                     num_cpus_per_env_runner=cpus_per_runner,
                     num_gpus_per_env_runner=cfg.gpus_per_env_runner,
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
                                        "reward_to_all_steps": cfg.reward_to_all_steps,
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


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
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
        try:
            with _stderr_to_file() as ray_log:  # Ray's core warns once a second while retrying
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            last = ray_log[-1:]
            raise AutoDFPError(f"cannot join the Ray cluster at {address}: "
                               f"{str(exc).splitlines()[0]}"
                               + (f" (Ray said: {last[0].split('] ', 1)[-1][:160]})"
                                  if last else "")) from None
    else:
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)


def fit_resources(cfg: SearchConfig, local: bool) -> float:
    """CPUs per env runner that fit the cluster, or a clear error."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_gpus = cfg.num_env_runners * cfg.gpus_per_env_runner
    if need_gpus > gpus:
        raise AutoDFPError(f"{cfg.num_env_runners} env runner(s) x {cfg.gpus_per_env_runner} GPU "
                           f"need {need_gpus:g} GPUs; the cluster has {gpus:g}")
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


def run_search(cfg: SearchConfig, address: str | None = None) -> Path:
    """Start a new search; returns the run folder."""
    from ray import tune

    from launch.algorithm import AutoDFPSAC

    run_dir = Path(cfg.storage).resolve() / cfg.name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise AutoDFPError(f"run folder {run_dir} exists; `autodfp resume {run_dir}` continues "
                           "it, or pass another --name")
    if address:
        check_reachable(address)  # before minutes of data loading and image synthesis
    steps = len(_check_env_builds(cfg).group_names)
    init_ray(address)
    cpus = fit_resources(cfg, local=address is None)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / SEARCH_FILE)
    tuner = tune.Tuner(
        AutoDFPSAC,
        param_space=build_algorithm_config(cfg, steps, cpus),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(run_dir.parent),
            stop={"autodfp/episodes_total": cfg.episodes},
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=cfg.checkpoint_every,
                                                    checkpoint_at_end=True, num_to_keep=3),
            callbacks=[ProgressLine(cfg.episodes)], verbose=0),
    )
    _fit(tuner)
    return run_dir


def resume_search(run_dir: str | Path, address: str | None = None) -> Path:
    from ray import tune

    from launch.algorithm import AutoDFPSAC

    run_dir = check_run_dir(run_dir)
    load_run_config(run_dir)  # a corrupt search.json fails here, in one line
    if not (run_dir / TUNE_STATE_FILE).is_file():
        raise AutoDFPError(f"{run_dir} has no Tune state ({TUNE_STATE_FILE}): the search never "
                           "started or the folder was copied in part; start a new search")
    where = describe_latest_checkpoint(run_dir)
    if address:
        check_reachable(address)  # before Tune's restore
    init_ray(address)
    print(f"resuming {run_dir.name}: latest checkpoint on disk is {where}; Tune resumes from "
          "the last one its experiment state recorded", file=sys.stderr)
    try:
        tuner = tune.Tuner.restore(str(run_dir), trainable=AutoDFPSAC, resume_unfinished=True,
                                   resume_errored=True)
    except Exception as exc:  # Tune raises many types for a damaged experiment state
        raise AutoDFPError(f"cannot restore the search in {run_dir}: its Tune state is damaged "
                           f"({type(exc).__name__}: "
                           f"{_first_line(exc)})") from None
    _fit(tuner)
    return run_dir


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


def _check_env_builds(cfg: SearchConfig):
    """Build the env once in this process: a bad config fails here, in one line, not in Ray.
    Synthetic calibration images are made here (with a progress bar), so that env runners on
    this machine read them from the cache."""
    from envs.autodfp_env import AutoDFPEnv

    env_config = cfg.env_config()
    calibration = env_config.calibration_config()
    if calibration is not None and calibration.images == "synthetic":
        _prepare_synthetic_images(env_config, calibration)
    return AutoDFPEnv({**cfg.env, "reward_size": min(env_config.reward_size, 10)})


def _prepare_synthetic_images(env_config, calibration) -> None:
    from autodfp.models import build_model
    from autodfp.synthetic import cache_path, synthetic_images

    model, spec = build_model(env_config.model, env_config.checkpoint,
                              input_spec=env_config.input_spec())
    if cache_path(model, spec.input_size, calibration.synth).is_file():
        return
    print(f"synthesising {calibration.count} calibration images for {env_config.model} "
          f"({calibration.synth.steps} steps per batch; once, then cached)", file=sys.stderr,
          flush=True)
    start = time.monotonic()
    synthetic_images(model, spec.input_size, calibration.synth, progress=True)
    print(f"calibration images ready in {time.monotonic() - start:.0f} s", file=sys.stderr,
          flush=True)


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise AutoDFPError(f"run folder not found: {run_dir}")
    if not (run_dir / SEARCH_FILE).is_file():
        raise AutoDFPError(f"{run_dir} is not an autodfp run folder (no {SEARCH_FILE})")
    return run_dir


def load_run_config(run_dir: Path) -> SearchConfig:
    try:
        return SearchConfig.from_dict(json.loads((run_dir / SEARCH_FILE).read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise AutoDFPError(f"corrupt {run_dir / SEARCH_FILE}: {exc}") from None


def trial_dir(run_dir: Path) -> Path:
    trials = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("AutoDFPSAC"))
    if not trials:
        raise AutoDFPError(f"{run_dir} holds no trial folder yet (did the search start?)")
    return trials[0]


def describe_latest_checkpoint(run_dir: Path) -> str:
    try:
        checkpoints = sorted(trial_dir(run_dir).glob("checkpoint_*"))
    except AutoDFPError:
        checkpoints = []
    if not checkpoints:
        return "the start (no checkpoint was written)"
    latest = checkpoints[-1]
    return f"{latest.name}"


def load_best(run_dir: str | Path) -> dict:
    """The best episode a run recorded: accuracy, macs_ratio and its strategy."""
    run_dir = check_run_dir(run_dir)
    path = trial_dir(run_dir) / "best.json"
    if not path.is_file():
        raise AutoDFPError(f"{run_dir} has no best strategy yet (no episode finished)")
    try:
        best = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutoDFPError(f"corrupt {path}: {exc}") from None
    if not (isinstance(best, dict) and isinstance(best.get("strategy"), dict)
            and _is_number(best.get("accuracy")) and _is_number(best.get("macs_ratio"))):
        raise AutoDFPError(f"corrupt {path}: expected accuracy, macs_ratio and strategy")
    return best


def load_episodes(run_dir: Path) -> list[dict]:
    """Every complete episode record of a run, in order; torn or garbled lines (a killed
    driver, a damaged disk) are skipped."""
    path = trial_dir(run_dir) / "episodes.jsonl"
    if not path.is_file():
        return []
    episodes = []
    for line in path.read_bytes().decode(errors="replace").splitlines():
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
    """One live line: iteration, episodes, best accuracy so far, episodes per minute."""

    def __init__(self, episodes: int):
        self.episodes = episodes
        self.setup()

    def setup(self, **info):
        """Called by Tune at the start of every fit, including one after a resume."""
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.first = True
        self.done_before = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        stats = result.get("autodfp", {})
        if self.first:
            self.first = False
            self.done_before = stats.get("episodes_total", 0) - stats.get("episodes_this_iter", 0)
            if result.get("training_iteration", 1) > 1:
                print(f"continuing at iteration {result['training_iteration']} "
                      f"({self.done_before} episodes restored)", file=sys.stderr)
        done = stats.get("episodes_total", 0)
        rate = (done - self.done_before) / max(time.monotonic() - self.start, 1e-9) * 60
        budget = (f", budget {stats['best_budget_ratio']:.3f}" if "best_budget_ratio" in stats
                  else "")
        line = (f"iter {result.get('training_iteration', 0):4d} | episodes {done}/{self.episodes}"
                f" | best acc {stats.get('best_accuracy', float('nan')):.4f}"
                f" @ MACs {stats.get('best_macs_ratio', float('nan')):.3f}{budget}"
                f" | last mean {stats.get('accuracy_mean', float('nan')):.4f}"
                f" | {rate:.1f} episodes/min")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)
