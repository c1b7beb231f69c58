"""Seeded random permutations of [0, n) evaluated pointwise, in O(1) memory.

A step's batch must be computable without materialising an epoch's order (n can be hundreds
of millions). A Feistel network over the smallest even-bit domain >= n is a bijection of that
domain; "cycle walking" (re-encrypting values that land outside [0, n)) turns it into a
bijection of [0, n). Domain < 4n, so fewer than 4 walks are expected.
"""

from __future__ import annotations

import numpy as np

ORDER_STREAM = 3  # SeedSequence tag: epoch order
FEISTEL_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a strong 64-bit mixing function (uint64 arithmetic wraps)."""
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def permutation_keys(seed: int, epoch: int) -> np.ndarray:
  return np.random.SeedSequence([seed, ORDER_STREAM, epoch]).generate_state(
      FEISTEL_ROUNDS, dtype=np.uint64)


def _half_bits(n: int) -> int:
  bits = max(2, int(n - 1).bit_length())
  return (bits + 1) // 2


def _encrypt(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
  mask = np.uint64((1 << half) - 1)
  shift = np.uint64(half)
  left, right = x >> shift, x & mask
  for k in keys:
    left, right = right, left ^ (_mix(right ^ k) & mask)
  return (left << shift) | right


def permute(indices, n: int, keys: np.ndarray) -> np.ndarray:
  """The images of `indices` (each in [0, n)) under the permutation of [0, n) keyed by `keys`."""
  x = np.asarray(indices, dtype=np.int64)
  if n < 1:
    raise ValueError(f"cannot permute an empty range (n={n})")
  if x.size and (x.min() < 0 or x.max() >= n):
    raise ValueError(f"indices must lie in [0, {n})")
  if n == 1:
    return np.zeros_like(x)
  half = _half_bits(n)
  y = _encrypt(x.astype(np.uint64), half, keys)
  outside = y >= np.uint64(n)
  while outside.any():
    y[outside] = _encrypt(y[outside], half, keys)
    outside = y >= np.uint64(n)
  return y.astype(np.int64)
