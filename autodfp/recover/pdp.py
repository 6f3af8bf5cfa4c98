"""PDP (Cho et al., NeurIPS 2023): parameter-free differentiable soft masks, trained toward a
target, then made hard.

For a score ``s`` (a weight's square, or a channel's mean squared filter weight) and the
threshold ``t`` that splits the scores at the target, the mask is the first component of
``softmax([s, t] / tau)`` = ``sigmoid((s - t) / tau)``: no trainable parameter, and the weights
themselves move across the threshold through the mask's gradient. ``t`` is the midpoint between
the largest score to prune and the smallest to keep, recomputed from the current weights at
every forward pass (without a gradient, as in the paper).

Three patterns (:class:`SparsityTarget`):

- **unstructured** (``--sparsity 0.8``): per conv/linear weight tensor, that share of weights;
- **N:M** (``--sparsity 2:4``): in every group of M consecutive input weights (along the input
  channels, at each kernel position, as sparse tensor cores read them) N are kept; a layer whose
  input count is not a multiple of M stays dense and is listed;
- **channel** (``--keep K``): per prunable group, the share K of channels; the mask multiplies
  the BN after the producer (a mask on the conv's filters would be normalised away by the BN).
  :meth:`PDPMasks.finish` folds the final masks into the BN and physically removes the rest.

Departures from the paper, all because a recovery is 1-5 epochs, not 100: the target is reached
by a linear ramp over the first ``ramp`` share of the steps (the paper: warm-up epochs, then a
fixed share per epoch), after which the temperature is annealed 100-fold, reached at 90 % of the
steps, so that the masks are nearly 0 or 1 when they are made hard (with a fixed temperature,
one epoch left ResNet-20's channel masks spread over (0, 1) and the hard cut fell from 88 % to
30 %); scores are divided by their layer's mean so one ``tau`` fits every
layer (the paper uses raw ``w^2`` and a fixed ``tau``); every layer gets the same target (the
paper derives per-layer targets from one global sort of magnitudes, which on short runs can
empty a small layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from autodfp.errors import AutoDFPError
from autodfp.recover.method import TrainingMethod
from autodfp.compress.graph import ChannelGraph, is_depthwise
from autodfp.strategy import kept_channels

DEFAULT_TAU = 0.05
"""Temperature on mean-normalised scores (a mask goes 0.12 -> 0.88 across 0.2 of the mean)."""
FINAL_TAU_SHARE = 0.01
"""After the ramp the temperature falls geometrically to this share of itself, reached at
``HARD_FROM`` of the steps: the masks end near 0 or 1, so making them hard changes little."""
HARD_FROM = 0.9


@dataclass(frozen=True)
class SparsityTarget:
    """What PDP trains toward: ``kind`` is ``unstructured``, ``nm`` or ``channel``."""

    kind: str
    share: float = 0.0
    """unstructured: share of zero weights; channel: share of channels kept."""
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, sparsity: str | None, keep: float | None) -> "SparsityTarget":
        if (sparsity is None) == (keep is None):
            raise AutoDFPError("PDP needs one target: keep K (channels) or sparsity S "
                               "(0 < S < 1 unstructured, or N:M)")
        if keep is not None:
            if not 0.0 < keep < 1.0:
                raise AutoDFPError(f"keep must be in (0, 1) for PDP, got {keep}")
            return cls("channel", share=keep)
        if ":" in sparsity:
            try:
                n, m = (int(part) for part in sparsity.split(":"))
            except ValueError:
                raise AutoDFPError(f"sparsity N:M needs two whole numbers, got {sparsity!r}") \
                    from None
            if not 0 < n < m:
                raise AutoDFPError(f"sparsity N:M needs 0 < N < M, got {sparsity!r}")
            return cls("nm", n=n, m=m)
        try:
            share = float(sparsity)
        except ValueError:
            raise AutoDFPError(f"sparsity must be a share like 0.8 or a pattern like 2:4, "
                               f"got {sparsity!r}") from None
        if not 0.0 < share < 1.0:
            raise AutoDFPError(f"sparsity must be in (0, 1), got {share}")
        return cls("unstructured", share=share)

    def describe(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "channel":
            return f"channels keep {self.share:g}"
        return f"unstructured {self.share:g}"


def soft_mask(scores: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax([s, t] / tau)[0]``, written as the sigmoid it equals."""
    return torch.sigmoid((scores - threshold) / tau)


def split_threshold(scores: torch.Tensor, n_prune: torch.Tensor | int) -> torch.Tensor:
    """Per row, the midpoint between the ``n_prune``-th and the next smallest score (no grad)."""
    ordered = scores.detach().sort(dim=-1).values
    k = torch.as_tensor(n_prune).clamp(1, scores.shape[-1] - 1)
    low = ordered.gather(-1, (k - 1).expand(*ordered.shape[:-1], 1))
    high = ordered.gather(-1, k.expand(*ordered.shape[:-1], 1))
    return (low + high) / 2


def nm_rows(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View a conv/linear weight as rows of ``m`` consecutive input weights."""
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1)  # out, kh, kw, in: groups run along inputs
    return weight.reshape(-1, m)


def from_nm_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        out, cin, kh, kw = like.shape
        return rows.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    return rows.reshape(like.shape)


class _WeightMask(nn.Module):
    """A parametrization: ``w * mask(w)`` for the unstructured and N:M patterns."""

    def __init__(self, target: SparsityTarget, tau: float):
        super().__init__()
        self.target, self.tau, self.progress = target, tau, 1.0

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        squares = weight * weight
        if self.target.kind == "nm":
            rows = nm_rows(squares, self.target.m)
            rows = rows / rows.detach().mean().clamp_min(1e-12)
            threshold = split_threshold(rows, self.target.m - self.target.n)
            return from_nm_rows(soft_mask(rows, threshold, self.tau), weight)
        flat = squares.reshape(1, -1)
        flat = flat / flat.detach().mean().clamp_min(1e-12)
        n_prune = int(self.target.share * self.progress * flat.shape[1])
        if n_prune == 0:
            return torch.ones_like(weight)
        return soft_mask(flat, split_threshold(flat, n_prune), self.tau).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask(weight)


class PDPMasks(TrainingMethod):
    """PDP soft masks on a model during training; :meth:`finish` makes them hard. Nothing to
    checkpoint: the masks are functions of the weights and the step."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, target: SparsityTarget,
                 *, tau: float = DEFAULT_TAU, ramp: float = 0.5):
        self.model, self.target, self.ramp = model, target, ramp
        self.tau = self.start_tau = tau
        self.dense_layers: list[str] = []
        self._hooks, self._params = [], {}
        self._progress = 0.0 if target.kind != "nm" else 1.0
        if target.kind == "channel":
            self.graph = ChannelGraph(model, example_input)
            if not self.graph.groups:
                raise AutoDFPError("this model has no prunable channel group for PDP keep")
            for group in self.graph.groups.values():
                self._hooks.append(self._channel_site(group).register_forward_hook(
                    self._channel_hook(group)))
        else:
            for name, module in model.named_modules():
                if not isinstance(module, (nn.Conv2d, nn.Linear)) or is_depthwise(module):
                    continue
                inputs = module.weight.shape[1]
                if target.kind == "nm" and inputs % target.m:
                    self.dense_layers.append(name)
                    continue
                mask = _WeightMask(target, tau)
                parametrize.register_parametrization(module, "weight", mask)
                self._params[name] = (module, mask)
            if not self._params:
                raise AutoDFPError(f"no conv or linear layer can take the {target.describe()} "
                                   "pattern")

    @staticmethod
    def _channel_site(group) -> nn.Module:
        return group.bn if group.bn is not None else group.producer

    def _channel_scores(self, group) -> torch.Tensor:
        weight = group.producer.weight
        scores = (weight * weight).reshape(weight.shape[0], -1).mean(1)
        return scores / scores.detach().mean().clamp_min(1e-12)

    def _channel_mask(self, group, share_kept: float) -> torch.Tensor:
        scores = self._channel_scores(group)
        n_prune = group.channels - kept_channels(share_kept, group.channels)
        if n_prune <= 0:
            return torch.ones_like(scores)
        return soft_mask(scores, split_threshold(scores[None], n_prune)[0], self.tau)

    def _channel_hook(self, group):
        def hook(module, inputs, output):
            share = 1.0 - (1.0 - self.target.share) * self._progress
            return output * self._channel_mask(group, share).view(1, -1, 1, 1)
        return hook

    def before_step(self, step: int, total: int) -> None:
        """Move the target along its ramp (full at ``ramp`` of the ``total`` steps), then
        anneal the temperature."""
        ramp_end = self.ramp * total
        if self.target.kind != "nm":
            self._progress = min(1.0, (step + 1) / max(1.0, ramp_end))
        anneal = min(1.0, max(0.0, (step + 1 - ramp_end) / max(1.0, HARD_FROM * total - ramp_end)))
        self.tau = self.start_tau * FINAL_TAU_SHARE ** anneal
        for _, mask in self._params.values():
            mask.progress, mask.tau = self._progress, self.tau

    @torch.no_grad()
    def finish(self) -> dict:
        """Fold the masks into the weights, zero (or remove) what the target prunes, remove the
        masks; returns a summary for the report."""
        for hook in self._hooks:
            hook.remove()
        if self.target.kind == "channel":
            return self._finish_channels()
        zeros = total = 0
        for name, (module, mask) in self._params.items():
            weight = module.parametrizations.weight.original
            soft = mask.mask(weight)
            hard = self._hard_keep(weight)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.copy_(weight * soft * hard)
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
        return {"pattern": self.target.describe(), "layers": len(self._params),
                "dense_layers": self.dense_layers, "zero_share": zeros / max(total, 1)}

    def _hard_keep(self, weight: torch.Tensor) -> torch.Tensor:
        squares = weight * weight
        if self.target.kind == "nm":
            rows = nm_rows(squares, self.target.m)
            order = rows.argsort(dim=1, descending=True, stable=True)
            keep = torch.zeros_like(rows).scatter_(1, order[:, :self.target.n], 1.0)
            return from_nm_rows(keep, weight)
        flat = squares.reshape(-1)
        n_prune = int(self.target.share * flat.numel())
        keep = torch.ones_like(flat)
        keep[flat.argsort(stable=True)[:n_prune]] = 0.0
        return keep.reshape(weight.shape)

    def _finish_channels(self) -> dict:
        kept = {}
        for name, group in self.graph.groups.items():
            mask = self._channel_mask(group, self.target.share)
            n_keep = kept_channels(self.target.share, group.channels)
            scores = self._channel_scores(group)
            keep = scores.argsort(descending=True, stable=True)[:n_keep].sort().values
            site = self._channel_site(group)
            site.weight.mul_(mask.view(-1, *[1] * (site.weight.dim() - 1)))
            if site.bias is not None:
                site.bias.mul_(mask)
            kept[name] = keep
        for name, keep in kept.items():
            self.graph.prune(name, keep)
        return {"pattern": self.target.describe(), "groups": len(kept),
                "channels": {n: len(k) for n, k in kept.items()}}
