"""Knowledge transfer from a teacher into MobileBERT with a named strategy (spec §9).

    python launch.py --config=configs/distill_mobilebert.py --workdir=runs/mobilebert \
        --config.teacher.checkpoint=runs/ib_bert_large
    python launch.py --config=configs/distill_mobilebert.py:smoke,preset=jkt --workdir=/tmp/s \
        --config.teacher.checkpoint=/tmp/teacher

Presets: pkt (official TF1 recipe, default), pkt_freeze, pkt_tf2, jkt, akt, pd_only, scratch.
Arguments: smoke (CPU size), preset=<name>, student=<model preset> (mobilebert, mobilebert_tiny,
mobilebert_no_opt). train.steps = -1 runs the whole schedule; a positive value stops earlier.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, preset="pkt", student="mobilebert", bf16=False)
  c = common.base_config()
  c.model = common.model_section(arg.student)
  c.schedule.name = arg.preset
  c.schedule.steps_per_layer = 10_000
  c.schedule.distill_steps = 500_000
  c.schedule.learning_rate = 1.5e-3
  c.schedule.warmup_steps = 10_000
  c.train.steps = -1
  c.train.optimizer = "lamb"
  c.train.dropout = False           # TF1 runs both models with is_training=False in KT and PD
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.checkpoint_every = 10_000
  c.train.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.teacher.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.data.source = "wikimedia/wikipedia:20231101.en"
  c.data.vocab = "train:30522"
  c.data.max_seq_length = 512
  c.data.max_predictions_per_seq = 20
  c.data.batch_size = 2048
  c.mesh.data = 1
  c.mesh.fsdp = -1
  if arg.preset == "scratch":
    c.train.dropout = True
  if arg.smoke:
    common.smoke(c, arg.student + "_micro")
    c.schedule.steps_per_layer = 40
    c.schedule.transfer_steps = 160
    c.schedule.distill_steps = 200
    c.schedule.learning_rate = 2e-3
    c.schedule.warmup_steps = 20
  return c
