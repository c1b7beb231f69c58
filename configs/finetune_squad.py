"""Fine-tuning on SQuAD v1.1 or v2.0 (span extraction, spec §11).

    python launch.py --config=configs/finetune_squad.py --workdir=runs/squad1 \
        --config.init.checkpoint=runs/student
    python launch.py --config=configs/finetune_squad.py:version=2.0 --workdir=runs/squad2
    python launch.py --config=configs/finetune_squad.py:version=2.0,smoke --workdir=/tmp/sq \
        --config.task.data=/data/squad              # CPU-sized, offline

Arguments: version=1.1|2.0 (default 1.1), smoke, bf16. Data comes from the hub
(rajpurkar/squad, rajpurkar/squad_v2) unless task.data names a directory holding
train-v1.1.json and dev-v1.1.json (or -v2.0). The default initial model is the released
MobileBERT on the Hugging Face hub (online only); see configs/finetune_glue.py for the other
choices. Defaults (README/spec §11): lr 4e-5, 5 epochs, batch 32, seq 384, doc stride 128,
query 64 tokens, answers up to 30 tokens, n-best 20; v2.0 answers "" when the null score beats
the best span by more than finetune.null_score_diff_threshold (0). Predictions (and v2.0 null
odds) for the official scripts land in <workdir>/predictions/. `:smoke` = micro model, random
init, trained vocabulary, seq 128, 60 steps, at most 500 training and 200 evaluation questions.
"""

from configs import common
from mbert_jax.finetune import defaults, task as trainer


def get_config(arg=None):
  arg = common.parse_arg(arg, version="1.1", smoke=False, bf16=False)
  version = defaults.squad_defaults(arg.version)["version"]  # rejects anything but 1.1 / 2.0
  c = trainer.default_config("squad")
  c.task.name = "squad"
  c.task.version = version
  c.init.checkpoint = "google/mobilebert-uncased"
  c.train.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.distributed = common.distributed_section()
  if arg.smoke:
    smoke(c)
  return c


def smoke(c):
  common.finetune_smoke(c, seq=128, train_examples=500, eval_examples=200)
  c.finetune.doc_stride = 32
  c.finetune.max_query_length = 24
