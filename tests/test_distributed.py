"""dupfast.distributed: the identity in one process; under two gloo ranks (started from torchrun's environment
variables by init_from_env) the collectives sum, take maxima and gather uneven shards in rank order."""
import socket

import torch
import torch.multiprocessing as mp

from dupfast import distributed as D


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_from_env() is False and not D.initialized()
    assert (D.world_size(), D.rank(), D.is_sharded()) == (1, 0, False)
    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert D.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    rows = torch.arange(6).reshape(3, 2)
    assert D.all_gather_rows(rows) is rows
    assert D.reduce_numbers([3, 4.5]) == [3.0, 4.5] and D.reduce_numbers([2], "max") == [2.0]
    model = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(model, torch.device("cpu")) is model


def _rank(rank, world, port, out):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert D.init_from_env() and D.init_from_env()  # a second call finds the group already up
    try:
        rows = torch.full((rank + 2, 2), float(rank))     # 2 rows on rank 0, 3 on rank 1
        total = D.all_reduce_sum(torch.tensor([rank + 1.0], dtype=torch.float64))
        out[rank] = {"world": D.world_size(), "rank": D.rank(), "sharded": D.is_sharded(),
                     "sum": total.item(), "sum_dtype": str(total.dtype),
                     "gathered": D.all_gather_rows(rows).tolist(),
                     "numbers": D.reduce_numbers([rank, 10 * rank + 1]),
                     "max": D.reduce_numbers([rank, -rank], "max"),
                     "ddp": type(D.wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"))).__name__}
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()


def test_two_gloo_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)
    for r in range(2):
        got = out[r]
        assert (got["world"], got["rank"], got["sharded"]) == (2, r, True)
        assert got["sum"] == 3.0 and got["sum_dtype"] == "torch.float64"
        assert got["gathered"] == [[0.0, 0.0]] * 2 + [[1.0, 1.0]] * 3  # rank order, uneven sizes
        assert got["numbers"] == [1.0, 12.0] and got["max"] == [1.0, 0.0]
        assert got["ddp"] == "DistributedDataParallel"
