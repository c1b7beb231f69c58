"""Knowledge-transfer strategies compared at equal total steps (spec §9, paper Table 8).

    python -m mbert_jax.sweep --sweep=experiments/kt_strategies.py:smoke --workdir=runs/kt_smoke
    python -m mbert_jax.sweep --sweep=experiments/kt_strategies.py --workdir=/ckpt/kt --emit
    python -m mbert_jax.sweep --report --workdir=runs/kt_smoke

Set-up: `teacher` pretrains IB-BERT (configs/ib_bert_large.py) in `{sweepdir}/teacher`; every
student uses its checkpoint and its tokenizer. All runs share `{sweepdir}/data_cache` (tokenized
data) and `{sweepdir}/xla_cache` (compiled steps: the runs share shapes, and a resumed run
recompiles nothing).

Runs, all with T = L * steps_per_layer + distill_steps total steps (L = student layers):
  pkt, pkt_freeze   L phases of steps_per_layer, then PD for distill_steps
  jkt               joint transfer for L * steps_per_layer, then PD for distill_steps
  akt, pd_only      one stage of T steps (akt: PD loss + every layer's KT terms)
  scratch           MLM + NSP from random init for T steps (dropout on, as its preset has)
  pkt_no_at         pkt without attention transfer (attention_distill_factor = 0)
  pkt_no_mean_var   pkt without the mean/variance terms (beta = gamma = 0)

Pre-training distillation reads cached teacher logits where runs share it: pkt, pkt_freeze, jkt
and both pkt variants end in the same PD stage (global steps L * steps_per_layer .. T, the same
batches), so the sweep writes `{sweepdir}/teacher_cache` once, after the teacher and before the
runs (mbert_jax.distill.teacher_cache; top-k logits, k = `cache_k`), and their PD stages run without the
teacher. akt (layer-wise terms throughout), pd_only (its PD stage covers other steps, so a cache
would save nothing) and scratch run online. At the paper's size that cache is ~4.7 KB per
sequence x 500k x 2048 sequences, about 4.8 TB: `cache_k=0` keeps every run online instead.

Arguments (comma-separated): `smoke` (CPU size), `tiny` (seconds per run; the tests' size),
`steps_per_layer=N`, `distill_steps=N`, `teacher_steps=N` (0 = the size's default),
`teacher=PATH` (an existing teacher workdir or Hugging Face directory: no set-up run),
`cache_k=N` (top-k logits in the shared PD cache; default 64, 0 = teacher online), `demo`
(configs/demo.py's small-batch recipe: AdamW, batch 32, no dropout in any run, scratch included).
Default: the paper's budget (24 x 10k + 500k = 740k steps, batch 2048) for accelerators.
"""

import os

from configs import common, distill_mobilebert
from mbert_jax.distill import schedule as schedule_lib
from mbert_jax.sweeps import sweep as sw

STRATEGIES = ("pkt", "pkt_freeze", "jkt", "akt", "pd_only", "scratch")
SHARED_CACHE = "{sweepdir}/teacher_cache"

# The tests' size: two layers, 32 tokens, a slice of the built-in corpus. Applied to the
# students' base config and, as overrides, to the teacher, so both see the same data.
_TINY_DATA = {
    "data.source": "builtin:json*",
    "data.max_seq_length": 32,
    "data.max_predictions_per_seq": 5,
    "data.batch_size": 8,
    "model.num_hidden_layers": 2,
    "model.max_position_embeddings": 32,
    "train.eval_steps": 1,
    "train.log_every": 1,
    "train.eval_every": 1_000_000,   # evaluate once, at the end
    "train.checkpoint_every": 2,
    "train.progress_bar": False,
    "train.async_checkpoint": False,
    "data.num_proc": 1,              # forking tokenizer workers costs more than it saves here
}
_TEACHER_ONLY_TINY = {"data.vocab": "train:512"}

# (steps_per_layer, distill_steps, teacher_steps) per size.
_BUDGET = {"full": (10_000, 500_000, 500_000), "smoke": (40, 200, 600), "tiny": (2, 2, 6)}


def _arg(arg):
  a = common.parse_arg(arg, smoke=False, tiny=False, steps_per_layer=0, distill_steps=0,
                       teacher_steps=0, teacher="", demo=False, cache_k=64)
  size = "tiny" if a.tiny else "smoke" if a.smoke else "full"
  spl, distill, teacher_steps = _BUDGET[size]
  for key, default in (("steps_per_layer", spl), ("distill_steps", distill),
                       ("teacher_steps", teacher_steps)):
    if a[key] < 0:
      raise ValueError(f"kt_strategies argument {key}={a[key]} must be >= 0 (0 = default)")
    if a[key] == 0:
      a[key] = default
  if a.cache_k < 0:
    raise ValueError(f"kt_strategies argument cache_k={a.cache_k} must be >= 0 (0 = no cache)")
  a.size = size
  return a


def _teacher_paths(a):
  """(teacher checkpoint, vocabulary) for the students."""
  if not a.teacher:
    return "{sweepdir}/teacher", "{sweepdir}/teacher/tokenizer"
  tokenizer = os.path.join(a.teacher, "tokenizer")
  # An mbert-jax workdir keeps its tokenizer in tokenizer/; a Hugging Face directory holds
  # vocab.txt itself.
  return a.teacher, tokenizer if os.path.isdir(tokenizer) else a.teacher


def get_config(arg=None):
  """The students' base config: distill_mobilebert's pkt preset at the chosen size."""
  a = _arg(arg)
  c = distill_mobilebert.get_config("smoke" if a.size != "full" else None)
  c.teacher.checkpoint, c.data.vocab = _teacher_paths(a)
  c.data.cache_dir = "{sweepdir}/data_cache"
  c.train.compilation_cache_dir = "{sweepdir}/xla_cache"
  if a.size == "tiny":
    for key, value in _TINY_DATA.items():
      section, field = key.split(".")
      c[section][field] = value
  c.schedule.steps_per_layer = a.steps_per_layer
  c.schedule.distill_steps = a.distill_steps
  c.schedule.warmup_steps = min(c.schedule.warmup_steps, a.distill_steps // 10)
  if a.cache_k:
    c.teacher_cache.k = a.cache_k
  if a.demo:
    # configs/demo.py's recipe at batch 32: AdamW, no dropout (LAMB's trust-ratio steps are
    # tuned for batches in the thousands).
    c.data.batch_size = 32
    c.train.optimizer = "adamw"
    c.train.dropout = False
    c.train.eval_steps = 8
    c.schedule.learning_rate = 2e-3
  return c


def get_setup(arg=None):
  a = _arg(arg)
  if a.teacher:
    return []
  teacher = {"name": "teacher",
             "config": "configs/ib_bert_large.py" + (":smoke" if a.size != "full" else ""),
             "data.cache_dir": "{sweepdir}/data_cache",
             "train.compilation_cache_dir": "{sweepdir}/xla_cache",
             "train.steps": a.teacher_steps}
  if a.size == "tiny":
    teacher.update(_TINY_DATA, **_TEACHER_ONLY_TINY)
    teacher["train.warmup_steps"] = 1
  return [teacher]


def total_steps(config) -> int:
  stages = schedule_lib.build_schedule(config.schedule, config.model.num_hidden_layers)
  return schedule_lib.total_steps(stages)


def get_sweep(arg=None):
  a = _arg(arg)
  base = get_config(arg)
  layers = base.model.num_hidden_layers
  transfer = layers * a.steps_per_layer
  budget = transfer + a.distill_steps

  # The runs whose PD stage is global steps [transfer, budget) share one cache.
  shared = {"schedule.teacher_cache": SHARED_CACHE} if a.cache_k else {}
  strategies = [
      {"schedule.name": "pkt", **shared},
      {"schedule.name": "pkt_freeze", **shared},
      {"schedule.name": "jkt", "schedule.transfer_steps": transfer, **shared},
      {"schedule.name": "akt", "schedule.distill_steps": budget},
      {"schedule.name": "pd_only", "schedule.distill_steps": budget},
      {"schedule.name": "scratch", "schedule.distill_steps": budget, "train.dropout": not a.demo},
  ]
  runs = sw.zip_(sw.sweep("name", STRATEGIES), strategies)
  runs += sw.product(
      [{"schedule.name": "pkt", **shared}],
      sw.zip_(sw.sweep("name", ["pkt_no_at", "pkt_no_mean_var"]),
              sw.sweep("variant", ["no_at", "no_mean_var"]),
              [{"schedule.attention_distill_factor": 0.0},
               {"schedule.beta_distill_factor": 0.0, "schedule.gamma_distill_factor": 0.0}]))
  _check_equal_budget(base, runs, budget)
  return runs


def _check_equal_budget(base, runs, budget):
  """Every run's schedule sums to the same total, or the comparison is not a comparison."""
  for r in runs:
    c = base.copy_and_resolve_references()
    for key, value in r.items():
      if key not in sw.META_KEYS:
        section, field = key.split(".")
        c[section][field] = value
    got = total_steps(c)
    if got != budget:
      raise ValueError(f"kt_strategies: run {r['name']} has {got} total steps, expected {budget}")
