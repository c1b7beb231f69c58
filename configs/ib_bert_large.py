"""IB-BERT-large teacher pretraining (MLM + NSP), spec §6 and §9.1.

    python launch.py --config=configs/ib_bert_large.py --workdir=runs/ib_bert_large
    python launch.py --config=configs/ib_bert_large.py:smoke --workdir=/tmp/teacher   # CPU

The paper's teacher recipe is not public (256 TPU v3 chips, 500k steps, batch 4096, LAMB are
unverified); the defaults follow BERT's LAMB recipe at that batch size. `:smoke` keeps the
architecture (bottleneck 512 -> wide block -> 512, LayerNorm, tanh-GELU) at CPU size.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, bf16=False)
  c = common.base_config()
  c.model = common.model_section("ib_bert_large")
  common.pretraining_schedule(c, steps=500_000, learning_rate=1.5e-3, warmup_steps=10_000)
  c.train.optimizer = "lamb"
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.checkpoint_every = 10_000
  c.train.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.data.source = "wikimedia/wikipedia:20231101.en"
  c.data.vocab = "train:30522"
  c.data.max_seq_length = 512
  c.data.max_predictions_per_seq = 80
  c.data.batch_size = 4096
  c.mesh.data = 1
  c.mesh.fsdp = -1
  if arg.smoke:
    common.smoke(c, "ib_bert_large_micro")
    c.train.steps = 300
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 30
  return c
