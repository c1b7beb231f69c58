"""Masked-LM targets exactly as BERT's `create_masked_lm_predictions`, one example at a time.

Every example has its own Philox stream: key from the seed, counter from (example index,
masking round). Any example's masks can thus be recomputed in isolation, in any order, by any
process, which is what makes batches pure functions of (seed, step).

BERT's rules: [CLS] and [SEP] are never candidates (padding is never part of an example);
num_to_predict = min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob))) with
len counting the special tokens; candidates (words when whole-word masking) are visited in a
random order and taken while they fit; each chosen position becomes [MASK] with probability
0.8, stays itself with 0.1, and becomes a random token with 0.1.
Whole-word groups only join `##` pieces to an immediately preceding candidate, so a word never
straddles a [SEP] (BERT's loop could glue a B-initial `##` piece onto A's last word).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASKING_STREAM = 1  # SeedSequence tag


class ExampleRandom:
  """Hands out the Philox stream of (index, masking round), reusing one Generator.

  Resetting the state costs ~5 us where constructing a Philox costs ~20 us (it gathers OS
  entropy first). Not thread-safe: one instance per thread.
  """

  def __init__(self, seed: int, stream: int = MASKING_STREAM):
    self.key = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint64)
    self._bits = np.random.Philox(key=self.key)
    self._gen = np.random.Generator(self._bits)
    self._zeros = np.zeros(4, dtype=np.uint64)

  def for_example(self, index: int, masking_round: int) -> np.random.Generator:
    # The counter's two high words hold the example: 2**128 draws before streams could meet.
    self._bits.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.array([0, 0, index, masking_round], dtype=np.uint64),
                  "key": self.key},
        "buffer": self._zeros, "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
    }
    return self._gen


@dataclass(frozen=True)
class MaskingRules:
  max_predictions: int
  masked_lm_prob: float
  whole_word: bool
  mask_id: int
  maskable: np.ndarray  # bool[vocab]: False for [CLS], [SEP], [PAD]
  is_continuation: np.ndarray  # bool[vocab]: `##` pieces
  replacement_ids: np.ndarray  # int32 ids a random replacement is drawn from

  def num_to_predict(self, num_tokens: int) -> int:
    # Python's round (half to even), as BERT's int(round(...)).
    return min(self.max_predictions, max(1, int(round(num_tokens * self.masked_lm_prob))))


def _word_groups(tokens: np.ndarray, candidates: np.ndarray, rules: MaskingRules,
                 continues: np.ndarray | None = None) -> np.ndarray:
  """Group id per candidate: a piece that continues a word (`##`, or per `continues`) right
  after a candidate joins that candidate's word."""
  joins = (rules.is_continuation[tokens[candidates]] if continues is None
           else continues[candidates])
  adjacent = np.concatenate([[False], np.diff(candidates) == 1])
  return np.cumsum(~(joins & adjacent)) - 1


def choose_positions(tokens: np.ndarray, rules: MaskingRules, rng: np.random.Generator,
                     continues: np.ndarray | None = None) -> np.ndarray:
  """Sorted positions to predict. `continues` (bool per position): the tokenizer's own word
  boundaries, for tokenizers without `##` pieces."""
  candidates = np.flatnonzero(rules.maskable[tokens])
  k = rules.num_to_predict(len(tokens))
  if len(candidates) == 0:
    return candidates
  if not rules.whole_word:
    order = rng.permutation(len(candidates))
    return np.sort(candidates[order[:k]])
  groups = _word_groups(tokens, candidates, rules, continues)
  sizes = np.bincount(groups)
  chosen, total = [], 0
  for g in rng.permutation(len(sizes)).tolist():
    if total >= k:
      break
    if total + sizes[g] > k:
      continue  # BERT skips a word that would overshoot and tries the next one
    chosen.append(g)
    total += int(sizes[g])
  return candidates[np.isin(groups, chosen)]


def mask_tokens(tokens: np.ndarray, rules: MaskingRules, rng: np.random.Generator,
                continues: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(masked input ids, positions, original ids at those positions)."""
  positions = choose_positions(tokens, rules, rng, continues)
  labels = tokens[positions]
  masked = tokens.copy()
  u = rng.random(len(positions))
  to_mask = u < 0.8
  to_random = u >= 0.9  # [0.8, 0.9): keep the original token
  masked[positions[to_mask]] = rules.mask_id
  n_random = int(np.count_nonzero(to_random))
  if n_random:
    picks = rng.integers(0, len(rules.replacement_ids), size=n_random)
    masked[positions[to_random]] = rules.replacement_ids[picks]
  return masked, positions, labels
