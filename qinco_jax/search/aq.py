"""Additive-quantization (AQ) codebooks fitted by least squares to given codes.

The IVF-QINCo index stores QINCo codes but ranks them, at search time, with a cheap
additive decoder: x ≈ C_1[c_1] + ... + C_M[c_M] with fixed codebooks C_m (K x d). The
codebooks that best reproduce a training set for its (fixed) QINCo codes solve

    min_C || A C - X ||²      A: n x (M·K) one-hot matrix of the codes, X: n x d targets.

The reference builds A densely and calls `lstsq`; at n = 1M, M = 16, K = 256 that is a
16 GB matrix. A is never needed: the normal equations only involve

    G = AᵀA    (M·K)²: block (m1, m2) counts how often code c1 in column m1 occurs
               together with code c2 in column m2 (diagonal blocks are diagonal);
    B = AᵀX    (M·K) x d: per column m, the sum of the targets of the vectors with code c;

both accumulated in float64 over chunks of rows with `np.bincount`.

The system is singular: a constant can move from one codebook to another without
changing any reconstruction, and codewords that never occur are unconstrained. The
reference's `lstsq` returns the *minimum-norm* solution (numpy computes it in float64
and drops singular values of A below eps64 · max(n, M·K) · s_max). The singular values
of A are the square roots of G's eigenvalues, so the same solution is V diag(1/λ) Vᵀ B
over the eigenpairs of G that are not null. Squaring A loses half the digits: eigh
leaves the exact null space at |λ| ≲ eps64 · λ_max, so eigenvalues below
NULL_TOL · M·K · eps64 · λ_max count as null too. A genuine singular value of A that
small would be a codeword combination that no vector distinguishes; it does not happen
with real codes, and dropping it changes reconstructions by a negligible amount.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Rows per accumulation chunk: bounds the (chunk x d) int64 index temporaries (64 MB at d=128).
CHUNK_ROWS = 65536
# Eigenvalues of AᵀA below NULL_TOL · M·K · eps64 · λ_max are rounding noise of the null space.
NULL_TOL = 100.0


@dataclasses.dataclass
class NormalEquations:
    """AᵀA and AᵀX of the AQ least-squares problem, accumulated chunk by chunk so that
    training sets larger than memory can be streamed through `add`."""

    M: int
    K: int
    d: int
    gram: np.ndarray = dataclasses.field(init=False)  # (M*K, M*K) float64
    rhs: np.ndarray = dataclasses.field(init=False)  # (M*K, d) float64
    n: int = dataclasses.field(init=False, default=0)

    def __post_init__(self):
        self.gram = np.zeros((self.M * self.K, self.M * self.K), np.float64)
        self.rhs = np.zeros((self.M * self.K, self.d), np.float64)

    def add(self, x: np.ndarray, codes: np.ndarray) -> None:
        x, codes = _check(x, codes, self.K)
        if codes.shape[1] != self.M or x.shape[1] != self.d:
            raise ValueError(f"expected codes (n, {self.M}) and vectors (n, {self.d}), "
                             f"got {codes.shape} and {x.shape}")
        for i0 in range(0, len(x), CHUNK_ROWS):
            self._add_chunk(x[i0:i0 + CHUNK_ROWS], codes[i0:i0 + CHUNK_ROWS])
        self.n += len(x)

    def _add_chunk(self, x: np.ndarray, codes: np.ndarray) -> None:
        M, K, d = self.M, self.K, self.d
        codes = codes.astype(np.int64)
        x = np.asarray(x, np.float64)
        cols = np.arange(d)
        for m1 in range(M):
            c1 = codes[:, m1]
            counts = np.bincount(c1, minlength=K)
            block = slice(m1 * K, (m1 + 1) * K)
            self.gram[block, block][np.diag_indices(K)] += counts
            # Sum of the targets per code: one bincount over (code, dimension) pairs.
            flat = (c1[:, None] * d + cols).ravel()
            self.rhs[block] += np.bincount(flat, weights=x.ravel(), minlength=K * d).reshape(K, d)
            for m2 in range(m1 + 1, M):
                co = np.bincount(c1 * K + codes[:, m2], minlength=K * K).reshape(K, K)
                self.gram[block, m2 * K:(m2 + 1) * K] += co
                self.gram[m2 * K:(m2 + 1) * K, block] += co.T

    def solve(self, rcond: float | None = None) -> np.ndarray:
        """Minimum-norm least-squares codebooks (M, K, d) float32.

        rcond: singular values of A below rcond · s_max are treated as zero; None is
        numpy lstsq's default, eps64 · max(n, M·K), the reference's choice. Eigenvalues
        of AᵀA at the level of its rounding noise are treated as zero in any case."""
        if self.n == 0:
            raise ValueError("no training vectors to fit the AQ codebooks")
        eps = float(np.finfo(np.float64).eps)
        if rcond is None:
            rcond = eps * max(self.n, self.M * self.K)
        sol = _min_norm_solve(self.gram, self.rhs, max(rcond**2, NULL_TOL * self.M * self.K * eps))
        return sol.reshape(self.M, self.K, self.d).astype(np.float32)


def _min_norm_solve(gram: np.ndarray, rhs: np.ndarray, tol: float) -> np.ndarray:
    """G⁺ B through the eigendecomposition of G, dropping eigenvalues below tol · λ_max.

    Single-threaded BLAS: the matrix is at most a few thousand rows (0.2 s at 1024,
    ~10 s at 4096), and a multithreaded OpenBLAS eigh spins for 50x longer than that
    when the machine's cores are busy with other work."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        eigval, eigvec = np.linalg.eigh(gram)
        lam_max = eigval[-1]
        if not lam_max > 0:
            raise ValueError("the AQ least-squares system is empty")
        keep = eigval > tol * lam_max
        v = eigvec[:, keep]
        return v @ ((v.T @ rhs) / eigval[keep][:, None])


def _check(x: np.ndarray, codes: np.ndarray, K: int):
    x = np.asarray(x)
    codes = np.asarray(codes)
    if x.ndim != 2 or codes.ndim != 2 or len(x) != len(codes):
        raise ValueError(f"need vectors (n, d) and codes (n, M) with the same n, got {x.shape} and {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if len(codes) and (codes.min() < 0 or codes.max() >= K):
        raise ValueError(f"codes must lie in [0, {K}), got values in [{codes.min()}, {codes.max()}]")
    return x, codes


def fit_codebooks(x: np.ndarray, codes: np.ndarray, K: int = 256, rcond: float | None = None) -> np.ndarray:
    """AQ codebooks (M, K, d) float32 minimising ||sum_m C_m[codes[:, m]] - x||², the
    minimum-norm solution as the reference's `lstsq` computes it (see the module doc)."""
    x, codes = _check(x, codes, K)
    eq = NormalEquations(M=codes.shape[1], K=K, d=x.shape[1])
    eq.add(x, codes)
    return eq.solve(rcond)


def reconstruct(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """sum_m codebooks[m, codes[:, m]], accumulated in codebook order (float32 like
    the reference, so the norms stored in the index are the same numbers)."""
    codes = np.asarray(codes)
    M = codebooks.shape[0]
    if codes.ndim != 2 or codes.shape[1] != M:
        raise ValueError(f"codes have shape {codes.shape}, the {M} AQ codebooks need (n, {M})")
    out = codebooks[0][codes[:, 0]].copy()
    for m in range(1, M):
        out += codebooks[m][codes[:, m]]
    return out
