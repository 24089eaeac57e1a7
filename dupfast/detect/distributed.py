"""The few collective operations the detector needs; each is the identity without torch.distributed."""
import torch


def world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (fp64 tensors stay fp64: gloo and nccl both reduce doubles)."""
    if world() > 1:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] tensor along dim 0, in rank order (sizes may differ).
    Used only for small per-sample vectors (validation scores and their ids), never features."""
    if world() == 1:
        return t
    import torch.distributed as dist
    n = torch.tensor([t.shape[0]], dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t.cpu()
    out = [torch.zeros_like(padded) for _ in range(world())]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])
