"""Data-free reconstruction: fold what pruned channels carried into the consumers' input weights.

Every method here produces a :class:`Compensation` for one group and a list of kept channels:

- ``merge[p, j]``: how much of pruned channel ``p`` is re-expressed through kept channel
  ``keep[j]``. Folding adds ``merge[p, j] * V[:, p]`` to the consumer's input weights
  ``V[:, keep[j]]``, i.e. the consumer now reads ``h_p ~ sum_j merge[p, j] * h_keep[j]``.
- ``shift[p]``: a constant part of ``h_p``; folded as a constant input, into the consumer's bias
  or, for a bias-free conv followed by BN, into that BN's ``running_mean``. (Exact for interior
  pixels; at zero-padded borders a 3x3 consumer sees fewer taps.)

No image is used: only the producer's weights and the statistics its BatchNorm stored during
training. The derivations are in ``docs/reconstruction.md``.

Methods (:data:`METHODS`):

``none``
    prune only.
``neuron-merging``
    Kim et al. (NeurIPS 2020), a line-for-line port of ``create_scaling_mat_conv_thres_bn`` of
    the official code (friendshipkim/neuron-merging): for each pruned channel, the kept channel
    minimising ``lam * cosine distance + (1 - lam) * normalised BN bias distance`` (lam 0.85), if
    its cosine similarity is at least ``threshold`` (0.1), with the official scale
    ``s * (gamma_k / gamma_p) * (sigma_p / sigma_k)``, ``s = |w_p| / |w_k|`` and, as in the
    official code, ``sigma = running_var`` (``nm_sigma="std"`` uses sqrt(var + eps)).
``udfc``
    UDFC-style (Bai et al. 2023) closed-form linear-combination compensation under the BN
    Gaussian model, with a constant term: least squares over the ``partners`` most correlated
    kept channels; see ``docs/reconstruction.md`` for the derivation and departures.
``autodfp``
    a per-layer blend steered by the reconstruction coefficient ``coef`` in [0, 1]:
    ``(1 - coef) * neuron-merging + coef * udfc`` (both ``merge`` and ``shift``). 0 is Neuron
    Merging, 1 is full ``udfc``. The best blend depends on how much of the layer is cut
    (uniformly on ResNet-56: keep 0.4 -> 0, keep 0.5 -> 0.25, keep 0.6 -> 0.5), so the search
    chooses it per layer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.special import ndtr

from autodfp.errors import AutoDFPError
from autodfp.compress.graph import ChannelGroup
from autodfp.compress.similarity import cosine_similarity_matrix, filter_matrix

METHODS = ("none", "neuron-merging", "udfc", "autodfp")


@dataclass(frozen=True)
class ReconstructionOptions:
    """Knobs of the reconstruction methods; defaults are the ones measured best or official."""

    nm_lambda: float = 0.85
    """Neuron Merging: weight of cosine distance against BN bias distance."""
    nm_threshold: float = 0.1
    """Neuron Merging: minimum cosine similarity for a merge."""
    nm_sigma: str = "std"
    """Neuron Merging: ``std`` = sqrt(var + eps) (default: 64.6% vs 61.5% on ResNet-56 at keep
    0.5) or ``var``, sigma = running_var as in the official code."""
    udfc_partners: int = 0
    """UDFC: kept channels per pruned channel, most correlated first; 0 = all kept channels."""
    udfc_ridge: float = 1e-3
    """UDFC: ridge on the normal equations, relative to the mean partner variance."""
    depthwise_mean: bool = True
    """Groups with a depthwise conv before their consumers: fold each cut channel's mean (after
    the depthwise conv's BN and activation) into the consumers; False: nothing folded."""
    coupled_mean: bool = False
    """Residual-coupled groups: fold each cut channel's mean (the sum of its producers' BN
    shifts) into the consumers. Off by default: on EfficientNet-Lite1 it measured no better
    (57.23 % against 58.04 % without at 0.9 of the MACs, 491 Imagenette images)."""

    def __post_init__(self):
        if self.nm_sigma not in ("var", "std"):
            raise AutoDFPError(f"nm_sigma must be 'var' or 'std', got {self.nm_sigma!r}")


@dataclass
class Compensation:
    merge: np.ndarray
    """(channels, kept) weights re-expressing each pruned channel through the kept ones."""
    shift: np.ndarray
    """(channels,) constant part of each pruned channel's activation."""


@dataclass(frozen=True)
class BNStats:
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> "BNStats":
        def arr(t):
            return t.detach().double().cpu().numpy()
        return cls(arr(bn.weight), arr(bn.bias), arr(bn.running_mean), arr(bn.running_var),
                   float(bn.eps))

    def activation_gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the BN output under the training statistics."""
        return self.beta, np.abs(self.gamma) * np.sqrt(self.var / (self.var + self.eps))


def reconstruct(method: str, group: ChannelGroup, keep: torch.Tensor, coef: float = 1.0,
                options: ReconstructionOptions = ReconstructionOptions()) -> bool:
    """Compensate the channels of ``group`` not in ``keep``, in place, before they are cut.

    Returns whether a compensation was applied (``False`` for ``none`` and for groups where
    it cannot fold: no BN, or a depthwise conv between producer and consumers).
    """
    if method not in METHODS:
        raise AutoDFPError(f"unknown reconstruction {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none" or len(keep) == group.channels:
        return False
    if group.coupled:
        return options.coupled_mean and _compensate_coupled_means(group, keep.numpy())
    if group.depthwise:
        return options.depthwise_mean and _compensate_depthwise_means(group, keep.numpy())
    if not group.reconstructable:
        return False
    filters = filter_matrix(group.producer.weight)
    bn = BNStats.of(group.bn)
    keep_np = keep.numpy()
    if method == "neuron-merging":
        compensation = neuron_merging(filters, keep_np, bn, options)
    elif method == "udfc":
        compensation = udfc(filters, keep_np, bn, options)
    else:
        merged = neuron_merging(filters, keep_np, bn, options)
        fitted = udfc(filters, keep_np, bn, options)
        compensation = Compensation((1 - coef) * merged.merge + coef * fitted.merge,
                                    (1 - coef) * merged.shift + coef * fitted.shift)
    fold_into_consumers(group, keep_np, compensation)
    return True


def neuron_merging(filters: np.ndarray, keep: np.ndarray, bn: BNStats,
                   options: ReconstructionOptions) -> Compensation:
    """Port of the official ``create_scaling_mat_conv_thres_bn`` (vectorised over candidates)."""
    n = len(filters)
    merge = np.zeros((n, len(keep)))
    cos_dist = 1.0 - cosine_similarity_matrix(filters)
    norms = np.linalg.norm(filters, axis=1)
    sigma = bn.var if options.nm_sigma == "var" else np.sqrt(bn.var + bn.eps)
    g, b, mu = bn.gamma, bn.beta, bn.mean
    with np.errstate(divide="ignore", invalid="ignore"):
        for p in np.setdiff1d(np.arange(n), keep):
            s = norms[p] / norms[keep]
            scale = s * (g[keep] / g[p]) * (sigma[p] / sigma[keep])
            bias = np.abs((g[keep] / sigma[keep]) * (s * (-(sigma[p] * b[p] / g[p]) + mu[p])
                                                     - mu[keep]) + b[keep]) / scale
            spread = np.max(bias) - np.min(bias)
            bias = (bias - np.min(bias)) / spread if spread > 0 else np.zeros_like(bias)
            score = options.nm_lambda * cos_dist[p, keep] + (1 - options.nm_lambda) * bias
            score = np.where(np.isfinite(score), score, np.inf)
            best = int(np.argmin(score))
            if 1.0 - cos_dist[p, keep[best]] < options.nm_threshold or not np.isfinite(scale[best]):
                continue
            merge[p, best] = scale[best]
    return Compensation(merge, np.zeros(n))


# Probabilists' Gauss-Hermite nodes for E over a standard normal; 64 nodes keep the kink of
# the ReLU inside the integrand below 1e-3 relative error for the moments used here.
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(64)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def relu_mean(mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """E[relu(X)] for X ~ N(mu, sd^2), sd may be 0."""
    sd_safe = np.maximum(sd, 1e-12)
    z = mu / sd_safe
    return np.where(sd > 1e-12, mu * ndtr(z) + sd_safe * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi),
                    np.maximum(mu, 0.0))


def activation_moments(mu: np.ndarray, sd: np.ndarray, act: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of act(X), X ~ N(mu, sd^2), for act in none / relu / relu6, by
    Gauss-Hermite quadrature (the kinks cost a little accuracy, enough to rank channels)."""
    x = mu[:, None] + sd[:, None] * _NODES[None, :]
    if act == "relu":
        x = np.maximum(x, 0.0)
    elif act == "relu6":
        x = np.clip(x, 0.0, 6.0)
    mean = x @ _WEIGHTS
    return mean, np.maximum((x * x) @ _WEIGHTS - mean * mean, 0.0)


def relu_cross_moments(mean: np.ndarray, sd: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """E[relu(a_i) relu(a_j)] for jointly Gaussian a with the given means, stds, correlations.

    Conditioning a_i on a_j leaves a 1-D integral over a_j, done by Gauss-Hermite quadrature;
    the inner E[relu(a_i) | a_j] is closed-form. Entry (i, j) integrates over a_j, so a
    constant channel j (sd 0) gives exactly E[relu(a_i)] * relu(mean_j): not symmetrised.
    """
    aj = mean[None, :, None] + sd[None, :, None] * _NODES[None, None, :]      # (1, n, Q)
    cond_mean = mean[:, None, None] + (sd[:, None] * rho)[..., None] * _NODES  # (n, n, Q)
    cond_sd = (sd[:, None] * np.sqrt(np.clip(1 - rho * rho, 0, 1)))[..., None]
    inner = relu_mean(cond_mean, np.broadcast_to(cond_sd, cond_mean.shape))
    return (np.maximum(aj, 0.0) * inner) @ _WEIGHTS


def relu_covariance(filters: np.ndarray, bn: BNStats
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Covariance and mean of the producer's ReLU activations under UDFC's Gaussian model (see
    :func:`udfc`), and the correlations ``rho`` of the BN outputs they come from."""
    mean, sd = bn.activation_gaussian()
    rho = cosine_similarity_matrix(filters) * np.sign(bn.gamma)[:, None] * np.sign(bn.gamma)[None]
    first = relu_mean(mean, sd)
    return relu_cross_moments(mean, sd, rho) - np.outer(first, first), first, rho


class ContentMemo:
    """Results of a pure function of arrays, keyed by the arrays' bytes (a BLAKE2 digest), the
    least recently used dropped beyond ``max_bytes`` of results. A search prunes the same
    unpruned producers every episode; their ReLU moments (an n x n x 64-node quadrature per
    group: 0.36 -> 0.18 s of surgery per ResNet-56 episode on one thread; 14 -> 5 s on
    EfficientNet-Lite1) are then computed once, and a changed array (a
    producer an earlier compensation rewrote) is a new key, never a stale hit."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._results: OrderedDict[bytes, tuple[np.ndarray, ...]] = OrderedDict()
        self._bytes = 0

    def get(self, arrays: tuple[np.ndarray, ...], compute) -> tuple[np.ndarray, ...]:
        digest = hashlib.blake2b(digest_size=20)
        for array in arrays:
            digest.update(repr((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        key = digest.digest()
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        result = compute()
        for array in result:
            array.flags.writeable = False  # shared by every later hit
        size = sum(a.nbytes for a in result)
        if size <= self.max_bytes:
            self._results[key] = result
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._bytes -= sum(a.nbytes for a in self._results.popitem(last=False)[1])
        return result


_RELU_MOMENTS = ContentMemo(max_bytes=256 << 20)


def udfc(filters: np.ndarray, keep: np.ndarray, bn: BNStats,
         options: ReconstructionOptions) -> Compensation:
    """Least-squares re-expression of each pruned activation through kept activations.

    Model (no data): BN output ``a_i ~ N(beta_i, (gamma_i)^2)``, correlations
    ``rho_ij = sign(gamma_i gamma_j) cos(w_i, w_j)`` (isotropic input), ``h = relu(a)``.
    For pruned ``p`` and partners ``K``: ``c = (Cov_KK + r I)^-1 Cov_Kp`` and
    ``c0 = E h_p - c . E h_K`` minimise ``E (h_p - c0 - c . h_K)^2``.
    """
    n = len(filters)
    cov, first, rho = _RELU_MOMENTS.get((filters, bn.gamma, bn.beta, bn.var, np.array(bn.eps)),
                                        lambda: relu_covariance(filters, bn))
    merge = np.zeros((n, len(keep)))
    shift = np.zeros(n)
    partners = options.udfc_partners or len(keep)
    pruned = np.setdiff1d(np.arange(n), keep)
    if partners >= len(keep):  # every pruned channel has the same partners: one solve
        cov_kk = cov[np.ix_(keep, keep)]
        cov_kk = 0.5 * (cov_kk + cov_kk.T)
        ridge = options.udfc_ridge * max(np.trace(cov_kk) / len(keep), 1e-12)
        coeffs = np.linalg.solve(cov_kk + ridge * np.eye(len(keep)), cov[np.ix_(keep, pruned)])
        merge[pruned] = coeffs.T
        shift[pruned] = first[pruned] - coeffs.T @ first[keep]
        return Compensation(merge, shift)
    for p in pruned:
        order = np.argsort(-np.abs(rho[p, keep]), kind="stable")[:partners]
        k = keep[order]
        cov_kk = cov[np.ix_(k, k)]
        cov_kk = 0.5 * (cov_kk + cov_kk.T)
        ridge = options.udfc_ridge * max(np.trace(cov_kk) / len(k), 1e-12)
        coeffs = np.linalg.solve(cov_kk + ridge * np.eye(len(k)), cov[k, p])
        merge[p, order] = coeffs
        shift[p] = first[p] - coeffs @ first[k]
    return Compensation(merge, shift)


@torch.no_grad()
def _compensate_depthwise_means(group: ChannelGroup, keep: np.ndarray) -> bool:
    """Producer -> BN -> act -> depthwise -> BN -> act -> consumers: a cut channel's filters
    cannot be merged across the depthwise conv, but its mean at the consumers can be kept: the
    depthwise BN's output is N(beta, gamma^2) under the training statistics, and the consumers
    read the activation of it (ReLU or ReLU6). Returns False without that BN."""
    if group.depthwise_bn is None:
        return False
    mu, sd = BNStats.of(group.depthwise_bn).activation_gaussian()
    if group.depthwise_act == "none":
        mean = mu
    else:
        mean = relu_mean(mu, sd)
        if group.depthwise_act == "relu6":  # min(relu(x), 6) = relu(x) - relu(x - 6)
            mean = mean - relu_mean(mu - 6.0, sd)
    fold_into_consumers(group, keep, Compensation(np.zeros((group.channels, len(keep))), mean))
    return True


@torch.no_grad()
def _compensate_coupled_means(group: ChannelGroup, keep: np.ndarray) -> bool:
    """A residual-coupled channel, where a consumer reads it, is the sum of the BN outputs of the
    producers added so far (``group.consumer_sources()``), with no activation after the BNs: its
    mean under the training statistics is the sum of their shifts. Each consumer takes that
    mean as a constant input; no kept channel stands in for a cut one (the producers' filters
    need not agree on a partner). Returns False when a producer has no BN."""
    if any(bn is None for bn in group.coupled_bn.values()):
        return False
    shift = {name: BNStats.of(bn).beta for name, bn in group.coupled_bn.items()}
    pruned = torch.from_numpy(np.setdiff1d(np.arange(group.channels), keep))
    reach = group.consumer_sources()
    for name, consumer in group.consumers.items():
        sources = reach.get(name, [])
        if not sources:
            continue
        mean = torch.from_numpy(sum(shift[s] for s in sources))[pruned]
        constant = torch.einsum("op...,p->o", consumer.weight[:, pruned].double(), mean)
        _add_constant_output(consumer, group.consumer_bn.get(name), constant)
    return True


@torch.no_grad()
def fold_into_consumers(group: ChannelGroup, keep: np.ndarray, comp: Compensation) -> None:
    pruned = np.setdiff1d(np.arange(group.channels), keep)
    merge = torch.from_numpy(comp.merge[pruned])              # (P, K)
    shift = torch.from_numpy(comp.shift[pruned])              # (P,)
    keep_t, pruned_t = torch.from_numpy(keep), torch.from_numpy(pruned)
    for name, consumer in group.consumers.items():
        weight = consumer.weight
        w_pruned = weight[:, pruned_t].double()              # (O, P, ...)
        delta = torch.einsum("op...,pk->ok...", w_pruned, merge)
        weight[:, keep_t] += delta.to(weight.dtype)
        constant = torch.einsum("op...,p->o", w_pruned, shift)  # sums over kernel taps too
        _add_constant_output(consumer, group.consumer_bn.get(name), constant)


def _add_constant_output(consumer: nn.Module, bn: nn.Module | None,
                         constant: torch.Tensor) -> None:
    if not torch.any(constant != 0):
        return
    if consumer.bias is not None:
        consumer.bias += constant.to(consumer.bias.dtype)
    elif bn is not None and bn.running_mean is not None:
        bn.running_mean -= constant.to(bn.running_mean.dtype)
