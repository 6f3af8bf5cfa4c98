"""RLlib SAC (new API stack) for the AutoDFP search, and the callbacks that keep its books.

- :class:`AutoDFPSAC` is SAC whose checkpoints hold the replay buffer (ray-project/ray#43266:
  on the new stack they do not, so a resumed SAC would restart on an empty buffer).
- :class:`EpisodeBook` is the per-episode bookkeeping, in RLlib's callbacks:

  * ``on_episode_end`` (on the env runner) copies the final reward onto every step (AMC's
    trick; with ``gamma=0`` each layer's action is credited with the episode's accuracy) and
    sends the episode's record (accuracy, MACs ratio, strategy, timings, episode id) to the
    driver as an ``item_series`` metric, in the same sample that carries its steps;
  * ``on_train_result`` (in the algorithm's process) appends the iteration's new records to
    ``episodes.jsonl``, keeps ``best.json``, and puts ``autodfp/...`` results in the Tune
    result (per-episode accuracy and MACs ratio, the best so far, its per-layer keep ratios,
    env runner restarts). Both files go through :class:`launch.storage.Location`, so a run
    on a bucket works as one on a disk.

Exactly once: a record carries its episode id; ids already in ``episodes.jsonl`` are skipped.
An env runner that dies takes its unfinished sample with it, steps and records together, so
SAC never learns from an episode the log lacks, or the reverse.

Resume policy: after ``kill -9`` Tune may restart from an older checkpoint, or from scratch
when it had not yet recorded one. The networks and replay buffer come from that checkpoint,
but evaluated strategies are never forgotten: ``episodes.jsonl`` keeps every episode ever
evaluated (numbered on), and ``best.json`` the best of them.
"""

from __future__ import annotations

import json
import posixpath
import time
from functools import partial

import numpy as np
from ray.rllib.algorithms.sac import SAC
from ray.rllib.callbacks.callbacks import RLlibCallback

from envs.autodfp_env import AutoDFPEnv
from launch.storage import Location

BEST_FILE = "best.json"
EPISODES_FILE = "episodes.jsonl"
EPISODES_METRIC = "autodfp_episodes"
"""Env runner metric that carries finished episodes' records to the driver."""
TRIAL_PREFIX = "AutoDFPSAC_"
EVENTS_DIR = "episodes"
"""Per-episode TensorBoard event files, in each trial folder."""
ASSETS_KEY = "assets"
"""The env_config entry holding the object-store reference to the env's assets."""


class ObjectStoreEnv(AutoDFPEnv):
    """The AutoDFP env fed from the Ray object store: RLlib hands ``env_config`` over as it
    is and does not resolve an ObjectRef nested in it, so the env gets it here."""

    def __init__(self, env_config: dict | None = None):
        import ray

        env_config = dict(env_config or {})
        refs = env_config.pop(ASSETS_KEY, None)
        super().__init__(env_config, assets=ray.get(refs[0]) if refs else None)


def trial_folder_name(trial) -> str:
    """Tune's ``trial_dirname_creator``: short trial folder names."""
    return TRIAL_PREFIX + trial.trial_id


class AutoDFPSAC(SAC):
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self.local_replay_buffer is not None:
            state["replay_buffer"] = self.local_replay_buffer.get_state()
        return state

    def set_state(self, state):
        super().set_state(state)
        if "replay_buffer" in state and self.local_replay_buffer is not None:
            self.local_replay_buffer.set_state(state["replay_buffer"])


def episode_book(run: str | None, reward_to_all_steps: bool = True):
    """The callbacks class for a search whose run folder is ``run`` (a path or URI)."""
    return partial(EpisodeBook, run=run, reward_to_all_steps=reward_to_all_steps)


class EpisodeBook(RLlibCallback):
    def __init__(self, run: str | None = None, reward_to_all_steps: bool = True):
        super().__init__()
        self.run = run
        self.reward_to_all_steps = reward_to_all_steps
        self._log: EpisodeLog | None = None
        self._events = None
        self._runner: dict | None = None
        self.runner_restarts = 0

    # -- on the env runner ----------------------------------------------------------------

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs):
        info = episode.get_infos(-1)
        if "strategy_json" not in info:
            return
        if self.reward_to_all_steps:
            final = float(episode.get_rewards(-1))
            episode.set_rewards(new_data=[final] * len(episode))
        if self._runner is None:  # fixed for this process: the node and the pid
            self._runner = _runner()
        record = {"id": episode.id_, "runner": self._runner, "accuracy": info["accuracy"],
                  "macs_ratio": info["macs_ratio"], "strategy": json.loads(info["strategy_json"]),
                  **({"budget_ratio": info["budget_ratio"]} if "budget_ratio" in info else {}),
                  "timing": info.get("timing", {})}
        metrics_logger.log_value(EPISODES_METRIC, json.dumps(_plain(record)),
                                 reduce="item_series")

    # -- in the algorithm's process --------------------------------------------------------

    def on_env_runners_recreated(self, *, env_runner_indices, is_evaluation=False, **kwargs):
        # RLlib's own count (fault_tolerance/num_remote_worker_restarts) misses runners that
        # Ray restarted by itself; every runner back in service passes through here.
        if not is_evaluation:
            self.runner_restarts += len(env_runner_indices)

    def on_train_result(self, *, algorithm, result, **kwargs):
        records = [json.loads(r) for r in _items(result.get("env_runners", {})
                                                 .pop(EPISODES_METRIC, []))]
        if self._log is None:
            self._log = EpisodeLog(self._trial_location(algorithm))
        best_before = self._log.best["accuracy"] if self._log.best else float("-inf")
        new = self._log.add(records, result.get("training_iteration", 0))
        self._write_events(algorithm, new, best_before)
        summary = self._log.summary(new)
        summary["env_runner_restarts"] = self.runner_restarts
        result["autodfp"] = summary

    def _write_events(self, algorithm, new: list[dict], best: float) -> None:
        """Per-episode TensorBoard scalars (Tune's own logger writes one point per iteration,
        which holds an episode per env runner), under ``episodes/`` in the trial folder. A
        tensorboard writer needs a local folder: on URI storage they go to the trial's working
        folder, which Tune uploads into the trial folder (``sync_artifacts``)."""
        location = self._log.location
        if not new or location is None:
            return
        if self._events is None:
            folder = location.local_path() if location.is_local else algorithm.logdir
            self._events = EpisodeEvents(posixpath.join(str(folder), EVENTS_DIR))
        for record in new:
            best = max(best, record["accuracy"])
            self._events.add(record["episode"], {"episode/accuracy": record["accuracy"],
                                                 "episode/macs_ratio": record["macs_ratio"],
                                                 "episode/best_accuracy": best})

    def _trial_location(self, algorithm) -> Location | None:
        """The trial's folder in the run folder. Under Tune, the trainable's ``logdir`` is a
        local working folder named as the trial's folder in storage."""
        name = posixpath.basename(str(algorithm.logdir or "").rstrip("/"))
        if self.run is None or not name.startswith(TRIAL_PREFIX):  # not run by Tune
            return None
        return Location.of(self.run).child(name)


class EpisodeEvents:
    """A TensorBoard event file written synchronously (tensorboardX's SummaryWriter queues
    events for a thread that a process ending right after the last iteration never lets
    write them)."""

    def __init__(self, folder: str):
        import os
        import socket

        from tensorboardX.record_writer import RecordWriter

        os.makedirs(folder, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self._writer = RecordWriter(os.path.join(folder, name))
        self._write(file_version="brain.Event:2")

    def _write(self, **fields) -> None:
        from tensorboardX.proto import event_pb2

        self._writer.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
        self._writer.flush()

    def add(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto import summary_pb2

        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                  for tag, value in scalars.items()]
        self._write(step=step, summary=summary_pb2.Summary(value=values))


class EpisodeLog:
    """``episodes.jsonl`` and ``best.json`` of one trial (in memory only without a location)."""

    def __init__(self, location: Location | None):
        self.location = location
        self.ids: set[str] = set()
        self.count = 0
        self.best: dict | None = None
        if location is not None:
            self._read_back()

    def _read_back(self) -> None:
        if self.location.is_file(EPISODES_FILE):
            lines = self.location.read_bytes(EPISODES_FILE).decode(errors="replace").splitlines()
            complete = [(line, record) for line in lines
                        if (record := _record(line)) is not None]
            if len(complete) != len(lines):  # a torn last line from a killed driver
                self.location.write_text(EPISODES_FILE,
                                         "".join(line + "\n" for line, _ in complete))
            self.count = len(complete)
            self.ids = {record.get("id") for _, record in complete}
        if self.location.is_file(BEST_FILE):
            try:
                self.best = json.loads(self.location.read_text(BEST_FILE))
            except (ValueError, UnicodeDecodeError):
                self.best = None

    def add(self, records: list[dict], iteration: int) -> list[dict]:
        """Number, log and rank the records not seen before; returns them."""
        new = []
        for record in records:
            if record["id"] in self.ids:
                continue
            self.ids.add(record["id"])
            record = {**record, "episode": self.count}
            self.count += 1
            new.append(record)
            self.best = _better(self.best, record)
        if self.location is not None and new:
            self.location.append_text(EPISODES_FILE, "".join(
                json.dumps(_log_line(r, iteration)) + "\n" for r in new))
            self.location.write_text(BEST_FILE, json.dumps(self.best, indent=2) + "\n")
        return new

    def summary(self, new: list[dict]) -> dict:
        summary = {"episodes_total": self.count, "episodes_this_iter": len(new)}
        if new:
            accuracy = [r["accuracy"] for r in new]
            macs = [r["macs_ratio"] for r in new]
            summary.update(accuracy_mean=float(np.mean(accuracy)),
                           accuracy_max=float(np.max(accuracy)),
                           accuracy_min=float(np.min(accuracy)),
                           macs_ratio_mean=float(np.mean(macs)))
            timing = {k: float(np.mean([r["timing"].get(k, 0.0) for r in new]))
                      for k in ("surgery_s", "calibrate_s", "eval_s")}
            summary["timing"] = timing
        best = self.best
        if best is not None:
            summary["best_accuracy"] = best["accuracy"]
            summary["best_macs_ratio"] = best["macs_ratio"]
            if "budget_ratio" in best:
                summary["best_budget_ratio"] = best["budget_ratio"]
            summary["best_episode"] = best["episode"]
            summary["best_keep"] = {name: layer["keep"]
                                    for name, layer in best["strategy"]["layers"].items()}
        return summary


def _runner() -> dict:
    """Where an episode was evaluated: the Ray node and the env runner's process."""
    import os

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node": node, "pid": os.getpid()}


def _items(value) -> list:
    """An ``item_series`` metric as a list: RLlib hands a lone item over unwrapped, and no
    item as NaN."""
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def _log_line(record: dict, iteration: int) -> dict:
    layers = record["strategy"]["layers"]
    line = {"episode": record["episode"], "id": record["id"], "iteration": iteration,
            "runner": record.get("runner"),
            "accuracy": record["accuracy"], "macs_ratio": record["macs_ratio"],
            "keep": [layer["keep"] for layer in layers.values()],
            "coef": [layer["coef"] for layer in layers.values()]}
    if any("bits" in layer for layer in layers.values()):  # mixed precision
        line.update(bits=[layer.get("bits") for layer in layers.values()],
                    budget_ratio=record.get("budget_ratio"))
    return {**line, "timing": record.get("timing", {}), "time": time.time()}


def _better(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return b if b["accuracy"] > a["accuracy"] else a


def _plain(value):
    """Episode infos come back with numpy scalars inside; JSON wants Python numbers."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, TypeError):
        return None
    return record if isinstance(record, dict) and "episode" in record else None
