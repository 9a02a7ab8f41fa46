"""Sparse non-negative dictionary learning with two atoms: the stain-matrix estimate of Vahadane et al.

Vahadane et al. (2016), "Structure-preserving color normalization and sparse stain separation for
histological images", model the optical densities ``X`` (one row per pixel) as ``X ~ A D`` with a
non-negative stain matrix ``D`` (2 rows of unit length, one per stain) and non-negative, sparse
concentrations ``A``::

    minimize   0.5 ||X - A D||^2 + lambda ||A||_1    subject to  A >= 0,  D >= 0,  ||D_k|| = 1

StainTools solves it with SPAMS' ``trainDL``, tiatoolbox with scikit-learn's ``DictionaryLearning``. Both
code every pixel with a general-purpose lasso solver (scikit-learn: one coordinate-descent call per
pixel, about 25 microseconds each). With two atoms the lasso of one pixel has a closed form (one of four
active sets satisfies the optimality conditions), so here both half-steps of the alternating
minimization are a handful of vectorized numpy operations over all pixels:

* **codes** (:func:`sparse_codes`): the exact minimizer over ``A >= 0`` for fixed ``D``;
* **dictionary**: one pass of block coordinate descent over the two atoms (as scikit-learn's
  ``_update_dict`` and Mairal et al. 2010), each the exact minimizer on the non-negative part of the
  unit sphere for fixed codes and the other atom: ``d_k = max(v, 0) / ||max(v, 0)||`` with
  ``v = (A^T X)_k - (A^T A)_kj d_j``.

Every step lowers the objective, which is bounded below; iteration stops when no component of ``D``
moves more than ``tol``. Nothing is random: the start is a fixed dictionary (the caller's).
"""

from __future__ import annotations

import numpy as np

__all__ = ["sparse_codes", "objective", "learn_dictionary"]

#: Atoms whose cosine exceeds this are treated as parallel (the two-atom system is singular).
_PARALLEL = 1.0 - 1e-9


def sparse_codes(x: np.ndarray, d: np.ndarray, lam: float) -> np.ndarray:
    """The exact ``argmin_{a >= 0} 0.5 ||x - a d||^2 + lam (a_1 + a_2)`` of every pixel of ``x``.

    Parameters
    ----------
    x : ndarray, shape (n, 3)
        Optical densities, one pixel per row.
    d : ndarray, shape (2, 3)
        Non-negative unit atoms (rows).
    lam : float
        The l1 weight.

    Returns
    -------
    ndarray, shape (n, 2)

    Notes
    -----
    With unit atoms and ``g = d_1 . d_2`` in ``[0, 1)``, let ``b = x d^T - lam``. If both codes are
    positive they are the solution of ``[[1, g], [g, 1]] a = b``; when that gives ``a_2 <= 0`` the
    solution is ``(max(b_1, 0), 0)``, when it gives ``a_1 <= 0`` it is ``(0, max(b_2, 0))`` (both
    non-positive only when ``b <= 0``: no stain). Parallel atoms (``g`` about 1) code every pixel on the
    first one.
    """
    c1, c2 = _codes(_columns(x), d, lam)
    return np.stack([c1, c2], axis=1)


def _columns(x: np.ndarray) -> np.ndarray:
    """``(n, 3)`` pixels -> ``(3, n)`` C-contiguous float64: each channel contiguous."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"expected optical densities of shape (n, 3), got {x.shape}")
    return np.ascontiguousarray(x.T)


def _project(xt: np.ndarray, v: np.ndarray) -> np.ndarray:
    # x @ v without BLAS: a threaded BLAS is slow on tall-skinny products on a busy machine, and this
    # sums in a fixed order (bit-for-bit reproducible)
    return v[0] * xt[0] + v[1] * xt[1] + v[2] * xt[2]


def _codes(xt: np.ndarray, d: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    b1 = _project(xt, d[0]) - lam
    b2 = _project(xt, d[1]) - lam
    g = float(d[0] @ d[1])
    if g >= _PARALLEL:
        return np.maximum(b1, 0.0), np.zeros_like(b1)
    det = 1.0 - g * g
    a1 = (b1 - g * b2) / det
    a2 = (b2 - g * b1) / det
    both = (a1 > 0) & (a2 > 0)
    c1 = np.where(both, a1, np.where(a2 <= 0, np.maximum(b1, 0.0), 0.0))
    c2 = np.where(both, a2, np.where(a1 <= 0, np.maximum(b2, 0.0), 0.0))
    return c1, c2


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.einsum("i,i->", a, b))  # no BLAS (see _project)


def objective(x: np.ndarray, d: np.ndarray, lam: float) -> float:
    """``(0.5 ||x - A d||^2 + lam ||A||_1) / n`` at the exact codes ``A`` of ``x`` for ``d``."""
    xt = _columns(x)
    c1, c2 = _codes(xt, d, lam)
    residual = sum(((xt[i] - c1 * d[0, i] - c2 * d[1, i]) ** 2).sum() for i in range(3))
    return float((0.5 * residual + lam * (c1.sum() + c2.sum())) / xt.shape[1])


def learn_dictionary(
    x: np.ndarray, init: np.ndarray, lam: float = 0.1, tol: float = 1e-6, max_iter: int = 1000
) -> tuple[np.ndarray, np.ndarray, int]:
    """Alternating minimization of the Vahadane objective from the dictionary ``init``.

    Parameters
    ----------
    x : ndarray, shape (n, 3)
        Non-negative optical densities.
    init : ndarray, shape (2, 3)
        Starting atoms (non-negative, not both zero); normalized here.
    lam : float
        The l1 weight on the codes (Vahadane et al.: 0.1 for OD in natural-log units).
    tol : float
        Stop when no component of the (unit) atoms moves more than this in one iteration (1e-6 rad is
        0.00006 degrees).
    max_iter : int
        At most this many iterations.

    Returns
    -------
    d : ndarray, shape (2, 3)
        The learned unit atoms (rows), in the order of ``init``.
    codes : ndarray, shape (n, 2)
        The exact codes of ``x`` for ``d``.
    n_iter : int
        Iterations run.
    """
    xt = _columns(x)
    d = np.array(init, dtype=np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        c = _codes(xt, d, lam)
        ata = np.array([[_dot(c[i], c[j]) for j in (0, 1)] for i in (0, 1)])
        atx = np.array([[_dot(c[i], xt[j]) for j in range(3)] for i in (0, 1)])
        new = d.copy()
        for k in (0, 1):
            if ata[k, k] <= 0.0:  # an atom no pixel uses stays where it is
                continue
            v = np.maximum(atx[k] - ata[k, 1 - k] * new[1 - k], 0.0)
            norm = np.linalg.norm(v)
            if norm > 0.0:
                new[k] = v / norm
        moved = float(np.abs(new - d).max())
        d = new
        if moved < tol:
            break
    return d, np.stack(_codes(xt, d, lam), axis=1), n_iter
