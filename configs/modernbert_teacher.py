"""MLM-only pretraining of a ModernBERT or EuroBERT teacher through the one loop (`scratch`).

    python launch.py --config=configs/modernbert_teacher.py:smoke --workdir=runs/mbt   # CPU
    python launch.py --config=configs/modernbert_teacher.py:preset=eurobert_210m \
        --workdir=runs/eurobert
    # then distil it:
    python launch.py --config=configs/distill_mobilebert.py:teacher=modernbert_base,smoke \
        --workdir=runs/mb --config.teacher.checkpoint=runs/mbt

Arguments: smoke (a micro twin of the preset on the built-in corpus, CPU size),
preset=<modernbert_base (default) | modernbert_large | eurobert_210m>, bf16.

The model has no token types and no NSP head, so the data are single segments without
next-sentence labels (data.next_sentence=False) and the one stage is MLM only
(schedule.nsp_factor=0). Its vocabulary is a byte-level BPE trained on the corpus in the
family's layout (data.vocab=bpe:<family>:<size>, mbert_jax/data/bpe.py, offline), saved in the
run's tokenizer/ beside its checkpoints; `teacher.checkpoint=<this run>` then hands the student
that vocabulary. ModernBERT masks 30% of the tokens (its paper's rate), EuroBERT 50% (its
report's); the rest of either recipe (StableAdamW, warmup-stable-decay, trillions of tokens,
sequence-length extension) is not reproduced: AdamW with BERT's linear warm-up and decay at
ModernBERT-base's peak learning rate 8e-4.
"""

from __future__ import annotations

import ml_collections

from configs import common
from mbert_jax.models import modern_preset

PRESETS = ("modernbert_base", "modernbert_large", "eurobert_210m")
# Each preset's micro twin for `smoke` (mbert_jax/models/modern_config.py).
MICRO = {"modernbert_base": "modernbert_micro", "modernbert_large": "modernbert_micro",
         "eurobert_210m": "eurobert_micro"}
MASKING = {"modernbert": 0.30, "eurobert": 0.50}


def model_section(name: str) -> ml_collections.ConfigDict:
  """A ModernConfig preset as a config section whose vocabulary follows the trained BPE: its
  size (-1) and its pad/mask ids (None: filled from the tokenizer when the run starts)."""
  d = modern_preset(name).to_dict()
  d.update(vocab_size=-1, pad_token_id=None, mask_token_id=None)
  return ml_collections.ConfigDict(d)


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, preset="modernbert_base", bf16=False)
  if arg.preset not in PRESETS:
    raise ValueError(f"config argument preset={arg.preset!r}; choose one of {PRESETS}")
  c = common.base_config()
  c.model = model_section(arg.preset)
  family = c.model.family
  common.pretraining_schedule(c, steps=500_000, learning_rate=8e-4, warmup_steps=10_000)
  c.schedule.nsp_factor = 0.0
  c.train.optimizer = "adamw"
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.checkpoint_every = 10_000
  c.train.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.data.source = "wikimedia/wikipedia:20231101.en"
  c.data.vocab = f"bpe:{family}:{modern_preset(arg.preset).vocab_size}"
  c.data.next_sentence = False
  c.data.max_seq_length = 512
  c.data.batch_size = 4096
  c.mesh.data = 1
  c.mesh.fsdp = -1
  if arg.smoke:
    common.smoke(c, model_section(MICRO[arg.preset]))
    c.data.vocab = f"bpe:{family}:1024"
    c.train.steps = 300
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 30
  c.data.masked_lm_prob = MASKING[family]
  # Room for every masked token of a full-length example (ceil(rate x length) + 1).
  c.data.max_predictions_per_seq = int(round(MASKING[family] * c.data.max_seq_length)) + 1
  return c
