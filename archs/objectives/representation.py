"""Representation-health monitors and anti-collapse regularisers for the JEPA objective.

Every function takes z of shape (N, d): N representation vectors of d dims, computed in float32 whatever z's dtype
(sequence_share takes (B, L, d): B sequences of L positions).

Monitors (what a healthy vs collapsed batch looks like):
  per_dim_std          spread of each dimension over the batch. A collapsed encoder maps every input to (nearly) the
                       same vector, so every dimension's std goes to 0.
  effective_rank       RankMe (Garrido et al. 2023) / Roy & Vetterli 2007: exp of the entropy of the normalised
                       singular values, a smooth count of the directions the batch occupies (1 .. min(N, d)).
                       Dimensional collapse keeps vectors distinct but squeezes them into a few directions: the std can
                       look fine while the effective rank is tiny compared with d.
  mean_pairwise_cosine mean cosine similarity over all pairs of distinct vectors: ~0 for unrelated vectors, -> 1 when
                       all vectors point the same way (complete collapse).
  sequence_share       the share of the variance that is constant within each sequence. Slow collapse keeps vectors
                       distinct across sequences (std, rank and cosine all look healthy) but makes them (nearly)
                       the same at every position of a sequence: they encode which text a window comes from, not
                       its bytes. Fresh encoders give 0.05 (bidirectional) to 0.15 (causal Transformer) on
                       tinyshakespeare windows of 128 bytes.
  no_information_warning  a byte probe whose bpb is not below the unigram entropy of the text it is scored on knows
                       nothing beyond the byte frequencies.

Regularisers (differentiable, to add to the loss):
  vicreg_variance / vicreg_covariance  VICReg's hinge on per-dim std and off-diagonal covariance (Bardes et al. 2022).
  sigreg                               LeJEPA's Sketched Isotropic Gaussian Regularisation (Balestriero & LeCun 2025):
                                       pushes random 1-D projections of z towards N(0, 1).

collapse_warnings turns the monitors into one-line verdicts against the thresholds below.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The JEPA objective passes layer-normalised vectors (zero mean, unit variance across their d dims), so a healthy
# batch has per-dim stds of order 1 and, the vectors being mean-free, cosine = correlation between two vectors.
MIN_MEAN_STD = 0.05  # vectors differ by < 5% of their unit scale: the encoder output barely depends on its input
MAX_MEAN_COSINE = 0.9  # every pair of vectors is > 0.9 correlated: they all point (nearly) the same way
# Healthy SSL encoders have an effective rank that is a sizeable fraction of d (RankMe); below 2% of d the batch lives
# in a handful of directions. The floor of 1.5 keeps the check meaningful for small d, where 2% of d is below the
# minimum possible value 1: it then fires only when one direction clearly dominates.
MIN_RANK_FRACTION = 0.02
MIN_EFFECTIVE_RANK = 1.5
# Over half the variance constant within sequences: the representation follows the sequence, not its bytes. A
# next_latent JEPA with LayerNorm targets reached 0.78 on the CPU quickstart (its probe at the unigram entropy);
# fresh encoders give 0.05-0.15 and the runs with instance-normalised targets stayed at 0.01-0.21.
MAX_SEQUENCE_SHARE = 0.5
# A probe within this many bits of the unigram entropy has learned (almost) nothing but byte frequencies.
NO_INFORMATION_MARGIN = 0.05

# SIGReg quadrature, as in the LeJEPA reference code: 17 knots on [0, 3], trapezoid rule.
SIGREG_T_MAX = 3.0
SIGREG_KNOTS = 17


def _as_float32_matrix(z: Tensor) -> Tensor:
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"expected representations of shape (N, d) with N >= 2, got shape {tuple(z.shape)}")
    return z.to(torch.float32)


def per_dim_std(z: Tensor) -> Tensor:
    """(d,) standard deviation of each dimension over the N samples (population std: correction=0, divides by N)."""
    return _as_float32_matrix(z).std(dim=0, correction=0)


def effective_rank(z: Tensor) -> Tensor:
    """Scalar effective rank exp(-sum_i p_i log p_i), p_i = s_i / sum(s), s the singular values of z.

    z is not centred (as in RankMe). A rank-1 matrix gives 1, I_d gives d, an isotropic Gaussian with N >> d gives
    close to d. RankMe adds eps = 1e-7 to every p_i to avoid log 0; here 0 log 0 = 0 is used instead (torch.xlogy),
    which keeps the rank-1 and I_d values exact. An all-zero z has no direction at all; it is defined as 1.0, the
    value of a fully collapsed batch (p = 0 everywhere, entropy 0), rather than NaN.
    """
    singular_values = torch.linalg.svdvals(_as_float32_matrix(z))
    p = singular_values / singular_values.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp(-torch.xlogy(p, p).sum())


def mean_pairwise_cosine(z: Tensor, eps: float = 1e-8) -> Tensor:
    """Scalar mean of cos(z_i, z_j) over the N (N - 1) ordered pairs i != j, in O(N d).

    With unit vectors u_i, ||sum_i u_i||^2 = sum_i ||u_i||^2 + sum_{i != j} u_i . u_j. Rows are divided by
    max(||z_i||, eps), so a zero row becomes the zero vector: its cosine with every other row counts as 0.
    """
    unit = F.normalize(_as_float32_matrix(z), dim=1, eps=eps)
    n = unit.shape[0]
    cross_terms = unit.sum(dim=0).square().sum() - unit.square().sum()
    return cross_terms / (n * (n - 1))


def sequence_share(z: Tensor) -> Tensor:
    """Scalar share of the variance of z (B, L, d) that its per-sequence means explain: between-sequence sum of
    squares / total sum of squares, both about the mean over all B * L vectors. 0: every sequence has the same
    mean vector; 1: each sequence is constant over its positions. All-equal vectors (no variance) give 0."""
    if z.dim() != 3 or z.shape[0] * z.shape[1] < 2:
        raise ValueError(f"expected representations of shape (B, L, d) with B * L >= 2, got shape {tuple(z.shape)}")
    z = z.to(torch.float32)
    centred = z - z.mean(dim=(0, 1))
    between = centred.mean(dim=1).square().sum() * z.shape[1]
    return between / centred.square().sum().clamp_min(torch.finfo(torch.float32).tiny)


def vicreg_variance(z: Tensor, target_std: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg variance term: mean_j relu(target_std - sqrt(var_j + eps)), var_j unbiased (/(N - 1)) as in their code."""
    std = torch.sqrt(_as_float32_matrix(z).var(dim=0, correction=1) + eps)
    return F.relu(target_std - std).mean()


def vicreg_covariance(z: Tensor) -> Tensor:
    """VICReg covariance term: sum of squared off-diagonal entries of cov(z) (centred, /(N - 1)), divided by d."""
    z = _as_float32_matrix(z)
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (z.shape[0] - 1)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diagonal.square().sum() / z.shape[1]


def sigreg(
    z: Tensor,
    num_directions: int = 256,
    generator: torch.Generator | int | None = None,
    t_max: float = SIGREG_T_MAX,
    knots: int = SIGREG_KNOTS,
) -> Tensor:
    """LeJEPA's SIGReg: the Epps-Pulley statistic of z's projections on random directions vs N(0, 1), averaged.

    Each call draws num_directions directions a_m ~ N(0, I_d) / ||.|| from `generator` (a torch.Generator, or an int
    seed for a fresh one on z's device; None: the global RNG). For each projection x = z a_m (N values):

        T_m = N * integral_{-t_max}^{t_max} |phi_N(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt,
        phi_N(t) = mean_n exp(i t x_n),  |phi_N - phi|^2 = (mean cos(t x) - exp(-t^2/2))^2 + (mean sin(t x))^2,

    and the result is mean_m T_m. The integrand is even in t, so it is integrated over [0, t_max] with the trapezoid
    rule on `knots` equally spaced knots and doubled. Source followed (facts, not code): Balestriero & LeCun 2025,
    arXiv:2511.08544, and their reference code github.com/rbalestr-lab/lejepa (MINIMAL.md `SIGReg`,
    lejepa/univariate/epps_pulley.py, lejepa/multivariate/slicing.py): t in linspace(0, 3, 17), doubled trapezoid
    weights times the window exp(-t^2/2), statistic scaled by N, Gaussian directions normalised to unit length,
    mean over 256 slices. Differences: directions come from the caller's generator instead of a step-counter seed,
    and there is no cross-device all_reduce of the empirical characteristic function.

    Scale: for N(0, I) samples E[T_m] = int (1 - e^{-t^2}) e^{-t^2/2} dt ~ 1.06 whatever N; a fully collapsed batch
    (all rows equal to 0) gives ~0.41 N, and wrongly scaled samples also grow in proportion to N.
    """
    z = _as_float32_matrix(z)
    n, d = z.shape
    if isinstance(generator, int):
        generator = torch.Generator(device=z.device).manual_seed(generator)
    draw_device = generator.device if generator is not None else z.device
    directions = torch.randn(d, num_directions, generator=generator, device=draw_device).to(z.device)
    directions = directions / directions.norm(dim=0)

    t = torch.linspace(0.0, t_max, knots, device=z.device)
    gaussian_cf = torch.exp(-t.square() / 2)  # also the integration window
    step = t_max / (knots - 1)
    trapezoid = torch.full((knots,), 2 * step, device=z.device)  # doubled: the integral over [-t_max, 0] mirrors it
    trapezoid[[0, -1]] = step
    weights = trapezoid * gaussian_cf

    tx = (z @ directions).unsqueeze(-1) * t  # (N, M, knots)
    squared_error = (tx.cos().mean(dim=0) - gaussian_cf).square() + tx.sin().mean(dim=0).square()
    return (squared_error @ weights).mean() * n


def collapse_warnings(
    std_mean: float, effective_rank: float, mean_cosine: float, dim: int, subject: str = "representations",
    sequence_share: float | None = None,
) -> list[str]:
    """One-line warnings for each collapse sign in the monitors' values (empty list: healthy).

    `subject` names what was measured in the messages, e.g. "target representations"; `sequence_share` is checked
    when given.
    """
    stats = {"mean per-dim std": std_mean, "effective rank": effective_rank, "mean pairwise cosine": mean_cosine}
    if sequence_share is not None:
        stats["sequence share"] = sequence_share
    non_finite = [name for name, value in stats.items() if not math.isfinite(value)]
    if non_finite:
        return [f"collapse check: non-finite {', '.join(non_finite)} of {subject}"]
    warnings = []
    if std_mean < MIN_MEAN_STD:
        warnings.append(f"collapse: mean per-dim std of {subject} {std_mean:.3g} < {MIN_MEAN_STD}")
    if mean_cosine > MAX_MEAN_COSINE:
        warnings.append(f"collapse: mean pairwise cosine of {subject} {mean_cosine:.3f} > {MAX_MEAN_COSINE}")
    min_rank = max(MIN_EFFECTIVE_RANK, MIN_RANK_FRACTION * dim)
    if effective_rank < min_rank:
        warnings.append(
            f"dimensional collapse: effective rank of {subject} {effective_rank:.2f} < {min_rank:.3g} (d = {dim})"
        )
    if sequence_share is not None and sequence_share > MAX_SEQUENCE_SHARE:
        warnings.append(f"slow collapse: {sequence_share:.0%} of the variance of {subject} is constant within each "
                        f"sequence (> {MAX_SEQUENCE_SHARE:.0%}): they follow the sequence, not its bytes")
    return warnings


def no_information_warning(probe_bpb: float, unigram_bpb: float, subject: str = "probe bpb") -> list[str]:
    """A one-line warning when a byte probe's bpb is not below the unigram entropy minus NO_INFORMATION_MARGIN."""
    if not math.isfinite(probe_bpb) or probe_bpb >= unigram_bpb - NO_INFORMATION_MARGIN:
        return [f"no information: {subject} {probe_bpb:.4f} is not {NO_INFORMATION_MARGIN} bits below the unigram "
                f"entropy of the eval text ({unigram_bpb:.4f}): the representations tell the probe nothing beyond "
                "byte frequencies"]
    return []
