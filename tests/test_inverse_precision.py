"""The CPU emulation behind the GPU solve's precision choice (``benchmarks/inverse_precision.py``)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from inverse_precision import blocked_inverse, chunk_matrix, tf32, worst_errors  # noqa: E402

BF16_ROUNDING = 2.0**-8  # 3.9e-3, the storage precision of T on the fast path


def test_tf32_keeps_ten_mantissa_bits():
    """1 + 2^-10 is a TF32 number; 1 + 2^-12 rounds to 1; 1 + 3 * 2^-12 rounds up to 1 + 2^-10."""
    x = np.array([1 + 2.0**-10, 1 + 2.0**-12, 1 + 3 * 2.0**-12], np.float32)
    np.testing.assert_array_equal(tf32(x), np.array([1 + 2.0**-10, 1.0, 1 + 2.0**-10], np.float32))


def test_blocked_inverse_in_fp32_is_the_inverse():
    """The emulated algorithm itself (all IEEE fp32) against numpy's float64 inverse: 1e-5 of
    max |T| (fp32 doubling on moderately correlated keys loses a few digits, no more)."""
    a = chunk_matrix(np.random.default_rng(1), cos=0.5)
    exact = np.linalg.inv(np.eye(a.shape[0]) + a.astype(np.float64))
    err = np.abs(blocked_inverse(a, "fp32", "fp32") - exact).max() / np.abs(exact).max()
    assert err < 1e-5


def test_kept_precision_stays_below_bf16_rounding_and_all_tf32_does_not():
    """Correlated keys (mean cosine 0.8): 3xTF32 doubling + TF32 products stays under one bf16
    rounding of T; TF32 doubling does not (why the doubling keeps 3xTF32)."""
    errors = worst_errors(0.8, trials=5)
    assert errors["ieee"] < 1e-4
    assert errors["x3+tf32"] < BF16_ROUNDING
    assert errors["tf32"] > BF16_ROUNDING
