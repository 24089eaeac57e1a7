"""torch.distributed for all of dupfast: every helper is the identity (or a constant) in a single process.

    init_from_env()            torchrun's environment -> a process group (gloo on CPU, nccl on CUDA)
    world_size(), rank()       1 and 0 without a process group
    is_sharded()               more than one rank: each rank's loader is a shard of the data
    all_reduce_sum(tensor)     in-place SUM of a tensor (detection statistics, fp64 stays fp64)
    all_gather_rows(tensor)    rank-ordered concatenation of [n_r, ...] tensors of any n_r
    reduce_numbers(values)     SUM or MAX of a few Python numbers (counts, metric sums)
    wrap_ddp(model, device)    DistributedDataParallel when sharded
"""
import os

import torch


def initialized() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if initialized() else 0


def is_sharded() -> bool:
    return world_size() > 1


def init_from_env() -> bool:
    """Start torch.distributed from torchrun's environment (WORLD_SIZE > 1); False, and nothing done,
    in a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return True


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on `t` runs: nccl reduces and gathers CUDA tensors only, so a CPU tensor (a count,
    the detection statistics on the host) travels through this rank's GPU; gloo takes the tensor as it is."""
    import torch.distributed as dist
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over ranks (fp64 tensors stay fp64: gloo and nccl both reduce doubles)."""
    if is_sharded():
        import torch.distributed as dist
        dev = _comm_device(t)
        if dev == t.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        else:
            on = t.to(dev)
            dist.all_reduce(on, op=dist.ReduceOp.SUM, group=group)
            t.copy_(on)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] tensor along dim 0, in rank order (sizes may differ).
    Used only for small per-sample vectors (validation scores and their ids), never features."""
    if not is_sharded():
        return t
    import torch.distributed as dist
    world = world_size()
    dev = _comm_device(torch.empty(0))  # the host for gloo (as before), this rank's GPU for nccl
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())].cpu() for o, s in zip(out, sizes)])


def reduce_numbers(values, op: str = "sum") -> list:
    """Reduce a list of numbers over the ranks (float64 on the CPU: gloo-safe, exact for counts)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_sharded():
        import torch.distributed as dist
        if dist.get_backend() == "nccl":  # nccl reduces device tensors only
            t = t.cuda()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().tolist()


def wrap_ddp(model, device):
    """DistributedDataParallel over the trainable parameters when sharded; the model itself otherwise."""
    if not is_sharded():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)
