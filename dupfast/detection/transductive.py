"""Leave-one-out projection on the pool's own mean shift (the default scorer's 'proj' signal).

Poisoned inputs share one shift in feature space (the trigger's, the style's), so the mean of a pool that
holds them moves along that shift. Per layer, with z = (x - μ) W the clean-whitened feature (P = W Wᵀ):

    pool sample i:   s_i = z_i · Σ_{j≠i} z_j / (N - 1) = ((x_i - μ) · P(S - Nμ) - ‖z_i‖²) / (N - 1)
    clean sample v:  s_v = z_v · Σ_j z_j / N           = (x_v - μ) · P(S - Nμ) / N

with S = Σ_j x_j over the pool. Leaving i out matters: in d dimensions ‖z_i‖² ≈ d, which would lift
every pool sample (clean ones too) above the clean validation samples and break the FRR calibration.
S and N are all-reduced, so sharded pools give the single-process result; ‖z_i‖² comes from the
dispatched Mahalanobis op (squared class-agnostic distance), so only a mat-vec per layer is done here.

The direction needs the whole pool, so each input's pooled features wait until the pool has been seen:
`PoolFeatures` keeps them in memory up to a byte budget and beyond it in an unnamed temporary file, and the
projection reads them back in chunks (float64 only a chunk at a time), so memory stays flat in N.
"""
import os
import tempfile
from typing import Iterator, Optional, Union

import torch

from .. import distributed as D

CHUNK_ROWS = 1024
DEFAULT_MEMORY = 1 << 30   # bytes of pool features kept in memory before spilling to disk
MEMORY_ENV = "DUPFAST_PROJECTION_MEMORY"


def memory_budget(value: Optional[int] = None) -> int:
    """Bytes of pool features kept in memory: `value`, else $DUPFAST_PROJECTION_MEMORY, else 1 GiB."""
    source = "projection_memory"
    if value is None:
        raw = os.environ.get(MEMORY_ENV)
        if raw is None:
            return DEFAULT_MEMORY
        source = f"${MEMORY_ENV}"
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{source} must be a whole number of bytes, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{source} must be a whole number of bytes >= 0 (0: always spill to disk), got {value!r}")
    return value


class PoolFeatures:
    """Float32 rows [*, L, d] appended batch by batch: in memory while the total fits `memory_bytes`, then all
    of them in one unnamed temporary file (`directory`, default the system's temp dir; removed when closed or
    collected, also after a crash), read back by `chunks`.

    In memory the rows are copied into slabs of SLAB_BYTES, not kept as the batches' own tensors: a slab is one
    allocation above glibc's largest mmap threshold (32 MiB), so it lives outside the heap, where thousands of
    batch-sized survivors would pin the freed temporaries of every forward pass between them (heap.py)."""

    SLAB_BYTES = 64 << 20

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY, directory: Optional[str] = None):
        self.memory_bytes, self.directory = memory_bytes, directory
        self.rows, self.shape = 0, None
        self._slabs, self._file = [], None   # in memory: [slab tensor, rows filled]

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def append(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.shape is None:
            self.shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"pool features of shape {tuple(x.shape[1:])} after {self.shape}")
        self.rows += x.shape[0]
        if self._file is None and self.rows * self._row_bytes() > self.memory_bytes:
            self._file = tempfile.TemporaryFile(dir=self.directory)
            for slab, filled in self._slabs:
                self._write(slab[:filled])
            self._slabs = []
        if self._file is None:
            self._copy_in(x)
        else:
            self._write(x.to("cpu", torch.float32).contiguous())

    def _row_bytes(self) -> int:
        return 4 * int(torch.Size(self.shape).numel())

    def _copy_in(self, x):
        start = 0
        while start < x.shape[0]:
            if not self._slabs or self._slabs[-1][1] == self._slabs[-1][0].shape[0]:
                rows = max(1, min(self.SLAB_BYTES, max(self.memory_bytes, 1)) // self._row_bytes())
                self._slabs.append([torch.empty((rows,) + self.shape, dtype=torch.float32), 0])
            slab = self._slabs[-1]
            n = min(x.shape[0] - start, slab[0].shape[0] - slab[1])
            slab[0][slab[1]:slab[1] + n].copy_(x[start:start + n])
            slab[1] += n
            start += n

    def _write(self, x):
        self._file.write(memoryview(x.numpy()).cast("B"))

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[torch.Tensor]:
        """The rows in order, `rows` at a time (in memory: views of the slabs, `rows` at a time)."""
        if self._file is None:
            for slab, filled in self._slabs:
                yield from slab[:filled].split(rows)
            return
        self._file.flush()
        self._file.seek(0)
        row_bytes = self._row_bytes()
        for start in range(0, self.rows, rows):
            chunk = torch.empty((min(rows, self.rows - start),) + self.shape, dtype=torch.float32)
            view = memoryview(chunk.numpy()).cast("B")
            if self._file.readinto(view) != chunk.shape[0] * row_bytes:
                raise OSError("the spilled pool features file was truncated")
            yield chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._slabs = None, []


def _chunks(x: Union[torch.Tensor, PoolFeatures]) -> Iterator[torch.Tensor]:
    if isinstance(x, PoolFeatures):
        yield from x.chunks()
    else:
        yield from x.split(CHUNK_ROWS)


def _rows(x) -> int:
    return x.rows if isinstance(x, PoolFeatures) else x.shape[0]


def loo_projections(x_pool, q_pool, x_val, means, whiteners, weights=None):
    """x_pool [N, L, d] (this rank's share; a tensor or `PoolFeatures`), q_pool [N, L] = ‖z‖², x_val [n, L, d],
    means [L, 1, d], whiteners [L, d, d] -> (pool projections [N, L], validation projections [n, L]), float64.
    weights [N]: each row's share of one sample (1 / its copies, duplicates.py), so k copies of an input move
    the pool mean as one sample and leaving "one out" leaves all of them out; None: every row its own sample.
    Two passes over x_pool in chunks: the pool sum, then each sample's dot with the direction."""
    mu = means[:, 0].double()
    if weights is None:
        weights = torch.ones(_rows(x_pool), dtype=torch.float64)
    weights = weights.double().cpu()
    n_pool = D.all_reduce_sum(weights.sum())
    if n_pool < 2:  # one distinct input (copies of it): no "rest of the pool" to project on, no evidence
        return (torch.zeros(_rows(x_pool), mu.shape[0], dtype=torch.float64),
                torch.zeros(x_val.shape[0], mu.shape[0], dtype=torch.float64))
    local, start = torch.zeros_like(mu), 0
    for c in _chunks(x_pool):
        w = weights[start:start + c.shape[0]].to(c.device)
        local += torch.einsum("n,nld->ld", w, c.double() - mu)
        start += c.shape[0]
    total = D.all_reduce_sum(local)                                  # Σ_j w_j (x_j - μ), [L, d]
    W = whiteners.double()
    v = torch.einsum("lde,le->ld", W, torch.einsum("ld,lde->le", total, W))   # P (S - Nμ), per layer
    offset = (mu * v).sum(-1)                                        # μ · v, per layer
    dots = [torch.einsum("nld,ld->nl", c.double(), v) for c in _chunks(x_pool)]
    dots = (torch.cat(dots) if dots else torch.zeros(0, mu.shape[0], dtype=torch.float64)) - offset
    pool = (dots - q_pool.double()) / (n_pool - 1)
    val = torch.einsum("nld,ld->nl", x_val.double() - mu, v) / n_pool
    return pool, val
