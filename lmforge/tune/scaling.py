"""How held-out loss falls with model size and training tokens: the fit behind ``lmforge plan``.

The form is Chinchilla's (Hoffmann et al. 2022), ``L(N, D) = E + A / N**a + B / D**b``: an
irreducible loss ``E``, a term that shrinks with the parameters ``N`` and one that shrinks with the
tokens ``D`` trained on. It is fitted, as they did, by minimising a Huber loss of ``log L_pred - log
L_obs`` with L-BFGS-B (scipy), on the bits per byte measured by short probe runs; the starting
points come from a grid of the exponents ``a, b``, for each of which the loss is linear in ``E, A, B``
(non-negative least squares). Tokens seen more than once count for less than fresh ones: ``D`` is the effective data
of Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models"), ``U + U R* (1 - exp(-R / R*))``
with ``U`` unique tokens, ``R = D / U - 1`` repeats and ``R*`` (:data:`REPEAT_HALF_LIFE`), so a long
budget on a small corpus is not promised what a fresh corpus would give. :func:`parse_budget` reads ``--budget`` (a
number with a unit: ``90s``, ``5m``, ``2h``)::

    fit = fit_loss(points)             # points: [(N, D, bits_per_byte), ...]
    fit.predict(1.3e6, 2.4e6)          # bits per byte of a 1.3 M-parameter model after 2.4 M tokens

The additive form gives every size the same curve in tokens, so short probes cannot show a small model's
gains running out sooner than a large one's. A shape measured at three or more lengths also gets its own
curve, ``L(D) = E + B / D**b`` with its own ``E`` and ``b`` (:func:`fit_shape_curve`), which can::

    curve = fit_shape_curve([(4e5, 2.35), (1.1e6, 2.17), (1.8e6, 2.12)], min_e=BPB_FLOOR)
    curve.predict(1.2e7)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from lmforge.config import ConfigError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# R*, how fast repeated tokens lose their value. Muennighoff et al. fitted 15.4 for models of 10 M parameters and up
# on C4. Measured here it is far smaller: on the embedded corpus (held-out plays), the own curves of 64 x 2 and
# 128 x 4 fitted on runs of under one epoch meet their 5- and 20-minute runs (7.2 and 9.2 epochs: 2.039 and 1.884
# bits per byte) at R* = 2.2 and 2.3; with 15.4 they promised 0.05 and 0.11 too much (docs/speedrun.md).
REPEAT_HALF_LIFE = 2.3
HUBER_DELTA = 1e-3  # Chinchilla's: the fit follows the bulk of the points, not one noisy probe


def parse_budget(text: str | None) -> float:
    """``--budget`` in seconds: a positive number followed by s, m or h; anything else is an error naming it."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*", str(text or ""))
    if text is None or match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"--budget: expected a time with its unit, such as 90s, 5m or 2h (got {text!r}); "
                          f"the unit is required")
    return float(match.group(1)) * UNITS[match.group(2)]


def effective_tokens(tokens: float, unique: float | None) -> float:
    """Tokens trained on, with repeats of a ``unique``-token corpus discounted (None: never repeated)."""
    if not unique or tokens <= unique:
        return tokens
    repeats = tokens / unique - 1
    return unique + unique * REPEAT_HALF_LIFE * (1 - math.exp(-repeats / REPEAT_HALF_LIFE))


@dataclass
class LossFit:
    """``L(N, D) = E + A / N**a + B / D**b`` and how well it matched the points it was fitted on."""

    E: float
    A: float
    a: float
    B: float
    b: float
    rms_error: float = 0.0  # root mean square of (predicted - observed), in the points' unit
    points: int = 0

    def predict(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.a + self.B / d**self.b

    def as_dict(self) -> dict:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               weight: np.ndarray) -> tuple[float, np.ndarray]:
    """The weighted Huber loss of the log residuals and its gradient in ``theta = (log E, log A, a, log B, b)``."""
    e, log_a, a, log_b, b = theta
    terms = np.stack([np.full_like(log_n, e), log_a - a * log_n, log_b - b * log_d])
    pred = np.logaddexp.reduce(terms, axis=0)  # log(E + A/N^a + B/D^b), stable at any scale
    w = np.exp(terms - pred)  # each term's share of the prediction: d pred / d term
    r = pred - log_l
    small = np.abs(r) <= HUBER_DELTA
    value = np.sum(weight * np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)))
    psi = weight * np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array([psi @ w[0], psi @ w[1], -(psi * w[1]) @ log_n, psi @ w[2], -(psi * w[2]) @ log_d])
    return float(value), grad


def _grid_starts(n: np.ndarray, d: np.ndarray, loss: np.ndarray, weight: np.ndarray, keep: int) -> list[np.ndarray]:
    """Starting points for the fit: for each pair of exponents on a grid the loss is linear in (E, A, B), solved
    by non-negative least squares; the ``keep`` pairs that fit best, as ``(log E, log A, a, log B, b)``."""
    from scipy.optimize import nnls

    found = []
    tiny = 1e-6 * float(loss.min())  # a zero term is a very small one in log space
    root = np.sqrt(weight)  # weighted least squares: each row scaled by the square root of its weight
    for a, b in itertools.product(EXPONENTS, EXPONENTS):
        design = np.stack([np.ones_like(n), n**-a, d**-b], axis=1)
        coef, residual = nnls(design * root[:, None], loss * root)
        e, big_a, big_b = np.maximum(coef, tiny)
        found.append((residual, [math.log(e), math.log(big_a), a, math.log(big_b), b]))
    found.sort(key=lambda item: item[0])
    return [np.array(x) for _, x in found[:keep]]


def _refine(args: tuple, bounds: list, starts: list[np.ndarray]):
    """The best of L-BFGS-B runs from ``starts`` on the Huber objective."""
    from scipy.optimize import minimize

    best = None
    for start in starts:
        start = np.clip(start, [lo for lo, _ in bounds], [hi for _, hi in bounds])
        r = minimize(_objective, start, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                     options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 3000})  # the objective is tiny near the fit
        if best is None or r.fun < best.fun:
            best = r
    return best


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS on one thread for the fit: its problems are 5 x 5, and on a busy machine BLAS's own threads made
    each iteration wait (5-7 s a fit measured here, against 0.5 s on one thread)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# a and b stay in [0.1, 1.0]: published fits of this form find 0.25-0.5 (Hoffmann et al. 2022; Besiroglu et al.
# 2024's replication), and a few short probes can otherwise explain everything by one term with an exponent
# near 0 or above 1, which extrapolated 10x in tokens ranks model sizes by an artefact.
EXPONENT_BOUNDS = (0.1, 1.0)
# Bits per byte of English text no model here can go below: the best entries of Mahoney's Large Text Compression
# Benchmark store enwik9 (English Wikipedia) in about 10.7% of its size, 0.86 bits per byte. Probes of a few seconds cannot tell E from the data term,
# and a fit left free drove E to 0, which extrapolated every gain from more tokens on for ever.
BPB_FLOOR = 0.8
EXPONENTS = np.linspace(*EXPONENT_BOUNDS, 30)  # the grid of a and b that the starting points come from
STARTS = 4  # the best grid points refined by L-BFGS-B


def fit_loss(points: list[tuple[float, float, float]], weights: list[float] | None = None,
             min_e: float = 0.0) -> LossFit:
    """Fit :class:`LossFit` to ``(N, D, loss)`` points (at least 5, loss > 0): a grid of exponents solved
    linearly for starting points, the best few refined on the Huber loss of the log residuals, each point's
    loss times its weight (default 1: ``lmforge plan`` weighs the points nearest the budget's tokens most).
    ``min_e``: the least irreducible loss the fit may claim (``lmforge plan``: :data:`BPB_FLOOR`)."""
    try:
        import scipy.optimize  # noqa: F401 - the fit's optimizers, checked before any work
    except ImportError:
        raise ConfigError("lmforge plan needs scipy: pip install 'lmforge[plan]'") from None

    if len(points) < 5:
        raise ConfigError(f"plan: {len(points)} probe results are too few to fit L(N, D) (5 or more needed)")
    n, d, loss = (np.array(col, dtype=float) for col in zip(*points, strict=True))
    weight = np.ones_like(n) if weights is None else np.asarray(weights, dtype=float) / np.mean(weights)
    args = (np.log(n), np.log(d), np.log(loss), weight)
    floor = math.log(float(loss.min()))  # E (as log E) may not exceed the best loss seen
    lowest = min(math.log(min_e), floor - 1e-3) if min_e > 0 else floor - 15
    bounds = [(lowest, floor), (-15, 40), EXPONENT_BOUNDS, (-15, 40), EXPONENT_BOUNDS]
    with _one_blas_thread():
        best = _refine(args, bounds, _grid_starts(n, d, loss, weight, STARTS))
    e, log_a, a, log_b, b = best.x
    fit = LossFit(math.exp(e), math.exp(log_a), float(a), math.exp(log_b), float(b), points=len(points))
    fit.rms_error = float(np.sqrt(np.mean([(fit.predict(ni, di) - li) ** 2 for ni, di, li in points])))
    return fit


@dataclass
class ShapeCurve:
    """One model shape's own ``L(D) = E + B / (D / 1e6)**b``, fitted on that shape's runs alone."""

    E: float
    B: float
    b: float
    points: int = 0

    def predict(self, d: float) -> float:
        return self.E + self.B * (d / 1e6) ** -self.b

    def as_dict(self) -> dict:
        return asdict(self)


def fit_shape_curve(points: list[tuple[float, float]], min_e: float = BPB_FLOOR) -> ShapeCurve:
    """Fit :class:`ShapeCurve` to one shape's ``(D, loss)`` points (3 or more distinct D): least squares of the
    log residuals, ``E`` between ``min_e`` and the best loss seen, ``b`` within :data:`EXPONENT_BOUNDS`."""
    from scipy.optimize import least_squares

    if len({d for d, _ in points}) < 3:
        raise ConfigError(f"plan: a shape's own curve needs 3 or more lengths ({len(points)} given)")
    d, loss = (np.array(col, dtype=float) for col in zip(*points, strict=True))
    x, log_l = np.log(d / 1e6), np.log(loss)
    top = float(loss.min()) - 1e-4
    low = min(min_e, top - 1e-4)

    def residual(theta: np.ndarray) -> np.ndarray:
        e, log_b, b = theta
        return np.log(e + np.exp(log_b - b * x)) - log_l

    lower, upper = [low, -15.0, EXPONENT_BOUNDS[0]], [top, 5.0, EXPONENT_BOUNDS[1]]
    best = None
    for b0 in (0.15, 0.4, 0.8):  # a few starts: with three points the problem has shallow valleys
        start = [low + 0.5 * (top - low), math.log(max(1e-3, float(loss.max()) - low)), b0]
        r = least_squares(residual, start, bounds=(lower, upper), xtol=1e-12, ftol=1e-12)
        if best is None or r.cost < best.cost:
            best = r
    e, log_b, b = best.x
    return ShapeCurve(float(e), math.exp(log_b), float(b), points=len(points))
