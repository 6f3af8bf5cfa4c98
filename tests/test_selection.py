import pytest
import torch

from autodfp.errors import AutoDFPError
from autodfp.selection import get_criterion
from autodfp.similarity import similarity_stats


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
