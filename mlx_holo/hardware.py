"""Backend detection, fast CPU BLAS, Apple chip peak bandwidth table and a measured copy-bandwidth probe."""
from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys
import time

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

# Apple unified-memory peak bandwidth, GB/s (Apple's published specifications per chip).
APPLE_PEAK_GBPS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
    "M5": 153,
}


def openblas_path() -> str | None:
    for p in OPENBLAS_CANDIDATES + tuple(glob.glob("/usr/lib/*/openblas*/libopenblas.so.0")):
        if os.path.exists(p):
            return p
    return None


def ensure_fast_blas() -> None:
    """On Linux CPU, re-exec this process with Debian's OpenBLAS preloaded (MLX's bundled BLAS is ~20x slower).

    Called by the ``python -m`` entry points before MLX is imported. No-op on macOS, when already preloaded, when no
    OpenBLAS is installed, or when MLX_HOLO_NO_REEXEC is set.
    """
    if sys.platform != "linux" or os.environ.get("MLX_HOLO_NO_REEXEC") or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = openblas_path()
    if lib is None:
        return
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (lib, os.environ.get("LD_PRELOAD")) if p),
               MLX_HOLO_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def backend() -> str:
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def chip_name() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    import mlx.core as mx

    info = {"mlx": mx.__version__, "backend": backend(), "device": str(mx.default_device()), "chip": chip_name(),
            "python": platform.python_version(), "platform": platform.platform(),
            "blas": "openblas (preloaded)" if "openblas" in os.environ.get("LD_PRELOAD", "") else "bundled"}
    return info


def chip_peak_gbps(chip: str | None = None) -> float | None:
    """Peak bandwidth of an Apple chip from its name ('Apple M3 Max' -> 400), else None."""
    chip = chip or chip_name()
    best = None
    for name, bw in APPLE_PEAK_GBPS.items():
        if name in chip and (best is None or len(name) > len(best[0])):
            best = (name, bw)
    return best[1] if best else None


def copy_bandwidth_gbps(mb: int = 256, repeats: int = 5) -> float:
    """Measured device copy bandwidth (read + write bytes / time), best of ``repeats``."""
    import mlx.core as mx

    n = mb * (1 << 20) // 4
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b = a + 0  # one read, one write
        mx.eval(b)
        best = min(best, time.perf_counter() - t)
        del b
    return 2 * n * 4 / best / 1e9


def matvec_bandwidth_gbps(mb: int = 256, repeats: int = 5) -> float:
    """Measured read bandwidth of a float32 mat-vec over a ``mb`` MiB matrix (matrix bytes / time), best of
    ``repeats``: what a decode step's weight reads can reach here (on a CPU the BLAS mat-vec uses every core, MLX's
    element-wise copy one)."""
    import mlx.core as mx

    rows = mb * (1 << 20) // 4 // 4096
    w = mx.random.uniform(shape=(rows, 4096))
    x = mx.random.uniform(shape=(4096, 1))
    mx.eval(w, x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(w @ x)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best / 1e9


_SHARED_THREADS: int | None = None  # set by ``share_cores`` when processes of one job share this host


def cpu_threads() -> int:
    """Threads this process should use for its own parallel work: ``MLX_HOLO_THREADS`` when set, else its share of
    the host's cores (``share_cores``), else every core it may run on."""
    env = os.environ.get("MLX_HOLO_THREADS")
    if env:
        return max(1, int(env))
    if _SHARED_THREADS is not None:
        return _SHARED_THREADS
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def share_cores(processes: int) -> int:
    """``processes`` processes of one job run on this host: this one's own thread pools (``cpu_threads``, e.g. RTN's
    grid fits, whose results do not depend on how many threads share the work) get cores // processes threads (at
    least one). BLAS keeps its threads: OpenBLAS's results depend on its thread count, and a rank must compute what
    a single process computes. ``MLX_HOLO_THREADS`` set by the user is kept as it is. Returns the thread count."""
    global _SHARED_THREADS
    _SHARED_THREADS = None
    n = max(1, cpu_threads() // max(1, processes))
    if processes > 1 and not os.environ.get("MLX_HOLO_THREADS"):
        _SHARED_THREADS = n
    return n


def peak_rss() -> int:
    """This process's peak resident memory in bytes (ru_maxrss: bytes on macOS, KiB on Linux)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
