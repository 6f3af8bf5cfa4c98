"""RLlib SAC (new API stack) specialised for the AutoDFP search.

Two things plain SAC lacks here:

- The replay buffer is saved in checkpoints (ray-project/ray#43266: on the new stack it is not,
  so a resumed SAC would restart on an empty buffer): :meth:`AutoDFPSAC.get_state` adds it.
- Every finished episode passes through :class:`RecordingReplayBuffer.add` on the driver side,
  where (a) the final reward is copied onto every step (AMC's trick; with ``gamma=0`` each
  layer's action is credited with the episode's accuracy) and (b) the episode's strategy,
  accuracy and MACs ratio are recorded. :meth:`AutoDFPSAC.step` turns those records into Tune
  results (per-episode accuracy, MACs ratio, best strategy's per-layer keep ratios), an
  ``episodes.jsonl`` log, and ``best.json`` written atomically into the trial folder.

Resume policy: after ``kill -9`` Tune may restart from an older checkpoint, or from scratch
when it had not yet recorded one. The networks and replay buffer come from that checkpoint,
but evaluated strategies are never forgotten: ``episodes.jsonl`` keeps every episode ever
evaluated (numbered on), and the best strategy is the better of the checkpoint's and the
``best.json`` on disk.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from ray.rllib.algorithms.sac import SAC
from ray.rllib.utils.replay_buffers.prioritized_episode_buffer import (
    PrioritizedEpisodeReplayBuffer,
)

from autodfp.io import atomic_write_text

BEST_FILE = "best.json"
EPISODES_FILE = "episodes.jsonl"


class RecordingReplayBuffer(PrioritizedEpisodeReplayBuffer):
    def __init__(self, *args, reward_to_all_steps: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_to_all_steps = reward_to_all_steps
        self.finished: list[dict] = []

    def add(self, episodes, weight=None):
        episodes = episodes if isinstance(episodes, list) else [episodes]
        for episode in episodes:
            if not episode.is_done:
                continue
            info = episode.get_infos(-1)
            if "strategy_json" not in info:
                continue
            final = float(episode.get_rewards(-1))
            if self.reward_to_all_steps:
                rewards = episode.rewards.data
                if isinstance(rewards, np.ndarray) and not rewards.flags.writeable:
                    episode.rewards.data = rewards.copy()  # episodes from remote runners
                episode.set_rewards(new_data=np.full(len(episode), final, dtype=np.float32))
            self.finished.append(_plain({"accuracy": info["accuracy"],
                                         "macs_ratio": info["macs_ratio"],
                                         "strategy": json.loads(info["strategy_json"]),
                                         **({"budget_ratio": info["budget_ratio"]}
                                            if "budget_ratio" in info else {}),
                                         "timing": info.get("timing", {})}))
        super().add(episodes, weight)

    def drain(self) -> list[dict]:
        finished, self.finished = self.finished, []
        return finished


def _quantized_fields(record: dict) -> dict:
    """Per-layer bits and the budget share of a mixed-precision episode (nothing otherwise)."""
    layers = record["strategy"]["layers"].values()
    if not any("bits" in layer for layer in layers):
        return {}
    return {"bits": [layer.get("bits") for layer in layers],
            "budget_ratio": record.get("budget_ratio")}


class AutoDFPSAC(SAC):
    def setup(self, config):
        super().setup(config)
        self.autodfp = {"episodes": 0, "best": self._best_on_disk()}
        self._logged = self._count_logged_episodes()

    def _create_local_replay_buffer_if_necessary(self, config):
        # SACConfig.validate() accepts buffer types only by name, so the subclass is swapped
        # in here rather than named in the config.
        options = {k: v for k, v in config["replay_buffer_config"].items() if k != "type"}
        options["metrics_num_episodes_for_smoothing"] = (
            self.config.metrics_num_episodes_for_smoothing)
        return RecordingReplayBuffer(**options)

    # -- state ----------------------------------------------------------------------------

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["autodfp"] = dict(self.autodfp)
        if self.local_replay_buffer is not None:
            state["replay_buffer"] = self.local_replay_buffer.get_state()
        return state

    def set_state(self, state):
        super().set_state(state)
        if "autodfp" in state:
            restored = dict(state["autodfp"])
            restored["best"] = _better(restored.get("best"), self._best_on_disk())
            self.autodfp = restored
        if "replay_buffer" in state and self.local_replay_buffer is not None:
            self.local_replay_buffer.set_state(state["replay_buffer"])

    # -- results --------------------------------------------------------------------------

    def step(self):
        result = super().step()
        finished = self.local_replay_buffer.drain()
        first = self._logged
        for i, record in enumerate(finished):
            self.autodfp["best"] = _better(self.autodfp["best"], {**record, "episode": first + i})
        self.autodfp["episodes"] += len(finished)
        self._logged += len(finished)
        self._log_episodes(finished, first)
        result["autodfp"] = self._summary(finished)
        return result

    def _summary(self, finished: list[dict]) -> dict:
        best = self.autodfp["best"]
        summary = {"episodes_total": self.autodfp["episodes"],
                   "episodes_this_iter": len(finished)}
        if finished:
            summary["accuracy_mean"] = float(np.mean([r["accuracy"] for r in finished]))
            summary["accuracy_max"] = float(np.max([r["accuracy"] for r in finished]))
            summary["macs_ratio_mean"] = float(np.mean([r["macs_ratio"] for r in finished]))
        if best is not None:
            summary["best_accuracy"] = best["accuracy"]
            summary["best_macs_ratio"] = best["macs_ratio"]
            if "budget_ratio" in best:
                summary["best_budget_ratio"] = best["budget_ratio"]
            summary["best_episode"] = best["episode"]
            summary["best_keep"] = {name: layer["keep"]
                                    for name, layer in best["strategy"]["layers"].items()}
        return summary

    # -- files in the trial folder ---------------------------------------------------------

    def _trial_dir(self) -> Path | None:
        storage = getattr(self, "_storage", None)
        if storage is None or storage.trial_dir_name is None:
            return None
        return Path(storage.trial_fs_path)

    def _log_episodes(self, finished: list[dict], first: int) -> None:
        trial_dir = self._trial_dir()
        if trial_dir is None:
            return
        trial_dir.mkdir(parents=True, exist_ok=True)
        if finished:
            with open(trial_dir / EPISODES_FILE, "a") as log:
                for i, record in enumerate(finished):
                    layers = record["strategy"]["layers"]
                    log.write(json.dumps({
                        "episode": first + i, "iteration": self.training_iteration + 1,
                        "accuracy": record["accuracy"], "macs_ratio": record["macs_ratio"],
                        "keep": [layer["keep"] for layer in layers.values()],
                        "coef": [layer["coef"] for layer in layers.values()],
                        **_quantized_fields(record),
                        "timing": record.get("timing", {}), "time": time.time()}) + "\n")
        best = self.autodfp["best"]
        if best is not None:
            atomic_write_text(trial_dir / BEST_FILE, json.dumps(best, indent=2) + "\n")

    def _best_on_disk(self) -> dict | None:
        trial_dir = self._trial_dir()
        path = trial_dir / BEST_FILE if trial_dir else None
        try:
            return json.loads(path.read_text()) if path and path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    def _count_logged_episodes(self) -> int:
        trial_dir = self._trial_dir()
        log = trial_dir / EPISODES_FILE if trial_dir else None
        if log is None or not log.is_file():
            return 0
        lines = log.read_text().splitlines()
        complete = [line for line in lines if _is_record(line)]
        if len(complete) != len(lines):  # a torn last line from a killed driver
            atomic_write_text(log, "".join(line + "\n" for line in complete))
        return len(complete)


def _better(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return b if b["accuracy"] > a["accuracy"] else a


def _plain(value):
    """Episode infos come back with numpy scalars inside; JSON wants Python numbers."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _is_record(line: str) -> bool:
    try:
        return "episode" in json.loads(line)
    except (ValueError, TypeError):
        return False
