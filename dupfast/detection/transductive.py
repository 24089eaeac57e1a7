"""Leave-one-out projection on the pool's own mean shift (the default scorer's 'proj' signal).

Poisoned inputs share one shift in feature space (the trigger's, the style's), so the mean of a pool that
holds them moves along that shift. Per layer, with z = (x - μ) W the clean-whitened feature (P = W Wᵀ):

    pool sample i:   s_i = z_i · Σ_{j≠i} z_j / (N - 1) = ((x_i - μ) · P(S - Nμ) - ‖z_i‖²) / (N - 1)
    clean sample v:  s_v = z_v · Σ_j z_j / N           = (x_v - μ) · P(S - Nμ) / N

with S = Σ_j x_j over the pool. Leaving i out matters: in d dimensions ‖z_i‖² ≈ d, which would lift
every pool sample (clean ones too) above the clean validation samples and break the FRR calibration.
S and N are all-reduced, so sharded pools give the single-process result; ‖z_i‖² comes from the
dispatched Mahalanobis op (squared class-agnostic distance), so only a mat-vec per layer is done here.
"""
import torch

from .. import distributed as D


def loo_projections(x_pool, q_pool, x_val, means, whiteners):
    """x_pool [N, L, d] (this rank's share), q_pool [N, L] = ‖z‖², x_val [n, L, d], means [L, 1, d],
    whiteners [L, d, d] -> (pool projections [N, L], validation projections [n, L]), float64."""
    mu = means[:, 0].double()
    xp = x_pool.double() - mu
    n_pool = D.all_reduce_sum(torch.tensor(float(x_pool.shape[0]), dtype=torch.float64))
    if n_pool < 2:
        raise ValueError("the pool projection needs at least 2 pool samples")
    total = D.all_reduce_sum(xp.sum(0))                              # Σ_j (x_j - μ) = S - Nμ, [L, d]
    W = whiteners.double()
    v = torch.einsum("lde,le->ld", W, torch.einsum("ld,lde->le", total, W))   # P (S - Nμ), per layer
    pool = (torch.einsum("nld,ld->nl", xp, v) - q_pool.double()) / (n_pool - 1)
    val = torch.einsum("nld,ld->nl", x_val.double() - mu, v) / n_pool
    return pool, val
