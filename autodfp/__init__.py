"""AutoDFP: data-free pruning and reconstruction of pretrained CNNs.

The library (this package) needs PyTorch, Torch-Pruning, scikit-learn, SciPy and numpy, and
imports no Ray: the search service lives in ``launch`` (extra ``autodfp[search]``). Its
folders follow the pipeline: ``compress`` (which channels go, how the rest compensate),
``calibrate`` (synthetic images, refit), ``quantize``, ``recover`` (optional training) and
``measure`` (every cost and score); ``pipeline`` applies a strategy in those steps.

The API on your own model::

    pruned = autodfp.prune(model, torch.randn(1, 3, 32, 32), macs=0.5, calibration="refit")

See :mod:`autodfp.api`.
"""

from autodfp.errors import AutoDFPError

__all__ = ["AutoDFPError", "Groups", "Pruned", "Strategy", "apply", "cost", "groups", "load",
           "prune", "save", "search"]
__version__ = "0.1.0"

_API = {"Groups", "apply", "cost", "groups", "load", "prune", "save"}


def __getattr__(name: str):
    # imported on first use: `import autodfp` stays cheap and the CLI loads only what it runs
    if name in _API:
        from autodfp import api

        return getattr(api, name)
    if name == "Pruned":
        from autodfp.pipeline import PrunedModel

        return PrunedModel
    if name == "Strategy":
        from autodfp.strategy import Strategy

        return Strategy
    if name == "search":  # the one name that reaches up to the service layer, on use only
        try:
            from launch.api import search
        except ImportError as exc:
            raise AutoDFPError(f"autodfp.search needs the search extra (Ray RLlib and Tune): "
                               f"pip install 'autodfp[search]' ({exc})") from None
        return search
    raise AttributeError(f"module 'autodfp' has no attribute {name!r}")
