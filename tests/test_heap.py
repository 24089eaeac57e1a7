"""heap.release_free_memory: on glibc, freed holes pinned below small survivors go back to the OS."""
import ctypes
import ctypes.util
import subprocess
import sys
import textwrap

import pytest

from dupfast.heap import release_free_memory

GLIBC = sys.platform.startswith("linux") and bool(ctypes.util.find_library("c")) and hasattr(
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_gives_back_holes_pinned_by_small_survivors():
    # a fresh interpreter: 3,000 blocks of 64 KiB (below glibc's mmap threshold: on the heap), each followed
    # by a 32-byte survivor; freeing the blocks leaves holes the heap top cannot shrink over
    code = textwrap.dedent("""
        import ctypes, ctypes.util
        from dupfast.heap import release_free_memory
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        def rss():
            return int([l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1])
        big, small = [], []
        for _ in range(3000):
            p = libc.malloc(65536); ctypes.memset(p, 1, 65536); big.append(p)
            small.append(libc.malloc(32))
        for p in big:
            libc.free(p)
        before = rss()
        ok = release_free_memory()
        print(ok, before, rss())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ok, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert ok
    assert before - after > 150 * 1024, (before, after)  # of the 187.5 MiB freed, most goes back (KiB)


@pytest.mark.parametrize("cost, interval, gap", [(0.005, 10.0, 10.0), (0.5, 10.0, 50.0), (0.005, 0.0, 0.5)])
def test_trimmer_waits_its_interval_and_spends_at_most_its_share(monkeypatch, cost, interval, gap):
    from dupfast import heap
    now = [0.0]
    calls = []

    def trim():  # each trim takes `cost` seconds of the fake clock
        calls.append(now[0])
        now[0] += cost
    monkeypatch.setattr(heap, "release_free_memory", trim)
    t = heap.Trimmer(share=0.01, min_interval=interval, clock=lambda: now[0])
    for _ in range(20000):  # batches of 10 ms: 200 s
        t()
        now[0] += 0.010
    assert t.trims == len(calls) and calls[0] == 0.0
    assert all(b - a >= gap for a, b in zip(calls, calls[1:]))  # max(interval, cost / share) between trims
    assert len(calls) >= int(200 / (gap + 0.02)) - 1
    assert cost * len(calls) <= 0.01 * now[0] + cost


def test_detect_trims_while_scoring_the_pool(monkeypatch):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_models import tiny_classifier, sentiment_samples
    import dupfast
    from dupfast import heap
    from dupfast.detection import text_loader
    calls = []
    monkeypatch.setattr(heap, "release_free_memory", lambda: calls.append(1) or True)
    model, tok = tiny_classifier("bert", seed=0)
    clean = sentiment_samples(120, seed=1)
    pool = sentiment_samples(50, seed=2)
    dupfast.detect(model, text_loader(tok, [s.text for s in pool], None, 8, 16),
                   clean=text_loader(tok, [s.text for s in clean], [s.label for s in clean], 16, 16))
    assert len(calls) == 1  # the first batch; the next trim waits 10 s
