"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): a closed-form item-item baseline in numpy.

``B = argmin ||X - X B||^2 + lambda ||B||^2`` subject to ``diag(B) = 0`` has the solution
``P = (X^T X + lambda I)^-1``, ``B = -P / diag(P)`` (column-wise), ``diag(B) = 0``; a user's scores are ``x_u B``.
Memory and time grow with items^2 / items^3: fine to ~20k items.
"""

from __future__ import annotations

import numpy as np

from engine.errors import InvalidRequest


def interactions(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int,
                 values: np.ndarray | None = None) -> np.ndarray:
    """A dense (n_rows, n_cols) float matrix with ``values`` (default 1) at (rows, cols); repeats count once."""
    X = np.zeros((n_rows, n_cols), dtype=np.float64)
    X[rows, cols] = 1.0 if values is None else values
    return X


def fit(X: np.ndarray, lam: float = 500.0) -> np.ndarray:
    """The (items, items) weight matrix B for the user-item matrix X (rows users, columns items)."""
    if X.ndim != 2:
        raise InvalidRequest("X must be a 2-D user-item matrix")
    if not np.all(np.isfinite(X)):
        raise InvalidRequest("X has NaN or infinite values")
    return fit_gram(X.T @ X, lam)


def fit_gram(G: np.ndarray, lam: float = 500.0) -> np.ndarray:
    """B from the item-item Gram matrix ``G = X^T X`` (overwritten); lets a caller accumulate G in chunks."""
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise InvalidRequest("G must be a square item-item matrix")
    if lam <= 0:
        raise InvalidRequest(f"lambda must be positive, got {lam}")
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    B[np.diag_indices_from(B)] = 0.0
    return B


def top_neighbors(B: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item h (row of B), the ``n`` items c with the largest positive weight ``B[h, c]``, best first:
    (indices, weights), both (items, n); missing neighbours (fewer positive weights) are -1 / 0."""
    n = max(0, min(n, B.shape[0] - 1))
    if n == 0:
        return np.zeros((B.shape[0], 0), dtype=np.int64), np.zeros((B.shape[0], 0))
    part = np.argpartition(-B, n - 1, axis=1)[:, :n]
    w = np.take_along_axis(B, part, axis=1)
    order = np.argsort(-w, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    w = np.take_along_axis(w, order, axis=1)
    keep = w > 0
    return np.where(keep, idx, -1), np.where(keep, w, 0.0)


def scores(B: np.ndarray, X: np.ndarray) -> np.ndarray:
    return X @ B


def recommend(B: np.ndarray, X: np.ndarray, k: int, exclude: np.ndarray | None = None,
              chunk: int = 2048) -> np.ndarray:
    """(users, k) column indices of the best items per row of X, best first.

    ``exclude`` is a boolean matrix shaped like X (default: X > 0, the items a user already has).
    """
    if X.shape[1] != B.shape[0]:
        raise InvalidRequest(f"X has {X.shape[1]} item columns, B has {B.shape[0]}")
    k = min(k, B.shape[0])
    ex = X > 0 if exclude is None else exclude
    out = np.zeros((X.shape[0], k), dtype=np.int64)
    for lo in range(0, X.shape[0], chunk):
        s = X[lo:lo + chunk] @ B
        s[ex[lo:lo + chunk]] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        out[lo:lo + chunk] = np.take_along_axis(part, order, axis=1)
    return out
