"""The linear program in Gram form: a layer's problem whose size does not grow with P.

For the linear program every output entry is active, so the smooth part of the layer's problem
is a least-squares misfit, and for the design D = [X, 1] (P × L) and targets Ỹ = Y − offset

    ‖D U − Ỹ‖²_F = tr(Uᵀ G U) − 2 tr(Uᵀ C) + ‖Ỹ‖²_F,      G = DᵀD (L × L),  C = DᵀỸ (L × M)

depends on the P calibration rows only through G, C and ‖Ỹ‖² — sums over rows, accumulated in
chunks of any size (`GramStats.add`), in float64, in O(L² + LM) memory whatever P is (SparseGPT
works with the same H = XᵀX). `compress` turns them into an equivalent row problem with at most
L rows: with G = QΛQᵀ, the rows R = Λ^½Qᵀ and targets Y' = Λ^-½QᵀC give

    ‖D U − Ỹ‖²_F = ‖R U − Y'‖²_F + floor,      floor = ‖Ỹ‖²_F − ‖Y'‖²_F ≥ 0

for every U (the part of Ỹ no weights can reach), so the row-form solver — FISTA, the λ search,
the kept-fraction mode, polish, N:M — runs unchanged on R, Y' and adds ``floor`` to every
measured error: the same problem, the same ε semantics, at the cost of L rows instead of P.

The ReLU program has no such form: which entries are active (y > 0) and the hinge on the
inactive ones are per row, so its misfit is not a function of G; it keeps the row form (on
subsampled rows when P is large).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

__all__ = ["Compressed", "GramStats", "compress", "row_misfit"]

_CHUNK = 65536  # rows per chunk when the statistics are taken from arrays


@dataclasses.dataclass
class GramStats:
    """Sums over calibration rows of one layer, with a ones column for the bias (float64).

    Attributes:
      gram: (N + 1, N + 1) [x, 1]ᵀ[x, 1].
      cross: (N + 1, M) [x, 1]ᵀ y.
      y_squares: (M,) Σ y² per output unit.
      rows: P, the rows added.
    """

    gram: np.ndarray
    cross: np.ndarray
    y_squares: np.ndarray
    rows: int = 0

    @classmethod
    def zeros(cls, num_inputs: int, num_outputs: int) -> "GramStats":
        return cls(np.zeros((num_inputs + 1, num_inputs + 1)),
                   np.zeros((num_inputs + 1, num_outputs)), np.zeros(num_outputs))

    @classmethod
    def accumulate(cls, chunks: Iterable) -> "GramStats":
        """The statistics of ``(x (p, N), y (p, M))`` chunks, in the order given."""
        stats = None
        for x, y in chunks:
            x = np.asarray(x)
            if stats is None:
                stats = cls.zeros(x.shape[1], np.shape(y)[1])
            stats.add(x, y)
        if stats is None:
            raise ValueError("No calibration rows: the chunks were empty.")
        return stats

    @property
    def num_inputs(self) -> int:
        return self.gram.shape[0] - 1

    @property
    def num_outputs(self) -> int:
        return self.cross.shape[1]

    def add(self, x, y) -> "GramStats":
        """Adds rows ``x`` (p, N) with targets ``y`` (p, M); returns self."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or \
                x.shape[1] != self.num_inputs or y.shape[1] != self.num_outputs:
            raise ValueError(f"Expected chunks x (p, {self.num_inputs}) and y (p, "
                             f"{self.num_outputs}); got {x.shape} and {y.shape}.")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError("x or y contains NaN or inf values; clean the layer's signals "
                             "first.")
        n = self.num_inputs
        column_sums = x.sum(axis=0)
        self.gram[:n, :n] += x.T @ x
        self.gram[:n, n] += column_sums
        self.gram[n, :n] += column_sums
        self.gram[n, n] += x.shape[0]
        self.cross[:n] += x.T @ y
        self.cross[n] += y.sum(axis=0)
        self.y_squares += np.square(y).sum(axis=0)
        self.rows += x.shape[0]
        return self

    def misfit(self, kernel, bias, offset=None) -> np.ndarray:
        """(M,) ‖x·kernel + bias + offset − y‖² per output unit over all rows added, from the
        sums (float64)."""
        u = np.concatenate([np.asarray(kernel, np.float64),
                            np.asarray(bias, np.float64)[None]], axis=0)
        gram, cross, y_squares = _shifted(self, offset)
        value = np.einsum("im,ij,jm->m", u, gram, u) - 2 * np.einsum("im,im->m", u, cross)
        return np.maximum(value + y_squares, 0.0)


def _shifted(stats: GramStats, offset):
    """(G, C, ‖y − offset‖²) for targets y − offset (a fixed per-unit term moved to y)."""
    if offset is None:
        return stats.gram, stats.cross, stats.y_squares
    offset = np.asarray(offset, np.float64)
    ones = stats.gram[:, -1]  # [x, 1]ᵀ 1
    cross = stats.cross - np.outer(ones, offset)
    y_sums = stats.cross[-1]
    y_squares = stats.y_squares - 2 * offset * y_sums + stats.rows * offset ** 2
    return stats.gram, cross, y_squares


@dataclasses.dataclass(frozen=True)
class Compressed:
    """An equivalent row problem: ``‖[x, b]·U − y‖² + floor`` is the layer's misfit.

    Attributes:
      x: (r, N) rows.  bias_column: (r,) the column that multiplies the bias (None without
        one).  y: (r, M) targets.  floor: the misfit no weights can remove (sum over units).
      y_norm: ‖y‖_F over the real rows (what ε is relative to).
    """

    x: np.ndarray
    bias_column: np.ndarray | None
    y: np.ndarray
    floor: float
    y_norm: float


def compress(stats: GramStats, *, fit_bias: bool = True, offset=None) -> Compressed:
    """The rows R = Λ^½Qᵀ and targets Y' = Λ^-½QᵀC of the statistics (see the module
    docstring); directions of G below 1e-12 of its largest eigenvalue are dropped (the data
    does not reach them, so neither does C)."""
    gram, cross, y_squares = _shifted(stats, offset)
    if not fit_bias:
        gram, cross = gram[:-1, :-1], cross[:-1]
    eigenvalues, vectors = np.linalg.eigh(gram)
    keep = eigenvalues > max(eigenvalues.max(), 0.0) * 1e-12
    roots = np.sqrt(eigenvalues[keep])
    rows = (vectors[:, keep] * roots).T  # (r, L)
    rows[:, np.diag(gram) <= 0] = 0.0  # inputs that are 0 on every row stay exactly 0
    targets = (vectors[:, keep].T @ cross) / roots[:, None]  # (r, M)
    total = float(y_squares.sum())
    floor = max(total - float(np.square(targets).sum()), 0.0)
    n = stats.num_inputs
    return Compressed(x=rows[:, :n].astype(np.float32),
                      bias_column=rows[:, n].astype(np.float32) if fit_bias else None,
                      y=targets.astype(np.float32), floor=floor,
                      y_norm=float(np.sqrt(stats.y_squares.sum())))


def from_arrays(x, y) -> GramStats:
    """`GramStats` of in-memory rows, in chunks (float64 temporaries stay small)."""
    x, y = np.asarray(x), np.asarray(y)
    return GramStats.accumulate((x[i:i + _CHUNK], y[i:i + _CHUNK])
                                for i in range(0, max(len(x), 1), _CHUNK))


def row_misfit(x, y, kernel, bias, offset=None) -> float:
    """‖x·kernel + bias + offset − y‖²_F over the real rows, in chunks (the certificate)."""
    x, y = np.asarray(x), np.asarray(y)
    kernel = np.asarray(kernel, np.float32)
    shift = np.asarray(bias, np.float32) + (0 if offset is None else np.asarray(offset))
    total = 0.0
    for i in range(0, len(x), _CHUNK):
        z = x[i:i + _CHUNK].astype(np.float32) @ kernel + shift
        total += float(np.square((z - y[i:i + _CHUNK]).astype(np.float64)).sum())
    return total
