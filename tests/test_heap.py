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


def test_trimmer_spends_at_most_its_share_of_the_time(monkeypatch):
    from dupfast import heap
    now = [0.0]
    calls = []

    def trim():  # each trim takes 5 ms of the fake clock
        calls.append(now[0])
        now[0] += 0.005
    monkeypatch.setattr(heap, "release_free_memory", trim)
    t = heap.Trimmer(share=0.01, clock=lambda: now[0])
    for _ in range(1000):  # batches of 10 ms
        t()
        now[0] += 0.010
    assert t.trims == len(calls) and calls[0] == 0.0
    assert all(b - a >= 0.5 for a, b in zip(calls, calls[1:]))  # 5 ms / 1% = 0.5 s between trims
    assert 0.005 * len(calls) <= 0.01 * now[0] + 0.005 and len(calls) >= 15


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
    assert 1 <= len(calls) <= 7  # the first batch always, then at most once per batch of the 7
