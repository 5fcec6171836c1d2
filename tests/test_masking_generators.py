"""Block-wise, multi-mask (ExtreMA) and attention-guided generators: exact ratios, per-sample and
per-step variety, disjointness, contiguity, and low-attention-first hiding."""
import pytest
import torch
import torch.nn.functional as F

from fastmask.masking import build_masker
from fastmask.masking.attention_guided import AttentionGuidedMasking
from fastmask.masking.block import BlockMasking
from fastmask.masking.multi import MultiMasking


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _check_consistent(m, L):
    """ids_keep/ids_restore/mask agree: kept ids are visible, ids_restore inverts a permutation."""
    B, K = m.ids_keep.shape
    assert m.mask.shape == (B, L) and m.ids_restore.shape == (B, L)
    assert torch.equal(m.mask.sum(1), torch.full((B,), float(L - K)))
    assert (m.mask.gather(1, m.ids_keep) == 0).all()
    shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(shuffle[:, :K], m.ids_keep)
    assert torch.equal(torch.sort(shuffle, dim=1).values, torch.arange(L).expand(B, L))


# ---------------------------------------------------------------- block
@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.4), ((14, 14), 0.75), ((7, 9), 0.5), ((4, 4), 0.6)])
def test_block_exact_count_and_consistency(grid, ratio):
    L = grid[0] * grid[1]
    m = BlockMasking(ratio, min_num_patches=min(16, L // 4))(32, grid, generator=_gen(1))
    assert m.ids_keep.shape[1] == int(L * (1 - ratio))
    _check_consistent(m, L)


def _neighbour_fraction(mask, grid):
    """Mean over hidden patches of the fraction of their 4-neighbours that are hidden too."""
    B = mask.shape[0]
    x = mask.view(B, 1, *grid)
    k = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=x.dtype).view(1, 1, 3, 3)
    n_hidden = F.conv2d(x, k, padding=1)
    n_total = F.conv2d(torch.ones_like(x), k, padding=1)
    return ((n_hidden / n_total) * x).sum() / x.sum()


def test_block_masks_are_contiguous_and_vary():
    grid = (14, 14)
    blk = BlockMasking(0.4)(64, grid, generator=_gen(2))
    rnd = build_masker("random", mask_ratio=0.4)(64, grid, generator=_gen(2))
    assert _neighbour_fraction(blk.mask, grid) > _neighbour_fraction(rnd.mask, grid) + 0.2
    assert len({tuple(r.tolist()) for r in blk.mask}) == 64           # differ per sample
    g = _gen(3)
    masker = BlockMasking(0.4)
    assert not torch.equal(masker(8, grid, generator=g).mask, masker(8, grid, generator=g).mask)  # per step
    assert torch.equal(masker(8, grid, generator=_gen(4)).mask, masker(8, grid, generator=_gen(4)).mask)


def test_block_errors():
    with pytest.raises(ValueError, match="mask_ratio"):
        BlockMasking(1.2)
    with pytest.raises(ValueError, match="2-D patch grid"):
        BlockMasking(0.4)(2, 196)
    with pytest.raises(ValueError, match="max_num_patches"):
        BlockMasking(0.4, min_num_patches=16, max_num_patches=4)


# ---------------------------------------------------------------- multi (ExtreMA)
@pytest.mark.parametrize("L,ratio,M", [(196, 0.8, 5), (196, 0.9, 8), (49, 0.75, 4), (17, 0.5, 2)])
def test_multi_disjoint_exact(L, ratio, M):
    B = 6
    m = MultiMasking(ratio, M)(B, L, generator=_gen(5))
    n = int(L * (1 - ratio))
    assert m.ids_keep.shape == (M * B, n)
    _check_consistent(m, L)
    keep = m.ids_keep.view(M, B, n)
    for b in range(B):
        ids = keep[:, b].reshape(-1)
        assert ids.unique().numel() == M * n                             # disjoint across the M masks
    visible = (1 - m.mask).view(M, B, L).sum(0)
    assert visible.max() == 1


def test_multi_varies_and_errors():
    g = _gen(6)
    masker = MultiMasking(0.8, 5)
    a, b = masker(4, 196, generator=g), masker(4, 196, generator=g)
    assert not torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.ids_keep[0], a.ids_keep[1])
    with pytest.raises(ValueError, match="disjoint masks"):
        MultiMasking(0.5, 3)(2, 196)
    assert isinstance(build_masker("multi", mask_ratio=0.9, num_masks=8), MultiMasking)


# ---------------------------------------------------------------- attention-guided
def test_attention_exact_hides_lowest_first():
    B, L, ratio = 5, 49, 0.75
    scores = torch.rand(B, L, generator=_gen(7))
    m = AttentionGuidedMasking(ratio)(B, L, scores=scores)
    K = int(L * (1 - ratio))
    _check_consistent(m, L)
    order = torch.argsort(scores, dim=1)
    hidden_expected = torch.zeros(B, L).scatter_(1, order[:, :L - K], 1.0)
    assert torch.equal(m.mask, hidden_expected)
    # every hidden score below every visible score
    hid_max = torch.where(m.mask.bool(), scores, -1.0).max(1).values
    vis_min = torch.where(m.mask.bool(), 2.0, scores).min(1).values
    assert (hid_max < vis_min).all()


def test_attention_exact_with_candidates_random_within_low_set():
    B, L = 16, 64
    scores = torch.rand(B, L, generator=_gen(8))
    masker = AttentionGuidedMasking(0.5, candidate_ratio=0.75)
    g = _gen(9)
    m1, m2 = masker(B, L, generator=g, scores=scores), masker(B, L, generator=g, scores=scores)
    assert not torch.equal(m1.mask, m2.mask)                             # differ per step
    rank = torch.argsort(torch.argsort(scores, 1), 1)
    for m in (m1, m2):
        assert torch.equal(m.mask.sum(1), torch.full((B,), 32.0))
        assert (rank[m.mask.bool()] < 48).all()                          # only the lowest 75% are hidden
        _check_consistent(m, L)


def test_attention_bernoulli_mst_form():
    B, L = 64, 196
    scores = torch.rand(B, L, generator=_gen(10))
    m = AttentionGuidedMasking(mode="bernoulli", candidate_ratio=0.5, prob=0.3)(B, L, generator=_gen(11),
                                                                                scores=scores)
    assert m.ids_keep is None and m.ids_restore is None
    rank = torch.argsort(torch.argsort(scores, 1), 1)
    assert m.mask[rank >= 98].sum() == 0
    frac = m.mask[rank < 98].mean().item()
    assert 0.25 < frac < 0.35
    assert m.mask.sum(1).unique().numel() > 1                            # count varies per sample


def test_attention_errors():
    with pytest.raises(ValueError, match="scores"):
        AttentionGuidedMasking(0.5)(2, 9)
    with pytest.raises(ValueError, match="too few candidates"):
        AttentionGuidedMasking(0.75, candidate_ratio=0.5)
    assert isinstance(build_masker("attention", mask_ratio=0.6), AttentionGuidedMasking)
