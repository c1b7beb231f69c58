"""Pairing (against a literal transcription of BERT's loop), masking and permutations."""

from __future__ import annotations

import numpy as np
import pytest

from mbert_jax.data import pairing, permutation
from mbert_jax.data.masking import ExampleRandom, MaskingRules, choose_positions, mask_tokens


# --------------------------------------------------------------------------- pairing
def bert_truncate(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
  """BERT's truncate_seq_pair loop, counting removals instead of flipping coins."""
  cut_a = cut_b = 0
  while len_a + len_b > max_tokens:
    if len_a > len_b:
      len_a, cut_a = len_a - 1, cut_a + 1
    else:
      len_b, cut_b = len_b - 1, cut_b + 1
  return cut_a, cut_b


def test_truncation_counts_match_bert_loop():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    la, lb, m = (int(x) for x in rng.integers(1, 80, size=3))
    assert pairing.truncation_counts(la, lb, m) == bert_truncate(la, lb, m)


def reference_instances(documents, max_seq_length, short_seq_prob, rng_stream):
  """create_instances_from_document over all documents, transcribed from BERT with lists of
  token lists; random draws come from the same stream in the same order."""
  max_num_tokens = max_seq_length - 3
  out = []
  for document_index, document in enumerate(documents):
    target_seq_length = max_num_tokens
    if rng_stream.random() < short_seq_prob:
      target_seq_length = rng_stream.integers(2, max_num_tokens + 1)
    current_chunk, current_length, i = [], 0, 0
    while i < len(document):
      segment = document[i]
      current_chunk.append(segment)
      current_length += len(segment)
      if i == len(document) - 1 or current_length >= target_seq_length:
        a_end = 1
        if len(current_chunk) >= 2:
          a_end = rng_stream.integers(1, len(current_chunk))
        tokens_a = [t for seg in current_chunk[:a_end] for t in seg]
        tokens_b = []
        if len(current_chunk) == 1 or rng_stream.random() < 0.5:
          is_random_next = True
          target_b_length = target_seq_length - len(tokens_a)
          for _ in range(10):
            random_document_index = rng_stream.integers(0, len(documents))
            if random_document_index != document_index:
              break
          random_document = documents[random_document_index]
          random_start = rng_stream.integers(0, len(random_document))
          for j in range(random_start, len(random_document)):
            tokens_b.extend(random_document[j])
            if len(tokens_b) >= target_b_length:
              break
          i -= len(current_chunk) - a_end
        else:
          is_random_next = False
          tokens_b = [t for seg in current_chunk[a_end:] for t in seg]
        cut_a, cut_b = bert_truncate(len(tokens_a), len(tokens_b), max_num_tokens)
        front_a, front_b = rng_stream.binomial_half(cut_a), rng_stream.binomial_half(cut_b)
        tokens_a = tokens_a[front_a:len(tokens_a) - (cut_a - front_a)]
        tokens_b = tokens_b[front_b:len(tokens_b) - (cut_b - front_b)]
        assert tokens_a and tokens_b
        out.append((tokens_a, tokens_b, int(is_random_next)))
        current_chunk, current_length = [], 0
      i += 1
  return out


def random_corpus(seed: int, num_docs: int = 60):
  """Documents of sentences of distinct token ids (so content identifies the position)."""
  rng = np.random.default_rng(seed)
  documents, next_id = [], 0
  for _ in range(num_docs):
    doc = []
    for _ in range(int(rng.integers(1, 12))):
      n = int(rng.integers(1, 40))
      doc.append(list(range(next_id, next_id + n)))
      next_id += n
    documents.append(doc)
  lengths = [len(s) for d in documents for s in d]
  sentence_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  document_offsets = np.concatenate([[0], np.cumsum([len(d) for d in documents])]).astype(np.int64)
  tokens = np.arange(next_id)
  return documents, tokens, sentence_offsets, document_offsets


@pytest.mark.parametrize("short_seq_prob", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_pairing_equals_bert_transcription(seed, short_seq_prob):
  documents, tokens, so, do = random_corpus(seed)
  table = pairing.build_instances(so, do, 64, short_seq_prob, seed=5, pairing_round=2)
  expected = reference_instances(documents, 64, short_seq_prob,
                                 pairing._Uniforms(pairing.shard_rng(5, 2, 0)))
  got = [(tokens[a0:a1].tolist(), tokens[b0:b1].tolist(), r) for a0, a1, b0, b1, r in table]
  assert got == expected


def test_pairing_invariants_and_rounds():
  documents, tokens, so, do = random_corpus(3, num_docs=200)
  t0 = pairing.build_instances(so, do, 48, 0.1, seed=1, pairing_round=0)
  t1 = pairing.build_instances(so, do, 48, 0.1, seed=1, pairing_round=1)
  assert not np.array_equal(t0, t1)
  np.testing.assert_array_equal(t0, pairing.build_instances(so, do, 48, 0.1, 1, 0))
  a_len, b_len = t0[:, 1] - t0[:, 0], t0[:, 3] - t0[:, 2]
  assert (a_len >= 1).all() and (b_len >= 1).all() and (a_len + b_len <= 45).all()
  doc_of = lambda offsets: np.searchsorted(so[do], offsets, side="right") - 1
  same_doc = doc_of(t0[:, 0]) == doc_of(t0[:, 2])
  actual = t0[:, 4] == 0
  assert same_doc[actual].all() and (t0[actual, 1] <= t0[actual, 2]).all()
  assert (~same_doc[~actual]).mean() > 0.95  # random B from another document (10 tries)


def test_short_seq_prob_shortens_examples():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 8, size=20_000)  # short sentences, so short targets show
  so = np.concatenate([[0], np.cumsum(lengths)])
  do = np.arange(0, 20_001, 100)
  def mean_len(p):
    t = pairing.build_instances(so, do, 128, p, seed=0, pairing_round=0)
    return np.mean(t[:, 1] - t[:, 0] + t[:, 3] - t[:, 2])
  assert mean_len(1.0) < 0.75 * mean_len(0.0)


@pytest.mark.slow
def test_parallel_pairing_equals_sequential(tmp_path):
  _, _, so, do = random_corpus(4, num_docs=3 * pairing.SHARD_DOCUMENTS // 2)
  np.save(tmp_path / "sentence_offsets.npy", so)
  np.save(tmp_path / "document_offsets.npy", do)
  seq = pairing.build_instances(so, do, 64, 0.1, 3, 0)
  par = pairing.build_instances(so, do, 64, 0.1, 3, 0, num_proc=2, directory=str(tmp_path),
                                parallel_min_sentences=0)
  np.testing.assert_array_equal(seq, par)


# --------------------------------------------------------------------------- masking
VOCAB = 50
CLS, SEP, PAD, MASK = 2, 3, 0, 4


def rules(whole_word=False, max_predictions=20, continuation=()):
  maskable = np.ones(VOCAB, dtype=bool)
  maskable[[CLS, SEP, PAD]] = False
  cont = np.zeros(VOCAB, dtype=bool)
  cont[list(continuation)] = True
  return MaskingRules(max_predictions=max_predictions, masked_lm_prob=0.15,
                      whole_word=whole_word, mask_id=MASK, maskable=maskable,
                      is_continuation=cont, replacement_ids=np.arange(5, VOCAB, dtype=np.int32))


def example(n_a=30, n_b=30, seed=0):
  rng = np.random.default_rng(seed)
  return np.concatenate([[CLS], rng.integers(5, VOCAB, n_a), [SEP],
                         rng.integers(5, VOCAB, n_b), [SEP]]).astype(np.int32)


def test_num_to_predict_formula():
  r = rules(max_predictions=20)
  assert [r.num_to_predict(n) for n in (1, 5, 10, 30, 63, 128, 512)] == [1, 1, 2, 4, 9, 19, 20]


def test_per_example_streams_are_reproducible_in_isolation():
  r, tokens = rules(), example()
  ra, rb = ExampleRandom(7), ExampleRandom(7)
  first = mask_tokens(tokens, r, ra.for_example(123, 4))
  for i in range(5):  # other examples drawn in between change nothing
    mask_tokens(tokens, r, rb.for_example(i, 0))
  again = mask_tokens(tokens, r, rb.for_example(123, 4))
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x, y)
  other = mask_tokens(tokens, r, ra.for_example(123, 5))
  assert not np.array_equal(first[1], other[1])


def test_masking_rates_and_rules():
  r, gen = rules(), ExampleRandom(0)
  counts = np.zeros(3)
  for i in range(3000):
    tokens = example(seed=i)
    masked, pos, labels = mask_tokens(tokens, r, gen.for_example(i, 0))
    assert len(pos) == r.num_to_predict(len(tokens)) and (np.diff(pos) > 0).all()
    assert not np.isin(tokens[pos], [CLS, SEP, PAD]).any()
    np.testing.assert_array_equal(labels, tokens[pos])
    untouched = np.setdiff1d(np.arange(len(tokens)), pos)
    np.testing.assert_array_equal(masked[untouched], tokens[untouched])
    counts += [(masked[pos] == MASK).sum(), (masked[pos] == labels).sum(), 0]
    counts[2] += len(pos)
  assert abs(counts[0] / counts[2] - 0.8) < 0.02
  assert abs(counts[1] / counts[2] - 0.1 - 0.1 / 45) < 0.02


def test_whole_word_groups_and_overshoot_rule():
  r = rules(whole_word=True, continuation=range(30, 50))
  gen = ExampleRandom(1)
  for i in range(300):
    tokens = example(seed=i)
    pos = choose_positions(tokens, r, gen.for_example(i, 0))
    assert len(pos) <= r.num_to_predict(len(tokens))
    chosen = set(pos.tolist())
    for p in range(2, len(tokens)):
      if r.is_continuation[tokens[p]] and r.maskable[tokens[p - 1]]:
        assert (p in chosen) == (p - 1 in chosen)


def test_no_candidates_gives_no_predictions():
  tokens = np.array([CLS, SEP, SEP], dtype=np.int32)
  masked, pos, labels = mask_tokens(tokens, rules(), ExampleRandom(0).for_example(0, 0))
  assert len(pos) == 0 and np.array_equal(masked, tokens)


# --------------------------------------------------------------------------- permutations
@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4097])
def test_feistel_is_a_bijection(n):
  keys = permutation.permutation_keys(0, 3)
  image = permutation.permute(np.arange(n), n, keys)
  assert sorted(image.tolist()) == list(range(n))


def test_feistel_depends_on_key_and_is_pointwise():
  n = 10_000
  a = permutation.permute(np.arange(n), n, permutation.permutation_keys(0, 0))
  b = permutation.permute(np.arange(n), n, permutation.permutation_keys(0, 1))
  assert (a != b).mean() > 0.99
  sample = np.array([5, 9999, 42])
  np.testing.assert_array_equal(
      permutation.permute(sample, n, permutation.permutation_keys(0, 0)), a[sample])
  # Looks shuffled: neighbours land far apart.
  assert np.abs(np.diff(a)).mean() > n / 5
  with pytest.raises(ValueError):
    permutation.permute([n], n, permutation.permutation_keys(0, 0))
