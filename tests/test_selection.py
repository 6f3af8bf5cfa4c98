import pytest
import torch

from autodfp.errors import AutoDFPError
from autodfp.compress.selection import get_criterion
from autodfp.compress.similarity import similarity_stats


def distinct_filters(n, fan_in=27, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, fan_in, generator=g)


def test_norm_criteria_keep_the_largest_filters():
    w = distinct_filters(6).reshape(6, 3, 3, 3)
    scale = torch.tensor([1.0, 5.0, 0.1, 3.0, 0.2, 4.0]).view(6, 1, 1, 1)
    w = w / w.flatten(1).norm(dim=1).view(6, 1, 1, 1) * scale
    assert get_criterion("l2").select(w, 3).tolist() == [1, 3, 5]
    l1 = w.flatten(1).abs().sum(1)
    assert get_criterion("l1").select(w, 2).tolist() == sorted(l1.argsort()[-2:].tolist())


def test_similarity_criterion_prunes_near_duplicates_first():
    base = distinct_filters(8)
    dupes = torch.stack([base[2] * 0.9 + 0.01 * base[5], base[6] * 1.1])  # channels 8, 9
    w = torch.cat([base, dupes])
    keep = get_criterion("similarity").select(w, 8).tolist()
    # Each duplicate pair loses its member with the smaller L1 norm, however large it is.
    assert set(range(10)) - set(keep) == {8, 6}
    l1_keep = get_criterion("l1").select(w, 8).tolist()
    assert l1_keep != keep


def test_similarity_stats_see_redundancy():
    distinct = similarity_stats(distinct_filters(16))
    base = distinct_filters(8)
    redundant = similarity_stats(torch.cat([base, base * 1.01 + 1e-3]))
    assert redundant.redundant_share == 0.5          # every duplicate pair is found
    assert distinct.redundant_share < 0.5
    assert redundant.mean_intra_similarity > 0.99 > distinct.mean_intra_similarity
    assert redundant.mean_nearest_similarity > 0.99 > distinct.mean_nearest_similarity
    assert all(0.0 <= v <= 1.0 for v in redundant.as_list() + distinct.as_list())


def test_unknown_criterion():
    with pytest.raises(AutoDFPError, match="unknown selection criterion"):
        get_criterion("taylor")


def test_reprune_keeps_diverse_filters_where_l1_keeps_near_duplicates():
    """A real layer (ResNet-56 layer2.0.conv1) with its largest filter copied four times, each
    copy a little larger and slightly perturbed: L1 keeps all five copies among its top 16;
    REPrune's kernel-cluster coverage keeps one or two of them, and covers more clusters."""
    from autodfp.models import build_model

    model, _ = build_model("resnet56")
    weight = model.layer2[0].conv1.weight.detach().clone()
    top = int(weight.flatten(1).abs().sum(1).argmax())
    g = torch.Generator().manual_seed(0)
    copies = [top]
    for i, target in enumerate((1, 4, 6, 7)):
        weight[target] = weight[top] * (1.01 + 0.01 * i) + 1e-3 * torch.randn(
            weight[top].shape, generator=g)
        copies.append(target)
    l1_keep = set(get_criterion("l1").select(weight, 16).tolist())
    reprune_keep = set(get_criterion("reprune").select(weight, 16).tolist())
    assert set(copies) <= l1_keep
    assert len(set(copies) & reprune_keep) <= 2
    assert len(reprune_keep) == 16


def test_reprune_selection_runs_in_prune_and_in_the_search_env():
    import numpy as np

    from autodfp.pipeline import apply_strategy, uniform_strategy
    from envs.autodfp_env import AutoDFPEnv

    pruned = apply_strategy(uniform_strategy("resnet20", 0.5, select="reprune"))
    assert all(c == 8 for n, c in pruned.channels.items() if n.startswith("layer1"))
    env = AutoDFPEnv({"model": "resnet20", "select": "reprune", "reward_size": 40,
                      "calibration": None})
    env.reset()
    for _ in env.group_names:
        _, reward, terminated, _, info = env.step(np.full(2, 0.5))
    assert terminated and info["strategy"]["select"] == "reprune" and reward > 0.1


def test_activation_moments_match_sampling():
    import numpy as np

    from autodfp.compress.reconstruction import activation_moments

    mu, sd = np.array([-1.0, 0.5, 3.0, 7.0]), np.array([1.0, 2.0, 4.0, 0.0])
    x = mu[:, None] + sd[:, None] * np.random.default_rng(0).standard_normal((4, 400_000))
    for act, f in (("none", lambda v: v), ("relu", lambda v: np.maximum(v, 0)),
                   ("relu6", lambda v: np.clip(v, 0, 6))):
        mean, var = activation_moments(mu, sd, act)
        assert np.allclose(mean, f(x).mean(1), atol=0.02), act
        assert np.allclose(var, f(x).var(1), rtol=0.03, atol=0.02), act
    assert activation_moments(mu, sd, "relu6")[1][3] == 0.0  # constant 6: nothing to lose


def test_contribution_prunes_a_silent_channel_that_l1_keeps():
    """ResNet-20 layer1.0.conv1 (real weights): the channel with the largest filter, made silent
    by its BN (gamma 0, so the activation is the constant relu(beta)), is the first to go by
    the BN-statistics contribution while L1 keeps it; a channel the consumer never reads goes
    too."""
    from autodfp.compress.graph import ChannelGraph
    from autodfp.models import build_model

    model, spec = build_model("resnet20")
    group = ChannelGraph(model, spec.example_input()).groups["layer1.0.conv1"]
    largest = int(group.producer.weight.flatten(1).abs().sum(1).argmax())
    unread = (largest + 1) % group.channels
    with torch.no_grad():
        group.bn.weight[largest] = 0.0
        next(iter(group.consumers.values())).weight[:, unread] = 0.0
    n_keep = group.channels - 2
    l1_keep = get_criterion("l1").select_group(group, n_keep).tolist()
    keep = get_criterion("contribution").select_group(group, n_keep).tolist()
    assert largest in l1_keep
    assert set(range(group.channels)) - set(keep) == {largest, unread}


def test_contribution_beats_l1_without_calibration_on_real_weights():
    """Closed form only (no calibration), ResNet-56 at uniform keep 0.5, the lossless test
    images (measured 51.4 % against 63.0 %; on ResNet-20 the two are level)."""
    from autodfp.data import load_split
    from autodfp.measure.metrics import accuracy
    from autodfp.pipeline import apply_strategy, uniform_strategy

    images = load_split("test-lossless")
    top1 = {}
    for select in ("l1", "contribution"):
        pruned = apply_strategy(uniform_strategy("resnet56", 0.5, select=select,
                                                 reconstruct="autodfp"))
        top1[select] = accuracy(pruned.model, images, pruned.spec)
    assert top1["contribution"] > top1["l1"] + 2.0, top1
