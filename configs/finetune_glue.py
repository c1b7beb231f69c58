"""Fine-tuning on a GLUE task (spec §5 classifier, §11 hyperparameters).

    python launch.py --config=configs/finetune_glue.py:task=sst2 --workdir=runs/sst2 \
        --config.init.checkpoint=runs/student
    python launch.py --config=configs/finetune_glue.py:task=mnli --workdir=runs/mnli_s1 \
        --config.train.seed=1 --config.train.learning_rate=1e-4 --config.train.epochs=5
    python launch.py --config=configs/finetune_glue.py:task=mrpc,smoke --workdir=/tmp/mrpc \
        --config.task.data=/data/glue/MRPC          # CPU-sized, offline

Arguments: task=<cola|sst2|mrpc|stsb|qqp|mnli|qnli|rte|wnli> (default sst2), smoke, bf16.
Data comes from the hub (nyu-mll/glue) unless task.data names a local directory with the GLUE
files (train.tsv, dev.tsv; MNLI dev_matched.tsv and dev_mismatched.tsv). The default initial
model is the released MobileBERT on the Hugging Face hub (downloaded; online only); point
init.checkpoint at an mbert-jax workdir or a local Hugging Face directory instead, or set it to
"" for a randomly initialised baseline. STS-B trains a 1-output regression head with MSE.
Defaults (spec §11): AdamW (TF1, no bias correction), lr 5e-5, 3 epochs, warm-up 10%, linear
decay, clip 1.0, seq 128, batch 32, classifier dropout 0.1. `:smoke` = micro model with random
init and a vocabulary trained on the task's text, seq 64, 60 steps, at most 2,000 training and
500 evaluation examples.
"""

from configs import common
from mbert_jax.finetune import glue as tasks, task as trainer


def get_config(arg=None):
  arg = common.parse_arg(arg, task="sst2", smoke=False, bf16=False)
  task = tasks.get_task(arg.task)  # an unknown task fails here, naming the known ones
  c = trainer.default_config("glue")
  c.task.name = task.name
  c.init.checkpoint = "google/mobilebert-uncased"
  c.train.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.distributed = common.distributed_section()
  if arg.smoke:
    smoke(c)
  return c


def smoke(c):
  common.finetune_smoke(c, seq=64, train_examples=2000, eval_examples=500)
