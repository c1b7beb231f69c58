"""Launch a training run (or a pipeline of runs) from a config file.

    python launch.py --config=configs/ib_bert_large.py:smoke --workdir=runs/teacher
    python launch.py --config=configs/distill_mobilebert.py --workdir=runs/student \
        --config.teacher.checkpoint=runs/teacher --config.schedule.name=pkt
    python launch.py --config=configs/finetune_glue.py:task=sst2 --workdir=runs/sst2 \
        --config.init.checkpoint=runs/student

Running the same command again resumes from the workdir. The same command is installed as
`mbert-jax train`; what it does is mbert_jax/launch.py.
"""

from mbert_jax.launch import train_main

if __name__ == "__main__":
  train_main()
