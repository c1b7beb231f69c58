"""BERT-base pretraining (MLM + NSP): a standard teacher for width-matched students.

    python launch.py --config=configs/bert_base.py:smoke --workdir=/tmp/bert
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config()
  c.model = common.model_section("bert_base")
  common.pretraining_schedule(c, steps=1_000_000, learning_rate=1e-4, warmup_steps=10_000)
  c.train.optimizer = "adamw"
  c.data.source = "wikimedia/wikipedia:20231101.en"
  c.data.vocab = "train:30522"
  c.data.batch_size = 256
  if arg.smoke:
    common.smoke(c, "bert_base_micro")
    c.train.steps = 200
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 20
  return c
