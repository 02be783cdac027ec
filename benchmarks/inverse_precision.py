"""Accuracy of the chunk inverse ``T = (I + A)^-1`` under the GPU solve's dot precisions, by
emulation on the CPU (no device needed): the blocked algorithm of ``gpu_prep.solve`` (16 x 16
diagonal blocks by nilpotent doubling, off-diagonal blocks by block substitution) in numpy, with
the operands of each product rounded to TF32 (10 mantissa bits) where the mode says so.

Modes: ``ieee`` (all fp32, the fp32 path), ``x3+tf32`` (doubling at fp32 accuracy, as 3xTF32
gives, block products in TF32: the bf16 path) and ``tf32`` (everything TF32, not used: shown for
why the doubling is not). Keys are l2-normalised with a shared direction (mean cosine ``cos``
between two keys), beta ~ U(0.5, 1), log decays ~ -U(0, 0.05) per token; error = max |T - T64| /
max |T64| against the float64 inverse, worst of ``--trials`` chunks of 64.

    python benchmarks/inverse_precision.py [--trials 20]
"""

from __future__ import annotations

import argparse

import numpy as np

BLOCK = 16
MODES = {"ieee": ("fp32", "fp32"), "x3+tf32": ("fp32", "tf32"), "tf32": ("tf32", "tf32")}


def tf32(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to TF32's 10 mantissa bits (to nearest)."""
    bits = np.asarray(x, np.float32).copy().view(np.uint32)
    bits += 0x1000
    bits &= 0xFFFFE000
    return bits.view(np.float32)


def matmul(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """fp32 product; TF32 rounds both operands first (the accumulation stays fp32-exact here)."""
    if precision == "tf32":
        a, b = tf32(a), tf32(b)
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)


def diagonal_inverse(a: np.ndarray, precision: str) -> np.ndarray:
    """``(I - a)(I + a^2)(I + a^4)...`` of a strictly lower block."""
    n, x, power = -a, np.eye(a.shape[0], dtype=np.float32) - a, 2
    while power < a.shape[0]:
        n = matmul(n, n, precision)
        x = x + matmul(x, n, precision)
        power *= 2
    return x


def blocked_inverse(a: np.ndarray, powers: str, products: str) -> np.ndarray:
    """``(I + a)^-1`` by 16 x 16 blocks, as the GPU solve kernel computes it."""
    nb = a.shape[0] // BLOCK
    rows = [slice(i * BLOCK, (i + 1) * BLOCK) for i in range(nb)]
    part = {(i, j): a[rows[i], rows[j]] for i in range(nb) for j in range(nb)}
    inv = {}
    for i in range(nb):
        inv[i, i] = diagonal_inverse(part[i, i], powers)
        for j in range(i):
            acc = sum(matmul(part[i, m], inv[m, j], products) for m in range(j, i))
            inv[i, j] = -matmul(inv[i, i], acc, products)
    out = np.zeros_like(a)
    for (i, j), block in inv.items():
        out[rows[i], rows[j]] = block
    return out


def chunk_matrix(rng: np.random.Generator, cos: float, chunk: int = 64, dk: int = 128) -> np.ndarray:
    """``A = beta (k k^T) * D``, strictly lower, fp32, for keys of mean pairwise cosine ``cos``."""
    shared = rng.normal(size=dk)
    noise = rng.normal(size=(chunk, dk)) / np.sqrt(dk)
    k = np.sqrt(cos) * shared / np.linalg.norm(shared) + np.sqrt(1 - cos) * noise
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    beta = rng.uniform(0.5, 1.0, chunk)
    g = np.cumsum(-rng.uniform(0.0, 0.05, chunk))
    return np.tril(beta[:, None] * (k @ k.T) * np.exp(g[:, None] - g[None, :]), -1).astype(np.float32)


def worst_errors(cos: float, trials: int, seed: int = 0) -> dict[str, float]:
    """Worst relative error of each mode over ``trials`` random chunks."""
    rng, worst = np.random.default_rng(seed), dict.fromkeys(MODES, 0.0)
    for _ in range(trials):
        a = chunk_matrix(rng, cos)
        exact = np.linalg.inv(np.eye(a.shape[0]) + a.astype(np.float64))
        for mode, (powers, products) in MODES.items():
            err = np.abs(blocked_inverse(a, powers, products) - exact).max() / np.abs(exact).max()
            worst[mode] = max(worst[mode], float(err))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    print("key cosine  " + "  ".join(f"{mode:>8}" for mode in MODES) + "   (bf16 rounding: 3.9e-03)")
    for cos in (0.0, 0.5, 0.8):
        errors = worst_errors(cos, args.trials)
        print(f"{cos:>10}  " + "  ".join(f"{errors[mode]:8.1e}" for mode in MODES))


if __name__ == "__main__":
    main()
