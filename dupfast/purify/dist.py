"""torch.distributed helpers: no-ops in a single process, SUM/MAX all-reduces under torchrun."""
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


def all_reduce(values, op: str = "sum") -> list:
    """Reduce a list of numbers over the ranks (float64 on the CPU: gloo-safe, exact for counts)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if initialized() and world_size() > 1:
        import torch.distributed as dist
        backend = dist.get_backend()
        if backend == "nccl":  # nccl reduces device tensors only
            t = t.cuda()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().tolist()


def wrap(model, device):
    """DistributedDataParallel over the trainable (LoRA + head) parameters when torch.distributed is up."""
    if not (initialized() and world_size() > 1):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)
