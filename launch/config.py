"""Search configuration: one dataclass, loaded from a YAML preset and CLI overrides.

.. code-block:: yaml

    name: resnet56-half
    episodes: 600
    env: {model: resnet56, macs_budget: 0.5, reward_size: 5000}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from autodfp.errors import AutoDFPError
from autodfp.settings import from_mapping
from envs.autodfp_env import EnvConfig

ENV_PATHS = ("checkpoint", "data", "class_index")
"""env_config fields that name files, relative to the directory the search is started from."""

PRESETS_DIR = Path(__file__).parent / "presets"


def check_budget(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise AutoDFPError(f"a MACs budget must be a number in (0, 1], got {value!r}")
    return float(value)


@dataclass
class SearchConfig:
    name: str = "autodfp"
    """Experiment name: the run folder is ``<storage>/<name>``."""
    storage: str = "runs"
    """Folder holding run folders (made absolute), or a URI Tune accepts (``s3://``,
    ``gs://``, ``file://``...; :mod:`launch.storage`)."""
    env: dict = field(default_factory=dict)
    """The environment's ``env_config`` (see :class:`envs.autodfp_env.EnvConfig`)."""
    episodes: int = 300
    """Stop after this many episodes (pruned networks evaluated, cache hits included)."""
    warmup_episodes: int = 20
    """Episodes of uniformly random actions before SAC starts learning."""
    num_env_runners: int = 0
    """Remote env runners; 0 samples inside the algorithm's own process."""
    cpus_per_env_runner: float = 1.0
    """CPUs reserved per env runner (fractional to fit many on a small machine)."""
    gpus_per_env_runner: float = 0.0
    """GPUs per env runner; the env evaluates on the GPU it is given (fractional: several
    runners share one GPU)."""
    runner_resources: dict = field(default_factory=dict)
    """Custom Ray resources each env runner needs, e.g. ``{worker: 1}`` to place runners only
    on nodes started with ``--resources '{"worker": N}'``."""
    restart_delay_s: float = 2.0
    """Wait before an env runner that died is restarted (RLlib's default waits 60 s)."""
    max_trial_failures: int = 3
    """Restarts of a trial whose algorithm process died (its node lost), each from the last
    checkpoint; the episode log and best strategy carry on."""
    sweep_budgets: list | None = None
    """MACs budgets of a sweep (``autodfp sweep``): one SAC trial each, concurrently; None:
    one trial at ``env.macs_budget``."""
    reward_to_all_steps: bool = True
    """Copy the episode's final reward onto every step (with gamma 0, as AMC does)."""
    gamma: float = 0.0
    """Discount; 0 makes each layer's decision a bandit on the shared episode reward."""
    actor_lr: float = 3e-4
    """Learning rate of the policy."""
    critic_lr: float = 3e-4
    """Learning rate of the Q networks."""
    batch_size: int = 64
    """Transitions per SGD step."""
    updates_per_episode: int = 16
    """SGD steps per sampled episode: evaluation dominates an episode's cost, so learning
    more from each one is cheap."""
    initial_alpha: float = 0.01
    """Initial SAC entropy weight; RLlib's 1.0 swamps rewards that differ by a few hundredths."""
    alpha_lr: float = 3e-3
    """Learning rate of the entropy weight: fast, so exploration narrows within a few hundred
    episodes (at 3e-4 the policy stayed near-random for 400 episodes on ResNet-56)."""
    buffer_capacity: int = 20000
    """Replay buffer capacity in steps (kept small: it is saved in checkpoints)."""
    checkpoint_every: int = 5
    """Checkpoint every this many training iterations (and at the end)."""
    sample_timeout_s: float = 600.0
    """Longest wait for an env runner's sample; above one episode's evaluation time."""
    seed: int = 0
    """Seed of the algorithm (and of the env's action sampling)."""

    def __post_init__(self):
        if self.episodes < 1:
            raise AutoDFPError(f"episodes must be at least 1, got {self.episodes}")
        if self.num_env_runners < 0 or self.gpus_per_env_runner < 0:
            raise AutoDFPError("num_env_runners and gpus_per_env_runner must be >= 0")
        if self.restart_delay_s < 0:
            raise AutoDFPError(f"restart_delay_s must be >= 0, got {self.restart_delay_s}")
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                   for k, v in self.runner_resources.items()):
            raise AutoDFPError("runner_resources must map resource names to positive amounts, "
                               f"got {self.runner_resources!r}")
        if self.sweep_budgets is not None:
            self.sweep_budgets = [check_budget(b) for b in self.sweep_budgets]
        self.env_config()  # validate early: unknown keys, bad budget

    def env_config(self) -> EnvConfig:
        return EnvConfig.from_dict(self.env)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        return from_mapping(cls, data, "search config")

    @classmethod
    def load(cls, path: str | Path) -> "SearchConfig":
        """A YAML/JSON file, or the name of a preset in ``launch/presets``."""
        import yaml

        path = Path(path)
        if not path.exists() and (PRESETS_DIR / f"{path}.yaml").exists():
            path = PRESETS_DIR / f"{path}.yaml"
        if not path.is_file():
            presets = ", ".join(p.stem for p in sorted(PRESETS_DIR.glob("*.yaml")))
            raise AutoDFPError(f"search config not found: {path} (presets: {presets})")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AutoDFPError(f"cannot read search config {path}: {first}") from None
        config = cls.from_dict(data or {})
        for key in ENV_PATHS:  # env runners may start elsewhere: pin paths to this directory
            if isinstance(config.env.get(key), str):
                config.env[key] = str(Path(config.env[key]).resolve())
        return config

    def save(self, run, name: str) -> None:
        """Write the config as ``name`` in ``run`` (a :class:`launch.storage.Location`)."""
        run.write_text(name, json.dumps(self.to_dict(), indent=2) + "\n")
