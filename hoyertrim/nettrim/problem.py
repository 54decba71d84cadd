"""One layer's Net-Trim problem: its signals, their validation, and the normalized form solved.

For a layer with inputs ``x`` (P × N), target outputs ``y`` (P × M) and pre-activation
``z = x·kernel [+ bias] + offset``, the program certified is

    ‖act(z) − y‖_F ≤ ε‖y‖_F,     act = relu (the ReLU program) or identity (the linear program),

with, for the ReLU program, the inactive entries Ωᶜ = {y = 0} kept below ``v`` (0 in the
parallel scheme, the trained weights' pre-activation on the pruned inputs in the cascade one)
through a squared hinge. ``offset`` is a fixed per-unit term (a folded batch-norm shift on a layer
without bias); ``support`` (N × M, True = may be nonzero) restricts the kernel's pattern (grouped
convolutions, N:M or a given sparsity pattern).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hoyertrim.nettrim import gram as gram_lib
from hoyertrim.nettrim.gram import GramStats


@dataclasses.dataclass
class LayerSolution:
    """Result of pruning one layer.

    Attributes:
      kernel: (N, M) pruned weights; exact zeros where pruned.
      bias: (M,) bias (zeros when the layer has none).
      discrepancy: achieved ‖act(x·kernel + bias + offset) − y‖_F / ‖y‖_F on the given samples.
      epsilon: the bound this solution is certified for (the requested ε, or in kept-fraction
        mode the achieved discrepancy rounded up).
      feasible: whether ``discrepancy ≤ epsilon``.
      lam: the shared ℓ1 multiplier that was selected (units of the normalized problem).
      iterations: FISTA iterations on the full data, summed over the λ search.
      converged: whether the relative duality gap at the returned λ is within the solver's
        ``gap_tol`` (the weights' objective is provably that close to the optimum's).
      inactive_violation: ‖relu(z − v)_{Ωᶜ}‖_F / ‖y‖_F (0 when the inactive constraint holds).
      kept_fraction: nonzero fraction of the kernel entries allowed by ``support``.
      solves: number of (warm-started) full-size solves the λ search made.
      seconds: wall time.
      presolve_iterations: iterations spent on the subsampled presolves.
      lam_path: the full-size solves of the λ search in the order made, each
        ``{"lam", "discrepancy", "kept_fraction"}``.
      refit: with ``SolverOptions(refit=True)``: ``{"discrepancy_before", "iterations", "used"}``.
      polish: with ``SolverOptions(polish=k)``: ``{"kept_before", "discrepancy_before",
        "iterations", "removed"}`` (weights removed per round).
    """

    kernel: np.ndarray
    bias: np.ndarray
    discrepancy: float
    epsilon: float
    feasible: bool
    lam: float
    iterations: int
    converged: bool
    inactive_violation: float
    kept_fraction: float
    solves: int = 0
    seconds: float = 0.0
    presolve_iterations: int = 0
    duality_gap: float | None = None
    lam_path: tuple = ()
    refit: dict | None = None
    polish: dict | None = None

    def summary(self) -> dict:
        """The scalar fields, JSON-ready."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("kernel", "bias")}


@dataclasses.dataclass
class LayerData:
    """Validated float32 signals of one layer.

    Attributes:
      x: (P, N) inputs.  y: (P, M) targets.  v: (P, M) inactive-set bound.
      active: (P, M) entries held to equality (y > 0 for the ReLU program, all for the linear).
      offset: (M,) fixed term added to the pre-activation.
      fit_bias: whether a bias is solved for (a ones column is appended to ``x``).
      support: (N, M) kernel entries that may be nonzero.
      relu: which program.
      bias_column: (P,) the column that multiplies the bias (None: ones). A compressed linear
        program (`gram.compress`) has its own.
      floor: misfit the rows do not carry (the compressed form's `gram.Compressed.floor`),
        added to every measured error.
      norm: ‖y‖_F of the real rows when ``y`` are compressed targets (None: ``y``'s own).
    """

    x: np.ndarray
    y: np.ndarray
    v: np.ndarray
    active: np.ndarray
    offset: np.ndarray
    fit_bias: bool
    support: np.ndarray
    relu: bool
    bias_column: np.ndarray | None = None
    floor: float = 0.0
    norm: float | None = None

    @property
    def compressed(self) -> bool:
        """Whether the rows are the Gram form's (`gram.compress`), not samples."""
        return self.norm is not None

    @property
    def design(self) -> np.ndarray:
        """(P, N [+1]) inputs with the bias's column (ones for real rows)."""
        if not self.fit_bias:
            return self.x
        column = np.ones(self.x.shape[0], np.float32) if self.bias_column is None \
            else self.bias_column
        return np.concatenate([self.x, column[:, None]], axis=1)

    @property
    def y_norm(self) -> float:
        return self.norm if self.norm is not None else float(np.linalg.norm(self.y))

    def rows(self, rows: np.ndarray) -> "LayerData":
        """The same layer on a subset of its samples."""
        if self.compressed:
            raise ValueError("A compressed (Gram form) layer has no samples to subsample.")
        return dataclasses.replace(self, x=self.x[rows], y=self.y[rows], v=self.v[rows],
                                   active=self.active[rows])


def layer_data(x, y, *, v=None, relu: bool = True, fit_bias: bool = True, offset=None,
               support=None, gram: GramStats | None = None, form: str = "auto") -> LayerData:
    """Checks the signals of one layer and returns them as float32 `LayerData`.

    The linear program (``relu=False``) is put in Gram form (`gram.compress`: at most N + 1
    rows, the same misfit) when ``form="gram"``, when ``gram`` statistics are given instead of
    ``x`` and ``y``, or with ``form="auto"`` when P > 2(N + 1); ``form="rows"`` keeps the rows.
    """
    if form not in ("auto", "gram", "rows"):
        raise ValueError(f"form must be 'auto', 'gram' or 'rows', got {form!r}.")
    if gram is not None or (not relu and form == "gram") or (
            not relu and form == "auto" and np.ndim(x) == 2
            and np.shape(x)[0] > 2 * (np.shape(x)[1] + 1)):
        return _gram_layer_data(x, y, v=v, relu=relu, fit_bias=fit_bias, offset=offset,
                                support=support, stats=gram)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x must be (P, N) and y (P, M); got shapes {x.shape} and {y.shape}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples P; got {x.shape[0]} "
                         f"and {y.shape[0]}.")
    if v is not None and np.shape(v) != y.shape:
        raise ValueError(f"v must have y's shape {y.shape}, got {np.shape(v)}.")
    offset = np.zeros(y.shape[1], np.float32) if offset is None else np.asarray(offset, np.float32)
    if offset.shape != (y.shape[1],):
        raise ValueError(f"offset must have shape ({y.shape[1]},), got {offset.shape}.")
    if support is None:
        support = np.ones((x.shape[1], y.shape[1]), bool)
    support = np.asarray(support, bool)
    if support.shape != (x.shape[1], y.shape[1]):
        raise ValueError(f"support must have the kernel's shape {(x.shape[1], y.shape[1])}, "
                         f"got {support.shape}.")
    for name, a in (("x", x), ("y", y), ("v", v), ("offset", offset)):
        if a is not None and not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf values; clean the layer's signals first.")
    if not np.any(y != 0):
        raise ValueError("y has no active (nonzero) outputs: the layer is dead on these samples, "
                         "so there is nothing to preserve. Use more or other samples, or drop "
                         "the layer.")
    y = y.astype(np.float32)
    v = np.zeros_like(y) if v is None else np.asarray(v, np.float32)
    active = (y > 0) if relu else np.ones(y.shape, bool)
    return LayerData(x=x.astype(np.float32), y=y, v=v, active=active, offset=offset,
                     fit_bias=fit_bias, support=support, relu=relu)


def _gram_layer_data(x, y, *, v, relu, fit_bias, offset, support, stats) -> LayerData:
    if relu:
        raise ValueError("The ReLU program needs the layer's rows (its active set is per row); "
                         "Gram statistics serve the linear program only (relu=False).")
    if v is not None:
        raise ValueError("v (the inactive-set bound) belongs to the ReLU program; the linear "
                         "program has none.")
    if stats is None:
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x must be (P, N) and y (P, M) with the same P; got shapes "
                             f"{x.shape} and {y.shape}.")
        stats = gram_lib.from_arrays(x, y)
    n, m = stats.num_inputs, stats.num_outputs
    offset = np.zeros(m, np.float32) if offset is None else np.asarray(offset, np.float32)
    if offset.shape != (m,) or not np.all(np.isfinite(offset)):
        raise ValueError(f"offset must be a finite ({m},) vector, got shape {offset.shape}.")
    support = np.ones((n, m), bool) if support is None else np.asarray(support, bool)
    if support.shape != (n, m):
        raise ValueError(f"support must have the kernel's shape {(n, m)}, got {support.shape}.")
    compressed = gram_lib.compress(stats, fit_bias=fit_bias, offset=offset)
    if compressed.y_norm == 0:
        raise ValueError("y is zero on every sample: there is nothing to preserve. Use more or "
                         "other samples, or drop the layer.")
    rows = compressed.y.shape[0]
    return LayerData(x=compressed.x, y=compressed.y, v=np.zeros_like(compressed.y),
                     active=np.ones((rows, m), bool), offset=np.zeros(m, np.float32),
                     fit_bias=fit_bias, support=support, relu=False,
                     bias_column=compressed.bias_column, floor=compressed.floor,
                     norm=compressed.y_norm)


def residual(z, y, v, active):
    """Active entries: z − y; inactive: the hinge relu(z − v). Its square is the smooth loss."""
    return jnp.where(active, z - y, jax.nn.relu(z - v))


@jax.jit
def _measure(design, u, offset, y, v, active, relu):
    z = design @ u + offset
    out = jnp.where(relu, jax.nn.relu(z), z)
    error = jnp.sum(jnp.square(out - y))
    violation = jnp.sum(jnp.square(jnp.where(active, 0.0, jax.nn.relu(z - v))))
    return error, violation


def measure(data: LayerData, u_real, device_data=None) -> tuple[float, float]:
    """‖act(z) − y‖_F and ‖relu(z − v)_{Ωᶜ}‖_F of the real weights ``u_real`` (N [+1], M).

    This is the certificate: it is evaluated on the returned weights, whatever the solver did.
    """
    design, y, v, active = device_data or (data.design, data.y, data.v, data.active)
    error, violation = _measure(design, jnp.asarray(u_real), jnp.asarray(data.offset), y, v,
                                active, data.relu)
    return math.sqrt(float(error) + data.floor), math.sqrt(float(violation))


def _neuron_sharding(num_neurons: int):
    """A 1-D mesh over this process's devices for the neuron axis, or None on one device.
    (With several processes each solves the same layer on its own devices: the solves need
    no communication, and every process ends with the same weights.)"""
    devices = jax.local_devices()
    if len(devices) == 1:
        return None, num_neurons
    mesh = Mesh(np.array(devices), ("neurons",))
    padded = -(-num_neurons // len(devices)) * len(devices)
    return mesh, padded


class NormalizedLayer:
    """One layer's problem, normalized and on the device, solvable at any λ.

    Normalization makes λ and tol scale-free (‖Y‖_F → √M) and preconditions: each input column
    is scaled by s_i (Jacobi, then ‖X diag(s)‖₂ = 1 so FISTA's step 1 is exact). Solving for
    ũ = u / s with ℓ1 weights λ·s_i is the same problem, far better conditioned on image data
    whose pixel columns differ in norm by orders of magnitude. Entries outside ``support`` get an
    infinite ℓ1 weight, so the prox keeps them at exactly 0.
    """

    def __init__(self, data: LayerData, *, shard: bool, init_kernel=None, init_bias=None):
        self.data = data
        self.num_inputs, self.num_neurons = data.x.shape[1], data.y.shape[1]
        self.y_norm = data.y_norm
        self.y_scale = self.y_norm / math.sqrt(self.num_neurons)
        design = data.design
        # Inputs that are zero on every sample (e.g. MNIST's border pixels) cannot affect the
        # outputs, so their weights are 0 at the optimum: solve without those columns.
        self.live = np.flatnonzero(np.any(design != 0, axis=0))
        design_live = design[:, self.live]
        gram = design_live.T.astype(np.float64) @ design_live
        inverse_norms = 1.0 / np.sqrt(np.diag(gram))
        lipschitz = float(np.linalg.eigvalsh(gram * np.outer(inverse_norms, inverse_norms)).max())
        self.column_scale = (inverse_norms / math.sqrt(lipschitz)).astype(np.float32)
        design_n = jnp.asarray(design_live * self.column_scale)

        self.mesh, padded = _neuron_sharding(self.num_neurons) if shard else (None,
                                                                              self.num_neurons)
        pad = padded - self.num_neurons

        def prepare(a, fill=0):
            a = np.pad(a, ((0, 0), (0, pad)), constant_values=fill) if pad else a
            if self.mesh is None:
                return jnp.asarray(a)
            return jax.device_put(a, NamedSharding(self.mesh, PartitionSpec(None, "neurons")))

        support = self._rows_with_bias(data.support, True)[self.live]
        self.support = support
        shifted = data.offset[None, :]
        self.y_d = prepare((data.y - shifted) / self.y_scale)
        self.v_d = prepare((data.v - shifted) / self.y_scale)
        self.active_d = prepare(data.active, False)
        if self.mesh is not None:
            design_n = jax.device_put(design_n, NamedSharding(self.mesh, PartitionSpec()))
        self.design_n = design_n
        self.start = prepare(self.to_normalized(init_kernel, init_bias))
        # ℓ1 weight per entry: Jacobi scale where allowed, ∞ outside the support; the bias row
        # (always live and last) is not penalized.
        weights = np.where(support, self.column_scale[:, None], np.inf).astype(np.float32)
        if data.fit_bias:
            weights[-1] = 0.0
        self.penalty_weights = prepare(weights, np.inf)
        # λ that makes u = 0 optimal for every neuron: the largest allowed gradient entry at 0.
        grad0 = np.asarray(design_n.T @ np.asarray(
            residual(jnp.zeros_like(self.y_d), self.y_d, self.v_d, self.active_d)))
        grad0 = grad0[:, :self.num_neurons]
        penalized = support & (weights > 0)
        ratio = np.abs(grad0) / self.column_scale[:, None]
        self.lam_max = float(np.max(ratio, where=penalized, initial=0.0)) or 1.0
        self.abs_tol = float(np.abs(grad0).max())  # the solver's tol is relative to this
        # The signals the certificate is measured on, moved to the device once.
        self.device_data = tuple(jnp.asarray(a) for a in (design, data.y, data.v, data.active))

    def _rows_with_bias(self, a, fill):
        if not self.data.fit_bias:
            return a
        return np.concatenate([a, np.full((1, a.shape[1]), fill, a.dtype)], axis=0)

    def to_normalized(self, kernel, bias):
        """(N, M) real kernel and (M,) bias → the solver's variables (zero outside support)."""
        u = np.zeros((self.num_inputs + self.data.fit_bias, self.num_neurons), np.float32)
        if kernel is not None:
            u[:self.num_inputs] = np.asarray(kernel) * self.data.support
            if bias is not None and self.data.fit_bias:
                u[self.num_inputs] = np.asarray(bias)
        return (u[self.live] / (self.y_scale * self.column_scale[:, None])).astype(np.float32)

    def to_real(self, u):
        """The solver's variables → (N [+1], M) real weights; dead inputs get exact zeros."""
        real = np.zeros((self.num_inputs + self.data.fit_bias, self.num_neurons), np.float32)
        real[self.live] = (np.asarray(u)[:, :self.num_neurons] * self.column_scale[:, None]
                           * self.y_scale)
        return real

    def kept_fraction(self, u_real) -> float:
        """Nonzero fraction of the kernel entries ``support`` allows, of (N [+1], M) real weights."""
        kernel, _ = self.split(u_real)
        return np.count_nonzero(kernel) / max(int(self.data.support.sum()), 1)

    def split(self, u_real):
        """(N [+1], M) real weights → kernel (N, M) and bias (M,)."""
        if self.data.fit_bias:
            return u_real[:-1], u_real[-1]
        return u_real, np.zeros(self.num_neurons, np.float32)
