"""Streaming fp64 sufficient statistics per layer, and what the detector derives from them.

`LayerStats` accumulates n, Σx and Σxxᵀ per layer (and per-class counts and sums) batch by batch. Sums
merge exactly (`merge`, or `all_reduce` across torch.distributed ranks), so a sharded fit equals a
single-process fit. From them:
    shrunk_covariance   sklearn's ShrunkCovariance(shrinkage=0.1): (1-s)·S + s·tr(S)/d·I, S the MLE covariance
    whiteners           lower Cholesky W of the precision P = Σ̂⁻¹ = W Wᵀ, so MD² = ‖(x-μ) W‖²
    calinski_harabasz   sklearn's calinski_harabasz_score, per layer, from the class sums alone
Everything is fp64 (the one-pass Σxxᵀ − nμμᵀ loses digits in fp32).
"""
import torch

from ..distributed import all_reduce_sum

SHRINKAGE = 0.1  # sklearn.covariance.ShrunkCovariance default, used by DUP and DAN


class LayerStats:
    """n, Σx [L, d], Σxxᵀ [L, d, d]; per class n_c [K], Σx_c [L, K, d] (K = 0: no class statistics)."""

    def __init__(self, num_layers: int, dim: int, num_classes: int = 0, device="cpu"):
        if num_layers < 1 or dim < 1 or num_classes < 0:
            raise ValueError(f"LayerStats needs num_layers >= 1, dim >= 1, num_classes >= 0; got "
                             f"{num_layers}, {dim}, {num_classes}")
        self.num_layers, self.dim, self.num_classes = num_layers, dim, num_classes
        f64 = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **f64)
        self.sum = torch.zeros(num_layers, dim, **f64)
        self.sumsq = torch.zeros(num_layers, dim, dim, **f64)
        self.class_n = torch.zeros(num_classes, **f64)
        self.class_sum = torch.zeros(num_layers, num_classes, dim, **f64)

    # ---- accumulation ---------------------------------------------------------------------------
    def update(self, features: torch.Tensor, labels=None) -> "LayerStats":
        """features [B, L, d]; labels [B] in [0, K) (needed when K > 0)."""
        if features.dim() != 3 or features.shape[1:] != (self.num_layers, self.dim):
            raise ValueError(f"features must be [B, {self.num_layers}, {self.dim}], got {tuple(features.shape)}")
        if features.shape[0] == 0:
            return self
        x = features.to(self.sum.device, torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf; the model's hidden states are not finite")
        xt = x.transpose(0, 1)  # [L, B, d]
        self.n += x.shape[0]
        self.sum += xt.sum(1)
        self.sumsq += xt.transpose(1, 2) @ xt
        if self.num_classes:
            if labels is None:
                raise ValueError("class statistics need labels for every batch")
            y = torch.as_tensor(labels, device=x.device).long().reshape(-1)
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"{y.shape[0]} labels for {x.shape[0]} samples")
            if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")
            onehot = torch.nn.functional.one_hot(y, self.num_classes).to(torch.float64)  # [B, K]
            self.class_n += onehot.sum(0)
            self.class_sum += onehot.T.unsqueeze(0) @ xt  # [L, K, d]
        return self

    def merge(self, other: "LayerStats") -> "LayerStats":
        if (other.num_layers, other.dim, other.num_classes) != (self.num_layers, self.dim, self.num_classes):
            raise ValueError("cannot merge statistics of different shapes")
        for name in ("n", "sum", "sumsq", "class_n", "class_sum"):
            getattr(self, name).add_(getattr(other, name).to(self.sum.device))
        return self

    def all_reduce(self, group=None) -> "LayerStats":
        """SUM every statistic over the ranks of torch.distributed (no-op in a single process)."""
        for name in ("n", "sum", "sumsq", "class_n", "class_sum"):
            all_reduce_sum(getattr(self, name), group=group)
        return self

    # ---- derived quantities ---------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.n.item())

    def mean(self) -> torch.Tensor:
        self._need(1)
        return self.sum / self.n

    def class_means(self) -> torch.Tensor:
        """[L, K, d]; classes never seen get the global mean (so they never win a min over classes)."""
        self._need(1)
        seen = self.class_n > 0
        means = self.sum.unsqueeze(1).expand(-1, self.num_classes, -1) / self.n
        cm = self.class_sum / self.class_n.clamp_min(1).view(1, -1, 1)
        return torch.where(seen.view(1, -1, 1), cm, means)

    def present_classes(self) -> torch.Tensor:
        return torch.nonzero(self.class_n > 0).flatten()

    def covariance(self, within_class: bool = False) -> torch.Tensor:
        """MLE covariance [L, d, d] (divided by n, as sklearn's empirical_covariance). within_class: the
        pooled within-class scatter / n, i.e. the covariance of class-centred features (DAN's tied Σ)."""
        self._need(2)
        if within_class:
            if not self.num_classes:
                raise ValueError("within-class covariance needs class statistics (num_classes > 0)")
            cn = self.class_n.clamp_min(1).view(1, -1, 1)
            between = (self.class_sum / cn).transpose(1, 2) @ self.class_sum  # Σ_c n_c μ_c μ_cᵀ
            scatter = self.sumsq - between
        else:
            scatter = self.sumsq - torch.einsum("li,lj->lij", self.sum, self.sum) / self.n
        cov = scatter / self.n
        return (cov + cov.transpose(1, 2)) / 2

    def _need(self, k: int):
        if self.count < k:
            raise ValueError(f"need at least {k} samples to fit statistics, got {self.count}")


def shrunk_covariance(cov: torch.Tensor, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """sklearn.covariance.shrunk_covariance: (1 - s)·cov + s·(tr(cov)/d)·I, batched over leading dims."""
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    d = cov.shape[-1]
    mu = cov.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1 - shrinkage) * cov + shrinkage * mu[..., None, None] * eye


def whiteners(cov: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors W [L, d, d] of the precisions P = cov⁻¹ (P = W Wᵀ), in fp64.

    A layer whose covariance is entirely zero (every feature constant) gets W = 0: sklearn's pinvh gives
    a zero precision there, i.e. distance 0 for everyone. A covariance that is not numerically positive
    definite (shrinkage 0 with N < d) falls back to the eigen-decomposition pseudo-inverse square root,
    which gives the same distances as sklearn's pinvh precision."""
    cov = cov.double()
    out = torch.zeros_like(cov)
    for l in range(cov.shape[0]):
        c = cov[l]
        scale = c.diagonal().abs().max()
        if scale == 0:
            continue
        chol, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0:
            eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            prec = torch.cholesky_solve(eye, chol)
            w, info2 = torch.linalg.cholesky_ex((prec + prec.T) / 2)
            if int(info2) == 0:
                out[l] = w
                continue
        evals, evecs = torch.linalg.eigh(c)
        keep = evals > evals.max() * c.shape[0] * torch.finfo(c.dtype).eps
        out[l] = evecs * torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
    return out


def calinski_harabasz(stats: LayerStats) -> torch.Tensor:
    """sklearn.metrics.calinski_harabasz_score per layer [L], from class sums only:
    CH = [tr(B)/(K-1)] / [tr(W)/(n-K)], tr(B) = Σ_c n_c‖μ_c-μ‖², tr(W) = Σ‖x‖² - Σ_c n_c‖μ_c‖².
    Like sklearn it is 1.0 when tr(W) = 0, and needs 2 <= K <= n-1 classes present."""
    if not stats.num_classes:
        raise ValueError("Calinski-Harabasz needs class statistics (num_classes > 0)")
    present = stats.present_classes()
    n, k = stats.count, int(present.numel())
    if not 1 < k < n:
        raise ValueError(f"Calinski-Harabasz is undefined with {k} class(es) among {n} samples "
                         "(needs 2 <= classes <= samples - 1)")
    cn = stats.class_n[present]                              # [K]
    csum = stats.class_sum[:, present]                       # [L, K, d]
    mu = stats.sum / stats.n                                 # [L, d]
    cmu = csum / cn.view(1, -1, 1)
    between = (cn.view(1, -1) * ((cmu - mu.unsqueeze(1)) ** 2).sum(-1)).sum(-1)
    total_sq = stats.sumsq.diagonal(dim1=1, dim2=2).sum(-1)
    within = total_sq - (cn.view(1, -1) * (cmu ** 2).sum(-1)).sum(-1)
    within = within.clamp_min(0)
    ch = between * (n - k) / (within.clamp_min(1e-300) * (k - 1))
    return torch.where(within > 0, ch, torch.ones_like(ch))
