"""``autodfp.search``: the SAC search service on a model given by object or factory.

Env runners are separate Ray processes that rebuild the model themselves, so the model must be
importable: a ``pkg.module:factory`` string, a factory function or class defined in a module
(not in ``__main__``), or an instance of such a class that its class builds without arguments
(its weights are written next to the run folder and loaded, ``weights_only``, by each runner).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from autodfp.errors import AutoDFPError
from autodfp.pipeline import PrunedModel

MAIN_MODULES = ("__main__", "__mp_main__")


@dataclass
class SearchResult:
    run_dir: str
    """The run folder, a path or a storage URI (``autodfp resume``/``export``/``report`` take it)."""
    best: dict
    """The best episode: ``accuracy`` (reward set, percent), ``macs_ratio``, ``episode``,
    ``strategy``."""
    pruned: PrunedModel
    """The best strategy applied to the model (exported to ``out`` when given)."""


def search(model, example_inputs: torch.Tensor, *, macs: float = 0.5, episodes: int = 100,
           name: str = "autodfp", storage: str | Path = "runs", data: str | Path | None = None,
           class_index: str | Path | None = None, mean=None, std=None,
           out: str | Path | None = None, env: dict | None = None,
           **settings) -> SearchResult:
    """Run a SAC search (embedded local Ray, or the cluster ``RAY_ADDRESS`` names) for the best
    per-layer strategy of ``model`` at ``macs`` x its MACs, then apply the best one (written
    to ``out`` when given). ``data``: labelled images the reward and test sets are drawn from
    (default: CIFAR-10's, for a 32x32 10-class model). ``env``: more
    :class:`envs.autodfp_env.EnvConfig` fields; ``settings``: more
    :class:`launch.config.SearchConfig` fields (``warmup_episodes``, ``num_env_runners``...)."""
    from autodfp.api import model_spec, save
    from autodfp.pipeline import apply_strategy
    from autodfp.strategy import Strategy
    from launch.config import SearchConfig
    from launch.search import load_best, run_search
    from launch.storage import Location

    if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim != 4:
        raise AutoDFPError("example_inputs must be a (batch, C, H, W) tensor")
    remote = "://" in str(storage)
    storage = str(storage) if remote else str(Path(storage).resolve())
    if remote and isinstance(model, nn.Module):
        raise AutoDFPError("with a storage URI, pass the model as a factory (its runners may "
                           "not share this machine's disk for its weights)")
    run = Location.of(storage).child(name)
    if run.is_dir() and not run.is_empty():  # before its base weights are written beside it
        raise AutoDFPError(f"run folder {run} exists; resume it (autodfp resume) or give "
                           "another name")
    target, checkpoint = _importable_model(model, Path(storage) / f"{name}.base-weights.pt")
    env_config = {"model": target, "checkpoint": checkpoint, "macs_budget": macs,
                  "input_size": list(example_inputs.shape[1:]),
                  **({"mean": list(mean)} if mean is not None else {}),
                  **({"std": list(std)} if std is not None else {}),
                  **({"data": str(Path(data).resolve())} if data is not None else {}),
                  **({"class_index": str(Path(class_index).resolve())}
                     if class_index is not None else {}),
                  **(env or {})}
    config = SearchConfig.from_dict({"name": name, "storage": storage, "episodes": episodes,
                                     "env": env_config, **settings})
    built = _check_builds(config)
    model_spec(built, example_inputs)  # runs on the inputs, returns logits
    run = run_search(config)
    best = load_best(run)
    pruned = apply_strategy(Strategy.from_dict(best["strategy"]))
    if out is not None:
        save(pruned, out)
    return SearchResult(str(run), best, pruned)


def _importable_model(model, weights_path: Path) -> tuple[str, str | None]:
    """The env's ``model`` (``pkg.module:factory``) and ``checkpoint`` for ``model``."""
    if isinstance(model, str):
        return model, None
    if isinstance(model, nn.Module):
        cls = type(model)
        _check_importable(cls)
        try:
            cls()
        except Exception as exc:  # noqa: BLE001 - any constructor failure means the same
            raise AutoDFPError(f"{cls.__qualname__}() needs arguments ({type(exc).__name__}); "
                               "env runners rebuild the model: pass a factory that takes none "
                               "(a function returning the model, or pkg.module:factory)") \
                from None
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        from autodfp.io import atomic_writer

        with atomic_writer(weights_path, "wb") as handle:
            torch.save(model.state_dict(), handle)
        return f"{cls.__module__}:{cls.__qualname__}", str(weights_path)
    if callable(model):
        _check_importable(model)
        return f"{model.__module__}:{model.__qualname__}", None
    raise AutoDFPError(f"model must be an nn.Module, a factory or 'pkg.module:factory', got "
                       f"{type(model).__name__}")


def _check_importable(obj) -> None:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if module is None or module in MAIN_MODULES or "<locals>" in qualname \
            or inspect.getmodule(obj) is None:
        raise AutoDFPError(f"{qualname or obj!r} is defined in {module or 'no module'}: Ray env "
                           "runners import the model, so define it in a module of its own "
                           "and pass it (or 'pkg.module:factory')")


def _check_builds(config) -> nn.Module:
    """What every env runner will build, built here first: one clear error, not a dead trial."""
    from autodfp.models import build_model

    env = config.env_config()
    return build_model(env.model, env.checkpoint, input_spec=env.input_spec())[0]
