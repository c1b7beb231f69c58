"""Is the data pipeline fast enough, and does it scale? Three measurements:

  python benchmarks/data_pipeline.py [--source builtin] [--steps 3] [--batch_size 8]
  python benchmarks/data_pipeline.py --scale [--scale_mb 200] [--num_proc 2] [--vocab_size 30000]
  python benchmarks/data_pipeline.py --compare_splitters

Default: the pipeline's examples/s on one core next to the full MobileBERT train step's
examples/s on this machine, in the same run. The pipeline runs pinned to one core (batch_at is
single-threaded numpy); the train step gets every core. Aim: pipeline >= 20x the step, so one
data process per host never starves it. The step is a jitted forward + backward + AdamW update
with MLM + NSP cross-entropy, no dropout, on the full `mobilebert` preset.

--scale: builds the cache of a synthetic corpus of real sentences (the built-in corpus's, shuffled
and repeated into documents of Wikipedia-like length, one document per line as most dumps come)
of at least --scale_mb MB, stage by stage as build_pipeline does, and reports per stage the wall
time, CPU time, throughput per core and peak memory (the whole process tree, sampled), then
extrapolates to English Wikipedia (6M documents, 4B tokens).

--compare_splitters: boundary precision/recall on hand-labelled hard cases (abbreviations,
initials, numbers, quotes) and speed on the built-in corpus's prose, for every sentence
splitter importable here (regex and blingfire; pysbd, sentencex, syntok when installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbert_jax.data import build_pipeline, default_data_config  # noqa: E402


def measure_pipeline(args) -> dict:
  cfg = default_data_config()
  cfg.source, cfg.vocab = args.source, args.vocab
  cfg.max_seq_length, cfg.max_predictions_per_seq = args.seq, args.preds
  cfg.batch_size = args.data_batch_size
  t0 = time.perf_counter()
  pipe = build_pipeline(cfg, args.workdir)
  build_s = time.perf_counter() - t0
  pipe.batch_at(0)  # pairing table of epoch 0 in memory
  allowed = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(allowed)})
  try:
    t0 = time.perf_counter()
    for step in range(args.data_batches):
      pipe.batch_at(step)
    elapsed = time.perf_counter() - t0
  finally:
    os.sched_setaffinity(0, allowed)
  return {"pipeline_examples_per_second": args.data_batches * cfg.batch_size / elapsed,
          "pipeline_build_or_load_seconds": build_s, "pipeline": pipe}


def measure_train_step(args, pipe) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from mbert_jax.models import build
  from mbert_jax.models.config import preset

  model_cfg = preset(args.preset)
  if pipe.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"vocabulary {pipe.vocab_size} larger than the model's {model_cfg.vocab_size}")
  model = build(model_cfg)
  # The step consumes real batches: the pipeline's first global batches, re-cut to batch_size.
  data = pipe.batch_at(0)
  batch = {k: jnp.asarray(v[:args.batch_size]) for k, v in data.items()}
  if len(batch["input_ids"]) < args.batch_size:
    raise ValueError("--data_batch_size must be >= --batch_size")

  params = model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["token_type_ids"],
                      batch["attention_mask"], batch["masked_lm_positions"])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt_state = tx.init(params)

  def loss_fn(p, b):
    out = model.apply({"params": p}, b["input_ids"], b["token_type_ids"], b["attention_mask"],
                      b["masked_lm_positions"], deterministic=True)
    w = b["masked_lm_weights"]
    mlm = optax.softmax_cross_entropy_with_integer_labels(out.mlm_logits, b["masked_lm_ids"])
    mlm = jnp.sum(mlm * w) / (jnp.sum(w) + 1e-5)
    nsp = optax.softmax_cross_entropy_with_integer_labels(
        out.nsp_logits, b["next_sentence_labels"]).mean()
    return mlm + nsp

  @jax.jit
  def step(p, s, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  compile_s = time.perf_counter() - t0
  params, opt_state, loss = compiled(params, opt_state, batch)  # warm-up
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    params, opt_state, loss = compiled(params, opt_state, batch)
  jax.block_until_ready(loss)
  elapsed = time.perf_counter() - t0
  return {"step_examples_per_second": args.steps * args.batch_size / elapsed,
          "step_seconds": elapsed / args.steps, "step_compile_seconds": compile_s,
          "loss": float(loss), "device": str(jax.devices()[0]),
          "model_parameters": int(sum(x.size for x in jax.tree.leaves(params)))}


# ----------------------------------------------------------------------------- --scale
WIKIPEDIA_DOCUMENTS = 6_000_000
WIKIPEDIA_TOKENS = 4_000_000_000


class PeakMemory:
  """Peak resident memory of this process and its children, summed, sampled every 0.2 s.

  `rss` counts file pages mapped in (the memory-mapped arrays being written, which the kernel
  can drop at any time); `anon` = rss - shared is the part that must fit in memory.
  """

  def __init__(self):
    import psutil
    self._psutil, self._proc = psutil, psutil.Process()
    self.rss = self.anon = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self) -> None:
    rss = anon = 0
    for p in [self._proc] + self._proc.children(recursive=True):
      try:
        m = p.memory_info()
      except self._psutil.Error:
        continue
      rss, anon = rss + m.rss, anon + m.rss - m.shared
    self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)

  def _run(self) -> None:
    while not self._stop.wait(0.2):
      self._sample()

  def __enter__(self) -> "PeakMemory":
    self._sample()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self._sample()


def cpu_seconds() -> float:
  """User + system time of this process and of its finished children."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kwargs) -> tuple[object, dict]:
  with PeakMemory() as mem:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    out = fn(*args, **kwargs)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
  return out, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
               "peak_rss_mib": round(mem.rss / 2**20, 1),
               "peak_anon_mib": round(mem.anon / 2**20, 1)}


def real_sentences() -> list[str]:
  """The built-in corpus's prose (Python's documentation) cut into sentences."""
  from mbert_jax.data.builtin_corpus import iter_builtin_documents
  from mbert_jax.data.text import sentences_of
  return [s for d in iter_builtin_documents("*") for s in sentences_of(d.text, "regex")
          if len(s.split()) >= 4]


def write_synthetic_corpus(path: str, target_bytes: int, seed: int = 0) -> dict:
  """Documents of 5-80 real sentences (mean ~30: a Wikipedia article's), drawn with
  replacement from a shuffled pool, one document per line, blank lines between."""
  rng = random.Random(seed)
  pool = real_sentences()
  rng.shuffle(pool)
  written = docs = 0
  with open(path, "w", encoding="utf-8") as f:
    while written < target_bytes:
      n = min(80, max(5, int(rng.expovariate(1 / 30))))
      line = " ".join(pool[rng.randrange(len(pool))] for _ in range(n)) + "\n\n"
      f.write(line)
      written += len(line.encode("utf-8"))
      docs += 1
  return {"bytes": written, "documents": docs, "distinct_sentences": len(pool)}


def measure_scale(args) -> dict:
  import numpy as np

  from mbert_jax.data import corpus as corpus_lib
  from mbert_jax.data import pairing, pipeline, sources, tokenizer
  from mbert_jax.data.accounting import token_accounting

  work = os.path.join(args.workdir, "scale")
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  path = os.path.join(work, "articles.txt")
  t0 = time.perf_counter()
  corpus_info = write_synthetic_corpus(path, int(args.scale_mb * 1e6))
  corpus_info["generate_s"] = round(time.perf_counter() - t0, 1)

  cfg = pipeline.complete_data_config({"source": path, "num_proc": args.num_proc,
                                       "eval_fraction": 0.0})
  srcs = sources.parse_sources(cfg.source)
  reading = pipeline.reading_settings(cfg)
  report: dict = {"corpus": corpus_info, "num_proc": args.num_proc,
                  "cores_available": len(os.sched_getaffinity(0))}
  choices, report["sample_and_choose"] = timed(sources.resolve_splitters, srcs, reading)
  report["splitter"] = choices[0]["splitter"]
  staging = os.path.join(work, "staging")
  raw, report["read_documents"] = timed(sources.load_raw_documents, srcs, reading, staging,
                                        [c["splitter"] for c in choices])
  rows = np.arange(len(raw))

  def texts():
    for batch in raw.select_columns(["text"]).iter(batch_size=1000):
      yield from batch["text"]
  tok, report["train_vocabulary"] = timed(tokenizer.train_wordpiece, texts(), args.vocab_size)
  report["train_vocabulary"]["vocab_size"] = tok.get_vocab_size()

  corpus, report["tokenize_and_write"] = timed(
      corpus_lib.build_corpus, os.path.join(work, "corpus"), raw, rows, tok,
      tokenizer.special_ids(tok)["unk"], 1, args.num_proc, {"benchmark": True})
  tokens = int(corpus.stats["tokens"])
  table, report["pair_round_0"] = timed(
      pairing.build_instances, corpus.sentence_offsets, corpus.document_offsets, 128, 0.1,
      12345, 0, num_proc=args.num_proc, directory=corpus.directory)
  acc, report["token_accounting"] = timed(token_accounting, table, corpus.sentence_offsets,
                                          corpus.document_offsets, corpus.stats)
  report["corpus"].update(tokens=tokens, sentences=corpus.num_sentences,
                          examples_at_128=len(table), dropped_fraction=acc["dropped_fraction"])

  per_core = {}
  for stage in ("read_documents", "tokenize_and_write", "pair_round_0"):
    cpu = report[stage]["cpu_s"]
    per_core[stage] = round(tokens / cpu) if cpu else None
  report["tokens_per_cpu_second"] = per_core
  # Wikipedia: tokenization and pairing run in num_proc processes and scale with tokens over
  # the cores; reading is one process; the vocabulary trainer counts words on Rust threads
  # (linear in the text) and then merges (linear in distinct words, which this corpus of
  # repeated sentences understates: see --vocab_types).
  scale = WIKIPEDIA_TOKENS / tokens
  extrapolated: dict = {"scale_factor": round(scale, 1)}
  cpu_hours = {s: round(report[s]["cpu_s"] * scale / 3600, 2)
               for s in ("read_documents", "train_vocabulary", "tokenize_and_write",
                         "pair_round_0")}
  extrapolated["cpu_hours"] = cpu_hours
  for cores in (16, 64):
    parallel = sum(cpu_hours[s] for s in ("train_vocabulary", "tokenize_and_write",
                                          "pair_round_0")) / cores
    extrapolated[f"wall_hours_on_{cores}_cores"] = round(parallel + cpu_hours["read_documents"], 2)
  extrapolated["tokens_npy_gib"] = round(WIKIPEDIA_TOKENS * 2 / 2**30, 1)
  extrapolated["sentence_offsets_gib"] = round(corpus.num_sentences * scale * 8 / 2**30, 1)
  # The one structure held in memory: the pairing table (40 bytes per example), and about
  # 4x that while the accounting sorts segment starts.
  extrapolated["instance_table_gib"] = round(len(table) * scale * 40 / 2**30, 1)
  extrapolated["peak_anon_gib_while_accounting"] = round(len(table) * scale * 40 * 5 / 2**30, 1)
  report["extrapolated_to_wikipedia"] = extrapolated
  shutil.rmtree(work, ignore_errors=True)
  return report


def pseudo_words(n: int, seed: int = 0) -> list[str]:
  """n distinct lower-case letter strings of 3-12 letters (English-like lengths)."""
  rng = random.Random(seed)
  letters = "etaoinshrdlcumwfgypbvkjxqz"
  weights = [26 - i for i in range(26)]  # frequent letters first, as in English
  out: set[str] = set()
  while len(out) < n:
    out.add("".join(rng.choices(letters, weights, k=rng.randint(3, 12))))
  return sorted(out)


def measure_vocabulary_types(args) -> dict:
  """The vocabulary trainer's cost in distinct words, which the repeated-sentence corpus cannot
  show: every one of `--vocab_types` pseudo-words occurs twice (so each takes part in merges),
  in documents of 1,000 words."""
  from mbert_jax.data import tokenizer
  words = pseudo_words(args.vocab_types) * 2
  random.Random(1).shuffle(words)
  docs = [" ".join(words[i:i + 1000]) for i in range(0, len(words), 1000)]
  tok, stats = timed(tokenizer.train_wordpiece, docs, args.vocab_size)
  return {"distinct_words": args.vocab_types, "text_mb": round(sum(map(len, docs)) / 1e6, 1),
          "vocab_size": tok.get_vocab_size(), **stats}


# ----------------------------------------------------------------------------- --compare_splitters
# Hand-labelled hard cases: "|" separates the gold sentences of one input.
GOLD = """Dr. Smith went to Washington, D.C. on Jan. 5, 2020.|He met Sen. Jones there.
He works at Apple Inc.|The company makes phones.
The meeting is at 5 p.m.|Please be on time.
George W. Bush was the 43rd president of the U.S.|He served two terms.
She earned a Ph.D. in physics.|Then she moved to Berlin.
The results are shown in Fig. 3 and Table 2.|They agree with theory.
See pp. 12-15 of vol. 2 for details.|The appendix has more.
He lived at No. 10 Downing St. for years.|Later he retired.
The album sold 1.5 million copies in the U.K. alone.|It reached No. 1.
"I will not go," he said.|"You cannot make me."
He asked, "Why now?"|Nobody answered.
The war ended in 1945.|(Some historians date it later.)|Peace followed.
Wait... what happened next?|Nobody knows.
Python 3.11 was released in 2022.|It is faster than 3.10.
The site example.com is reserved.|Use it in documentation.
Mr. and Mrs. Smith arrived late.|The dinner had started.
Born in St. Petersburg, Russia, he moved to the U.S. in 1990.|He became a citizen.
The vote was 5 vs. 4 in favour.|The bill passed.
Operation Overlord began on 6 June 1944.|Allied troops landed in Normandy.
The river is approx. 300 km long.|It flows into the sea.
The population was 12,345 at the 2010 census.|It has since grown.
Maria (née Kowalska) was a painter.|Her work is held in museums.
He scored 3.5 points per game on average.|His team won.
The species was described by L. in 1758.|It is common in Europe.
Gen. Patton led the Third Army.|It advanced quickly.
The temperature reached −40 °C.|Pipes froze.
The company was renamed in 2001.|Its headquarters moved to Austin, Texas.
He used ASP.NET for the site.|It worked.
He was known as "The King".|Fans still visit his home.
The module os.path handles paths.|It is portable.
Q. What is the answer?|A. Nobody knows.
The film was directed by J. J. Abrams.|It was a success.
He wrote to the Rev. Dr. Martin.|The letter survives.
It is 5 ft. 10 in. tall.|It weighs 150 lb.
The U.S.S.R. dissolved in 1991.|Fifteen states became independent.
This is the end!|Or is it?
The firm Smith & Co. was founded in 1850.|It closed in 1990.
The standard is defined in RFC 2616.|It was replaced later.
In the 1990s, e.g. in 1995, sales rose.|They fell after 2000.
The score was 2–1.|The home team won."""


def splitter_candidates() -> dict:
  from mbert_jax.data import text
  out = {"regex": text.split_sentences}
  if text.library_splitter_available():
    out["blingfire"] = text.split_sentences_blingfire
  try:
    import pysbd
    seg = pysbd.Segmenter(language="en", clean=False)
    out["pysbd"] = lambda t: [x.strip() for x in seg.segment(t) if x.strip()]
  except ImportError:
    pass
  try:
    import sentencex
    out["sentencex"] = lambda t: [x.strip() for x in sentencex.segment("en", t) if x.strip()]
  except ImportError:
    pass
  try:
    import syntok.segmenter as syntok_segmenter
    out["syntok"] = lambda t: ["".join(tok.spacing + tok.value for tok in s).strip()
                               for p in syntok_segmenter.analyze(t) for s in p]
  except ImportError:
    pass
  return out


def _boundaries(sentences: list[str]) -> set[int]:
  """Boundary positions counted in non-space characters (splitters differ in spacing)."""
  out, pos = set(), 0
  for s in sentences[:-1]:
    pos += len("".join(s.split()))
    out.add(pos)
  return out


def compare_splitters() -> dict:
  from mbert_jax.data.builtin_corpus import iter_builtin_documents
  cases = [line.split("|") for line in GOLD.split("\n")]
  paragraphs = [ln for d in iter_builtin_documents("*") for ln in d.text.split("\n") if ln.strip()]
  chars = sum(map(len, paragraphs))
  report = {"gold_cases": len(cases), "prose_mb": round(chars / 1e6, 2)}
  for name, split in splitter_candidates().items():
    tp = fp = fn = exact = 0
    for gold in cases:
      want, got = _boundaries(gold), _boundaries(split(" ".join(gold)))
      tp, fp, fn = tp + len(want & got), fp + len(got - want), fn + len(want - got)
      exact += want == got
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    t0 = time.perf_counter()
    pieces = [split(p) for p in paragraphs]
    elapsed = time.perf_counter() - t0
    n = sum(map(len, pieces))
    report[name] = {
        "exact_cases": exact, "precision": round(precision, 3), "recall": round(recall, 3),
        "f1": round(2 * precision * recall / max(1e-9, precision + recall), 3),
        "prose_mb_per_second": round(chars / elapsed / 1e6, 2), "prose_sentences": n,
        "fragments_under_3_words": round(sum(len(s.split()) < 3 for p in pieces for s in p) / n, 4),
        # Cuts with no whitespace after them split a token (a URL, ASP.NET, os.path).
        "cuts_inside_a_token": sum(1 for p, ps in zip(paragraphs, pieces)
                                   for a in ps[:-1] if (p.find(a) + len(a) < len(p)
                                                        and not p[p.find(a) + len(a)].isspace()
                                                        and p.find(a) >= 0)),
    }
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default="builtin")
  parser.add_argument("--vocab", default="train:8192")
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--preds", type=int, default=20)
  parser.add_argument("--data_batch_size", type=int, default=64)
  parser.add_argument("--data_batches", type=int, default=100)
  parser.add_argument("--preset", default="mobilebert")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mbert_jax_bench"))
  parser.add_argument("--scale", action="store_true", help="cache build at scale (see above)")
  parser.add_argument("--scale_mb", type=float, default=200.0)
  parser.add_argument("--num_proc", type=int, default=max(1, len(os.sched_getaffinity(0))))
  parser.add_argument("--vocab_size", type=int, default=30_000)
  parser.add_argument("--compare_splitters", action="store_true")
  parser.add_argument("--vocab_types", type=int, default=0,
                      help="train a vocabulary on this many distinct pseudo-words (cost in types)")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  if args.compare_splitters:
    print(json.dumps(compare_splitters(), indent=2))
    return
  if args.vocab_types:
    print(json.dumps(measure_vocabulary_types(args), indent=2))
    return
  if args.scale:
    print(json.dumps(measure_scale(args), indent=2))
    return

  data = measure_pipeline(args)
  pipe = data.pop("pipeline")
  train = measure_train_step(args, pipe)
  ratio = data["pipeline_examples_per_second"] / train["step_examples_per_second"]
  report = {"seq": args.seq, "preds": args.preds, "source": args.source, **data,
            "step_batch_size": args.batch_size, "preset": args.preset, **train,
            "ratio_pipeline_over_step": ratio, "target_ratio": 20, "meets_target": ratio >= 20}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
