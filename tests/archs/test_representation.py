"""Representation monitors and anti-collapse regularisers: known values on constructed inputs, invariances,
SIGReg's Gaussian-vs-collapsed separation and its gradient, collapse verdicts, input errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.archs.objectives.representation import (
    collapse_warnings,
    effective_rank,
    mean_pairwise_cosine,
    no_information_warning,
    per_dim_std,
    sequence_share,
    sigreg,
    vicreg_covariance,
    vicreg_variance,
)

SEEDS = st.integers(0, 2**31 - 1)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# -- per_dim_std -------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(1, 16), seed=SEEDS)
def test_per_dim_std_is_population_std(n, d, seed):
    z = torch.randn(n, d, generator=seeded(seed), dtype=torch.float64)
    torch.testing.assert_close(per_dim_std(z), z.std(dim=0, correction=0).float())


def test_per_dim_std_is_float32_for_low_precision_input():
    z = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.bfloat16)
    out = per_dim_std(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))


# -- effective_rank ----------------------------------------------------------------------------------------------
def test_effective_rank_known_values():
    gen = seeded(0)
    rank_one = torch.randn(64, 1, generator=gen) @ torch.randn(1, 16, generator=gen)
    assert abs(effective_rank(rank_one).item() - 1.0) < 1e-3
    assert effective_rank(torch.eye(32)).item() == pytest.approx(32.0, rel=1e-5)
    assert effective_rank(torch.randn(4096, 32, generator=gen)).item() > 0.9 * 32
    assert effective_rank(torch.zeros(8, 4)).item() == 1.0  # defined, not NaN


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 48), d=st.integers(1, 24), r=st.integers(1, 8), seed=SEEDS)
def test_effective_rank_of_rank_r_matrix_is_between_one_and_r(n, d, r, seed):
    gen = seeded(seed)
    z = torch.randn(n, r, generator=gen) @ torch.randn(r, d, generator=gen)
    rank = effective_rank(z).item()
    # The entropy of r weights is at most log r; float32 SVD leaves ~1e-6 relative mass in the null directions.
    assert 1.0 - 1e-4 <= rank <= min(r, n, d) + 1e-3


# -- mean_pairwise_cosine ----------------------------------------------------------------------------------------
def test_mean_pairwise_cosine_known_values():
    assert mean_pairwise_cosine(torch.tensor([[1.0, 2.0, -3.0]]).expand(5, 3)).item() == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_cosine(torch.eye(6)).item() == pytest.approx(0.0, abs=1e-7)
    # Antipodal pair: cos = -1. A zero row counts as cosine 0 with the others: pairs (0,1) -1, (0,2) 0, (1,2) 0.
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])).item() == pytest.approx(-1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 0.0]])).item() == pytest.approx(-1 / 3)
    # iid Gaussian rows: the mean of N (N - 1) / 2 cosines with sd 1/sqrt(d) each has sd ~ sqrt(2) / (N sqrt(d)).
    iid = torch.randn(1024, 64, generator=seeded(1))
    assert abs(mean_pairwise_cosine(iid).item()) < 5 * math.sqrt(2) / (1024 * 8)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 20), d=st.integers(1, 8), seed=SEEDS)
def test_mean_pairwise_cosine_matches_all_pairs_and_ignores_row_scale(n, d, seed):
    gen = seeded(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    cosines = F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=-1)
    expected = (cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1))
    scaled = z * torch.exp(3 * torch.randn(n, 1, generator=gen, dtype=torch.float64))  # positive, wide range
    torch.testing.assert_close(mean_pairwise_cosine(z), expected.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_pairwise_cosine(scaled), mean_pairwise_cosine(z), atol=1e-5, rtol=0)


# -- VICReg ------------------------------------------------------------------------------------------------------
def test_vicreg_terms_hand_computed():
    # Columns (1, -1, 0) and (2, -2, 0): mean 0, unbiased variances 1 and 4, covariance 2.
    z = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.0, 0.0]], requires_grad=True)
    assert vicreg_variance(z).item() == 0.0  # both stds >= 1
    expected = ((3 - math.sqrt(1 + 1e-4)) + (3 - math.sqrt(4 + 1e-4))) / 2
    assert vicreg_variance(z, target_std=3.0).item() == pytest.approx(expected, rel=1e-6)
    covariance = vicreg_covariance(z)
    assert covariance.item() == pytest.approx((2.0**2 + 2.0**2) / 2, rel=1e-6)
    (vicreg_variance(z, target_std=3.0) + covariance).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_vicreg_covariance_zero_for_uncorrelated_columns():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert vicreg_covariance(z).item() == 0.0


# -- SIGReg ------------------------------------------------------------------------------------------------------
def test_sigreg_small_for_gaussian_large_for_collapsed_or_misscaled():
    n, d = 512, 32
    gen = seeded(2)
    gaussian = sigreg(torch.randn(n, d, generator=gen), generator=0).item()
    # Under N(0, I) the expected statistic is int (1 - e^{-t^2}) e^{-t^2/2} dt ~ 1.06 for any N.
    assert 0.5 < gaussian < 2.0
    collapsed = torch.randn(1, d, generator=gen).expand(n, d)
    assert sigreg(collapsed, generator=0).item() > 50 * gaussian
    assert sigreg(torch.zeros(n, d), generator=0).item() == pytest.approx(0.41 * n, rel=0.02)  # ~0.41 N, see doc
    assert sigreg(4 * torch.randn(n, d, generator=gen), generator=0).item() > 50 * gaussian


def test_sigreg_directions_follow_the_generator():
    z = torch.randn(64, 8, generator=seeded(3))
    assert sigreg(z, generator=5).item() == sigreg(z, generator=seeded(5)).item()
    assert sigreg(z, generator=5).item() != sigreg(z, generator=6).item()


def test_sigreg_descent_lifts_a_nearly_collapsed_batch():
    gen = seeded(4)
    z = (torch.randn(1, 16, generator=gen) + 0.01 * torch.randn(256, 16, generator=gen)).requires_grad_()
    start_rank = effective_rank(z).item()
    optimizer = torch.optim.Adam([z], lr=0.05)
    for step in range(60):
        loss = sigreg(z, num_directions=64, generator=step)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(z.grad).all()
        optimizer.step()
    assert start_rank < 1.5
    assert effective_rank(z).item() > 4 * start_rank
    assert sigreg(z.detach(), generator=10_000).item() < 0.1 * sigreg(z.detach() * 0, generator=10_000).item()


# -- collapse_warnings -------------------------------------------------------------------------------------------
def monitor(z):
    return per_dim_std(z).mean().item(), effective_rank(z).item(), mean_pairwise_cosine(z).item(), z.shape[1]


def test_collapse_warnings_on_monitored_batches():
    gen = seeded(5)
    n, d = 256, 64
    healthy = F.layer_norm(torch.randn(n, d, generator=gen), (d,))
    assert collapse_warnings(*monitor(healthy)) == []

    shared = torch.randn(1, d, generator=gen)
    collapsed = F.layer_norm(shared + 1e-3 * torch.randn(n, d, generator=gen), (d,))
    warnings = collapse_warnings(*monitor(collapsed), subject="target representations")
    assert len(warnings) == 3  # std -> 0, cosine -> 1, and a single direction
    assert warnings[0].startswith("collapse: mean per-dim std of target representations")

    # Vectors +-u: distinct (std ~ 1, mean cosine ~ 0) but all on one line.
    signs = torch.randint(0, 2, (n, 1), generator=gen).float() * 2 - 1
    dimensional = F.layer_norm(signs * shared, (d,))
    warnings = collapse_warnings(*monitor(dimensional))
    assert len(warnings) == 1 and warnings[0].startswith("dimensional collapse: effective rank")


@pytest.mark.parametrize(
    "stats, expected",
    [
        ((0.003, 20.0, 0.01, 64), "collapse: mean per-dim std of representations 0.003 < 0.05"),
        ((0.8, 20.0, 0.95, 64), "collapse: mean pairwise cosine of representations 0.950 > 0.9"),
        ((0.8, 1.2, 0.01, 64), "dimensional collapse: effective rank of representations 1.20 < 1.5 (d = 64)"),
        ((0.8, 8.0, 0.01, 512), "dimensional collapse: effective rank of representations 8.00 < 10.2 (d = 512)"),
        ((float("nan"), 8.0, 0.01, 512), "collapse check: non-finite mean per-dim std of representations"),
    ],
)
def test_collapse_warnings_each_kind(stats, expected):
    assert collapse_warnings(*stats) == [expected]


def test_collapse_warnings_healthy_stats():
    assert collapse_warnings(0.9, 40.0, 0.02, 64) == []
    assert collapse_warnings(0.9, 1.6, 0.02, 8) == []  # small d: only the 1.5 floor applies


# -- sequence_share and slow collapse ----------------------------------------------------------------------------
def test_sequence_share_known_values():
    gen = seeded(3)
    per_sequence = torch.randn(6, 1, 16, generator=gen).expand(6, 20, 16)  # constant within each sequence
    assert sequence_share(per_sequence).item() == pytest.approx(1.0, abs=1e-6)
    same_sequences = torch.randn(1, 20, 16, generator=gen).expand(6, 20, 16)  # every sequence alike
    assert sequence_share(same_sequences).item() == pytest.approx(0.0, abs=1e-6)
    assert sequence_share(torch.zeros(3, 5, 4)).item() == 0.0  # no variance at all: defined, not NaN
    # i.i.d. vectors: the per-sequence means keep ~1/L of the variance
    assert sequence_share(torch.randn(64, 50, 32, generator=gen)).item() == pytest.approx(1 / 50, rel=0.15)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), length=st.integers(1, 12), d=st.integers(1, 8), seed=SEEDS)
def test_sequence_share_is_a_variance_fraction(b, length, d, seed):
    if b * length < 2:
        return
    z = torch.randn(b, length, d, generator=seeded(seed), dtype=torch.float64)
    centred = z - z.mean(dim=(0, 1))
    means = centred.mean(dim=1, keepdim=True)
    within = (centred - means).square().sum()
    between = means.square().sum() * length
    torch.testing.assert_close(between + within, centred.square().sum())  # the split it rests on
    share = sequence_share(z).item()
    assert 0.0 <= share <= 1.0 + 1e-6
    assert share == pytest.approx((between / centred.square().sum()).item(), abs=1e-5)
    # invariant to a shift and a scale of all vectors
    assert sequence_share(3 * z + 7).item() == pytest.approx(share, abs=1e-5)


def test_slow_collapse_is_flagged_only_over_half():
    assert collapse_warnings(0.9, 40.0, 0.02, 64, sequence_share=0.2) == []
    warnings = collapse_warnings(0.9, 40.0, 0.02, 64, subject="target representations", sequence_share=0.8)
    assert warnings == ["slow collapse: 80% of the variance of target representations is constant within each "
                        "sequence (> 50%): they follow the sequence, not its bytes"]


def test_no_information_warning_at_and_above_the_unigram_entropy():
    assert no_information_warning(3.6, 4.83) == []
    assert no_information_warning(4.77, 4.83) == []  # 0.06 bits below: past the 0.05 margin
    for value in (4.79, 4.829, 5.1, float("nan")):  # within the margin, at, above, or no figure at all
        warning = no_information_warning(value, 4.83)
        assert len(warning) == 1 and warning[0].startswith("no information: probe bpb")


def test_sequence_share_bad_shape_is_a_one_line_error():
    for shape in [(8, 4), (1, 1, 4)]:
        with pytest.raises(ValueError, match=r"^expected representations of shape \(B, L, d\)"):
            sequence_share(torch.zeros(shape))


# -- input errors ------------------------------------------------------------------------------------------------
MONITORS = [per_dim_std, effective_rank, mean_pairwise_cosine, vicreg_variance, vicreg_covariance, sigreg]


@pytest.mark.parametrize("fn", MONITORS)
@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), (1, 8)])
def test_bad_input_shape_is_a_one_line_error(fn, shape):
    with pytest.raises(ValueError, match=r"^expected representations of shape \(N, d\) with N >= 2") as info:
        fn(torch.zeros(shape))
    assert "\n" not in str(info.value)
