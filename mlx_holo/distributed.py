"""Data-parallel calibration over ``mx.distributed``: the ranks of one job share the calibration windows.

A job launched by ``mlx.launch`` (ring/TCP, MPI or Thunderbolt backends; the launcher sets ``MLX_RANK`` and the
host file) runs the same command on every rank. Each rank pushes a contiguous share of the windows through each
block; the inputs of a block's linears are gathered in rank order, so every rank holds exactly the rows a single
process would have (and every method -- GPTQ's Hessians, Wanda's norms, AWQ's search, QEP's statistics -- sees the
same numbers); each layer is then compressed by one rank (``assign``) and its result exchanged, so every rank carries
the same compressed block forward. Evaluation splits its windows the same way and adds the ranks' sums.

The collectives are ``all_sum`` and ``all_gather`` only (what every backend implements). ``World.sent`` counts the
bytes this rank contributed to them, which the evidence records per block.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import socket
import time
from dataclasses import dataclass, field, fields, is_dataclass

import mlx.core as mx
import numpy as np

from .hardware import share_cores


class DistributedError(RuntimeError):
    """A job whose ranks cannot work together (a method that does not distribute, a lost peer)."""


@dataclass
class World:
    group: object | None = None   # mx.distributed.Group, None for a single process
    rank: int = 0
    size: int = 1
    sent: int = 0                 # bytes this rank contributed to collectives so far
    wait_s: float = 0.0           # seconds spent inside collectives (waiting for the others included)
    load: list = field(default_factory=list)  # work assigned to each rank so far (``assign``)
    local: int = 1                # ranks on this rank's host (this one included)
    threads: int = 0              # threads this rank works with (0: not limited)

    def __post_init__(self):
        self.load = self.load or [0] * self.size

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> tuple[int, int]:
        """The contiguous share [a, b) of n items that this rank works on; the first n % size ranks take one
        more, so the shares concatenated in rank order are 0..n."""
        return share_bounds(n, self.size, self.rank)

    def assign(self, loads: list[int]) -> list[int]:
        """Items with these costs (e.g. weights of each linear of a group) -> the rank computing each: the largest
        first, each to the rank with the least load so far (this call's and earlier calls'), the same on every rank."""
        if not self.distributed:
            return [0] * len(loads)
        owners = [0] * len(loads)
        for j in sorted(range(len(loads)), key=lambda j: (-loads[j], j)):
            r = min(range(self.size), key=lambda r: (self.load[r], r))
            owners[j] = r
            self.load[r] += loads[j]
        return owners

    def _collect(self, fn, x: mx.array) -> mx.array:
        t0 = time.perf_counter()
        self.sent += x.nbytes
        try:
            y = fn(x, group=self.group)
            mx.eval(y)
        except RuntimeError as e:  # the ring backend reports a peer that died this way
            raise DistributedError(f"rank {self.rank}: a collective failed ({e}); another rank stopped") from e
        self.wait_s += time.perf_counter() - t0
        return y

    def all_sum(self, x: mx.array) -> mx.array:
        return x if not self.distributed else self._collect(mx.distributed.all_sum, x)

    def gather_rows(self, x: mx.array, n: int) -> mx.array:
        """x [n_r, ...]: this rank's share of n rows (``share(n)`` in the leading axis, any multiple of it) ->
        the n rows of every rank, concatenated in rank order [n * k, ...]."""
        if not self.distributed:
            return x
        a, b = self.share(n)
        k = mx.array([x.shape[0] // max(1, b - a) if x.shape[0] else 0], dtype=mx.int32)
        k = int(self._collect(mx.distributed.all_gather, k).max().item())  # rows per item (ranks with none: 0)
        counts = [(b - a) * k for a, b in (share_bounds(n, self.size, r) for r in range(self.size))]
        m = max(counts)
        pad = mx.zeros((m - x.shape[0], *x.shape[1:]), dtype=x.dtype) if m > x.shape[0] else None
        y = self._collect(mx.distributed.all_gather, x if pad is None else mx.concatenate([x, pad]))
        parts = [y[r * m:r * m + c] for r, c in enumerate(counts) if c]
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    def exchange(self, payload: bytes) -> list[bytes]:
        """Every rank's bytes -> the list of all ranks' bytes, in rank order (one all_gather of the lengths, one
        all_sum of a buffer where each rank fills its own span)."""
        if not self.distributed:
            return [payload]
        lens = self._collect(mx.distributed.all_gather, mx.array([len(payload)], dtype=mx.int64)).tolist()
        offsets = np.concatenate([[0], np.cumsum(lens)])
        buf = np.zeros(int(offsets[-1]), dtype=np.uint8)
        buf[offsets[self.rank]:offsets[self.rank + 1]] = np.frombuffer(payload, dtype=np.uint8)
        out = np.asarray(self._collect(mx.distributed.all_sum, mx.array(buf)))
        return [out[offsets[r]:offsets[r + 1]].tobytes() for r in range(self.size)]

    def exchange_objects(self, obj) -> list:
        """``exchange`` for Python objects whose arrays are mx arrays (``to_wire`` / ``from_wire``)."""
        return [from_wire(pickle.loads(b)) for b in self.exchange(pickle.dumps(to_wire(obj)))]

    def local_ranks(self) -> int:
        """How many ranks of the job run on this rank's host (this one included): ranks that share a host share
        its cores."""
        if not self.distributed:
            return 1
        key = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:7], "little")
        keys = self._collect(mx.distributed.all_gather, mx.array([key], dtype=mx.int64)).tolist()
        return keys.count(key)

    def max(self, v: float) -> float:
        if not self.distributed:
            return v
        return float(self._collect(mx.distributed.all_gather, mx.array([v], dtype=mx.float32)).max().item())


def check_distributable(recipe, size: int, base_model=None) -> None:
    """Refuse, before any work, what a distributed job cannot share: steps that train on the whole model or on a
    block's full input stream (E2E and block-wise tuning, D2Prune's attention-aware choice) would each need their
    gradients reduced across ranks, which is not built; a base already held in memory belongs to one process."""
    steps = []
    if recipe.e2e_steps > 0:
        steps.append("end-to-end tuning (--e2e-steps): run `mlx-holo tune` on the output afterwards")
    if recipe.tune_steps > 0:
        steps.append("block-wise tuning (--tune-steps)")
    if recipe.method == "d2prune" and recipe.d2_targets == "auto":
        steps.append("D2Prune's attention-aware update (--d2-targets auto)")
    if base_model is not None:
        steps.append("an in-memory base model")
    if steps:
        raise DistributedError(f"a distributed job ({size} ranks) cannot share {'; '.join(steps)}; run it as one "
                               "process or drop the option")


def share_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    base, extra = divmod(n, size)
    a = rank * base + min(rank, extra)
    return a, a + base + (rank < extra)


def world_from_env() -> World:
    """The job this process belongs to: a ``World`` over ``mx.distributed`` when launched as one rank of several
    (``mlx.launch`` sets ``MLX_RANK``; an MPI launch sets ``OMPI_COMM_WORLD_RANK``), else a single process."""
    if not any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        return World()
    try:
        g = mx.distributed.init(strict=True)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"this process was launched as one rank of a job but the job could not be joined "
                               f"({e}); launch with `mlx.launch -n N --backend ring python -m mlx_holo.compress ...`"
                               ) from e
    world = World(g, g.rank(), g.size())
    world.local = world.local_ranks()
    world.threads = share_cores(world.local)
    return world


class _Array:
    """An mx array on the wire: dtype name, shape, raw bytes (bfloat16 travels as its uint16 bits)."""

    def __init__(self, a: mx.array):
        self.dtype = str(a.dtype).split(".")[-1]
        self.shape = tuple(a.shape)
        raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
        self.data = np.asarray(raw).tobytes()

    def array(self) -> mx.array:
        if self.dtype == "bfloat16":
            return mx.array(np.frombuffer(self.data, np.uint16).reshape(self.shape)).view(mx.bfloat16)
        return mx.array(np.frombuffer(self.data, np.dtype(self.dtype)).reshape(self.shape))


class _Fields:
    """A dataclass instance on the wire: its class and its fields (each through ``to_wire``)."""

    def __init__(self, obj):
        self.cls = type(obj)
        self.values = {f.name: to_wire(getattr(obj, f.name)) for f in fields(obj)}


def to_wire(obj):
    """Replace every mx array in nested dicts / lists / tuples / dataclasses by its bytes (``from_wire`` undoes
    it)."""
    if isinstance(obj, mx.array):
        return _Array(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return _Fields(obj)
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_wire(v) for v in obj)
    return obj


def from_wire(obj):
    if isinstance(obj, _Array):
        return obj.array()
    if isinstance(obj, _Fields):
        return obj.cls(**{k: from_wire(v) for k, v in obj.values.items()})
    if isinstance(obj, dict):
        return {k: from_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_wire(v) for v in obj)
    return obj
