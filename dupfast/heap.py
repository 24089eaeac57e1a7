"""Hand freed heap pages back to the operating system between batches (glibc's malloc_trim).

A streaming pass frees each batch's large temporaries (hidden states, pooled features) but keeps a few small
tensors per batch (its scores). glibc places both on the same heap and returns memory to the OS only from the
heap's top, so the small survivors pin every freed hole below them: resident memory then grows with the number
of batches although live memory does not (measured: ≈ 26 KB per pool input at MiniLM's shape, 2.6 GiB at 10⁵
inputs). malloc_trim(0) releases the free pages inside the heap too; `Trimmer` calls it rarely (see there).
The largest such survivors, the default mode's pool features, live in slabs outside the heap
(transductive.PoolFeatures). Elsewhere (musl, macOS, Windows) it is a
no-op: those allocators do not keep such holes resident in the same way, or expose no such call.
"""
import ctypes
import ctypes.util
import sys
import time

_TRIM = None


def _malloc_trim():
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                fn = libc.malloc_trim
            except (OSError, AttributeError):  # not glibc
                fn = None
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _TRIM = fn
    return _TRIM


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True where the allocator could be asked (glibc)."""
    fn = _malloc_trim()
    if not fn:
        return False
    fn(0)
    return True


class Trimmer:
    """Call release_free_memory at most every `min_interval` seconds and at most `share` of the wall time.
    Each trim costs more than its own heap walk: the pages it hands back are the ones the next forward pass
    faults in again (measured on MiniLM, trimming after every other batch made detect 7% slower), so trims are
    rare; between them the heap may only grow by the fragmentation of a few seconds of batches."""

    def __init__(self, share: float = 0.01, min_interval: float = 10.0, clock=time.perf_counter):
        self.share, self.min_interval, self.clock = share, min_interval, clock
        self.next_at, self.trims = float("-inf"), 0

    def __call__(self) -> bool:
        start = self.clock()
        if start < self.next_at:
            return False
        release_free_memory()
        end = self.clock()
        self.next_at = end + max(self.min_interval, (end - start) / self.share)
        self.trims += 1
        return True
