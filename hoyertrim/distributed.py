"""Several processes (`jax.distributed`): each one's share of a data set, and sums and
concatenations over all processes that every process receives identically.

With one process (the usual case) every function is the identity: a process's share is
everything, a sum over processes is the value itself. With several, floating-point values are
exchanged as their bits (`multihost_utils.process_allgather` of uint32 views, so float64 stays
float64 whether or not JAX runs with 64-bit types) and combined on the host in process order:
every process computes the same numbers, bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["concatenate_over_processes", "initialize", "is_writer", "process_share",
           "sum_over_processes", "writers_text"]


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to the others (`jax.distributed.initialize`): at ``coordinator``
    (``host:port``, process 0's) as ``process_id`` of ``num_processes``, or — all three None —
    in the cluster JAX detects (SLURM, a TPU pod, Kubernetes-style environments). On CPU the
    processes' collectives go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def is_writer() -> bool:
    """Whether this process writes the shared files (stage folders, reports, printed results):
    process 0; every process computes the same values."""
    return jax.process_index() == 0


def process_share(count: int) -> tuple[int, int]:
    """``[start, stop)``: this process's contiguous share of ``count`` items (shares differ in
    size by at most one, in process order)."""
    processes, index = jax.process_count(), jax.process_index()
    return count * index // processes, count * (index + 1) // processes


def _gathered(value: np.ndarray) -> np.ndarray:
    """(processes, *value.shape): every process's ``value`` (same shape and dtype on all),
    exchanged as uint32 words (a dtype narrower than a word travels as float64, exactly)."""
    from jax.experimental import multihost_utils
    value = np.ascontiguousarray(value)
    sent = value if value.dtype.itemsize % 4 == 0 else value.astype(np.float64)
    stacked = np.asarray(multihost_utils.process_allgather(sent.reshape(-1).view(np.uint32),
                                                           tiled=False))
    return stacked.view(sent.dtype).reshape((-1, *value.shape)).astype(value.dtype, copy=False)


def sum_over_processes(value):
    """The sum of ``value`` (a number or an array) over all processes, added in process order
    in its own dtype (float64 stays float64); identical on every process."""
    if jax.process_count() == 1:
        return value
    array = np.asarray(value)
    total = array.dtype.type(0) if array.ndim == 0 else np.zeros_like(array)
    for part in _gathered(array):
        total = total + part
    return total.item() if np.ndim(value) == 0 and not isinstance(value, np.ndarray) else total


def _per_process(rows: np.ndarray) -> list[np.ndarray]:
    """Every process's ``rows`` (n_p, ...), in process order (n_p may differ, even be 0; the
    trailing shape and dtype must not)."""
    rows = np.asarray(rows)
    lengths = _gathered(np.asarray([len(rows)], np.int32))[:, 0]
    # At least one row is sent: an all-empty exchange has no size to reshape by.
    padded = np.zeros((max(int(lengths.max()), 1), *rows.shape[1:]), rows.dtype)
    padded[:len(rows)] = rows
    return [part[:length] for part, length in zip(_gathered(padded), lengths)]


def concatenate_over_processes(rows: np.ndarray) -> np.ndarray:
    """Every process's ``rows`` (n_p, ...) concatenated in process order (n_p may differ; the
    trailing shape and dtype must not)."""
    if jax.process_count() == 1:
        return rows
    return np.concatenate(_per_process(rows))


def writers_text(text: str) -> str:
    """Process 0's ``text`` on every process (e.g. which files it found, so that all processes
    act on the same list)."""
    if jax.process_count() == 1:
        return text
    return _per_process(np.frombuffer(text.encode(), np.uint8))[0].tobytes().decode()
