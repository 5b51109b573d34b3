"""Orthogonal rotation matrices for QuaRot R1: deterministic normalized Hadamard matrices.

A Hadamard matrix of order n exists for n = m * 2^k when m = 1 (Sylvester, scipy.linalg.hadamard)
or when m has a Paley construction from a prime q: Paley I gives m = q + 1 for q = 3 mod 4
(12, 20, 24, 32, 44, 48, 60, ...), Paley II gives m = 2(q + 1) for q = 1 mod 4 (12, 28, 36, 60, ...).
The matrix is then kron(H_m, H_2^k). Examples: 576 = 36 * 16, 896 = 28 * 32, 1536 = 12 * 128,
3072 = 12 * 256. Only prime q are used (prime powers need finite-field arithmetic); sizes with
no construction here fall back to a seeded random orthogonal matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.stats import ortho_group


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=np.float64)
    index = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[index]


def _paley_one(q: int) -> np.ndarray:
    jac = _jacobsthal(q)
    skew = np.zeros((q + 1, q + 1))
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jac
    return np.eye(q + 1) + skew


def _paley_two(q: int) -> np.ndarray:
    jac = _jacobsthal(q)
    conference = np.zeros((q + 1, q + 1))
    conference[0, 1:] = 1
    conference[1:, 0] = 1
    conference[1:, 1:] = jac
    return np.kron(conference, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(q + 1), np.array([[1, 1], [1, -1]]))


def _paley(m: int) -> np.ndarray | None:
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley_one(m - 1)
    if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley_two(m // 2 - 1)
    return None


def hadamard_factors(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(A, B) with A ⊗ B a ±1 Hadamard matrix of order n: A a Paley matrix (or [[1]]) and B the
    Sylvester matrix of the largest power of two that leaves a Paley order; None when no
    construction here reaches n."""
    if n < 1:
        return None
    power = n & -n  # largest power of two dividing n
    while power >= 1:
        m = n // power
        base = np.ones((1, 1)) if m == 1 else _paley(m)
        if base is not None:
            return base.astype(np.float64), scipy.linalg.hadamard(power).astype(np.float64)
        power //= 2
    return None


def hadamard_matrix(n: int) -> np.ndarray | None:
    """A ±1 matrix H with H Hᵀ = n I, or None when no construction here reaches n."""
    factors = hadamard_factors(n)
    return None if factors is None else np.kron(*factors)


@dataclass(frozen=True)
class Rotation:
    matrix: np.ndarray  # float64, orthogonal
    kind: str  # "hadamard", "random-hadamard", or "random-orthogonal"


def rotation_matrix(n: int, random_signs: bool = False, seed: int = 0) -> Rotation:
    """Normalized Hadamard of order n (optionally times a seeded random ±1 diagonal).

    Without a Hadamard construction for n, a seeded random orthogonal matrix, with a warning.
    """
    hadamard = hadamard_matrix(n)
    if hadamard is None:
        warnings.warn(f"no Hadamard matrix of order {n} is known here; using a seeded random orthogonal matrix",
                      stacklevel=2)
        return Rotation(ortho_group.rvs(n, random_state=np.random.default_rng(seed)), "random-orthogonal")
    matrix = hadamard / np.sqrt(n)
    if random_signs:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
        return Rotation(signs[:, None] * matrix, "random-hadamard")
    return Rotation(matrix, "hadamard")
