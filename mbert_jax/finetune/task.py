"""Fine-tuning: GLUE classification / STS-B regression and SQuAD v1.1 / v2.0 span extraction.

    python launch.py --config=configs/finetune_glue.py:task=sst2 --workdir=runs/sst2 \
        --config.init.checkpoint=runs/student
    python launch.py --config=configs/finetune_squad.py:version=2.0 --workdir=runs/squad2

Reads top to bottom: config -> initial weights (an mbert-jax workdir, a Hugging Face directory
or random) -> task data -> tokenizer -> features -> sharded state (restored or initialised,
the backbone copied in, the head fresh) -> loop (log, evaluate, checkpoint, preemption) ->
final evaluation with the official metrics -> `final.json`.

Determinism: the training stream is the concatenation of per-epoch permutations drawn from
`train.seed`, and the batch at step s is rows [s·B, (s+1)·B) of it, a pure function of
(config, step); dropout keys are folded from the seed and the step. A run stopped anywhere and
resumed from `<workdir>/checkpoints` therefore ends with the same parameters, bit for bit on
CPU, as one that never stopped. One workdir holds one run: rerun with a new workdir per seed or
per grid point.

A workdir ends up with config.json, model_config.json and tokenizer/ (so the fine-tuned model
can seed another run, e.g. MNLI -> RTE), task.json (head and labels), checkpoints/,
metrics.jsonl and tensorboard/ (`eval/<split>/<metric>` rows), predictions/ (GLUE submission
TSVs; SQuAD answers and v2.0 null odds for the official scripts) and final.json.

The parts, each its own module: config.py (sections, checks, optimizer, identity),
initial_model.py, data.py (tokenizer, splits, features, batches), objective.py (loss,
predictions, metrics, prediction files), glue.py and squad.py (the tasks' data).

Steps: TF1's int(rows / batch · epochs). SQuAD counts rows as windowed features (as Hugging
Face does), not questions (TF1 run_squad), so long contexts train on every window each epoch.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mbert_jax.training import optim
from mbert_jax.training import sharding
from mbert_jax.training import loop
from mbert_jax.training.task import Setup, StagePlan
from mbert_jax.training.workdir import (CONFIG_FILE, DONE_FILE, MODEL_CONFIG_FILE, TASK_FILE,
                                        TOKENIZER_DIR)
from mbert_jax.data.tokenizer import save_tokenizer
from mbert_jax.finetune.config import (STOP_FIELD, TaskInfo, default_config, optimizer_config,
                                       run_identity, task_info, validate_config)
from mbert_jax.finetune.data import (featurize, load_split, local_rows, resolve_tokenizer,
                                     total_steps, train_batch_indices)
from mbert_jax.finetune.initial_model import (BACKBONE, InitSource, abstract_params, build_model,
                                              check_model_early, finetune_model_config,
                                              init_params_of, load_backbone, resolve_init)
from mbert_jax.finetune.objective import (make_loss, make_predict, predict_split, score_glue,
                                          score_squad, write_predictions)

__all__ = ["DONE_FILE", "TASK_FILE", "FinetuneTask", "InitSource", "TaskInfo", "default_config",
           "finetune_and_evaluate", "task_info", "train_batch_indices", "validate_config"]


def param_counts(abs_params) -> dict[str, int]:
  counts = {k: sum(math.prod(a.shape) for a in jax.tree.leaves(v)) for k, v in abs_params.items()}
  counts["backbone"] = sum(counts.get(k, 0) for k in BACKBONE)
  counts["total"] = sum(v for k, v in counts.items() if k != "backbone")
  return counts


class FinetuneTask:
  """GLUE classification / STS-B regression / SQuAD span extraction for
  `mbert_jax.training.loop.run`."""

  stop_field = STOP_FIELD

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.info = validate_config(config)

  def identity(self) -> dict[str, Any]:
    return run_identity(self.config)

  def setup(self, workdir: str, mesh, rules) -> Setup:
    """Reads the initial model, the task's data and the tokenizer (every input error surfaces
    here, before any compile) and builds the one fine-tuning stage."""
    config, info, tc = self.config, self.info, self.config.train
    batch_size = int(config.data.batch_size)
    eval_batch = int(config.data.eval_batch_size) or batch_size
    source = resolve_init(config.init)
    check_model_early(source, config)
    train_examples = load_split(config, info, config.task.train_split,
                                int(config.task.max_train_examples))
    eval_examples = {s: load_split(config, info, s, int(config.task.max_eval_examples))
                     for s in info.eval_splits}

    def corpus() -> list[str]:
      if info.kind == "squad":
        return list(dict.fromkeys(train_examples["context"])) + list(train_examples["question"])
      return [t for field in info.glue.text_fields for t in train_examples[field]]

    tokenizer = resolve_tokenizer(config, source, workdir, corpus)
    m_cfg = finetune_model_config(source, config, tokenizer.get_vocab_size(with_added_tokens=True))
    model = build_model(info, m_cfg, float(config.finetune.classifier_dropout))
    train_split = featurize(config, info, tokenizer, config.task.train_split, train_examples, True)
    eval_splits = [featurize(config, info, tokenizer, s, ex, False)
                   for s, ex in eval_examples.items()]
    total = total_steps(tc, len(train_split), batch_size)
    warmup = (int(tc.warmup_steps) if int(tc.warmup_steps) >= 0
              else int(total * float(tc.warmup_proportion)))
    stop = total if int(tc.stop_at_step) < 0 else min(int(tc.stop_at_step), total)
    opt_cfg = optimizer_config(tc, total, warmup)

    sharding.check_batch_divisible(batch_size, mesh, int(tc.grad_accum_steps))
    sharding.check_batch_divisible(eval_batch, mesh)
    abs_params, p_shardings = abstract_params(model, m_cfg, mesh, rules)
    lr_fn = optim.lr_schedule_from_config(opt_cfg)
    eval_sh = {k: sharding.batch_sharding(mesh, 2) for k in ("input_ids", "token_type_ids",
                                                              "attention_mask")}
    predict_fn = jax.jit(sharding.under_rules(make_predict(model, info), mesh, rules),
                         in_shardings=(p_shardings, eval_sh),
                         out_shardings=sharding.replicated(mesh))
    plan = StagePlan(
        name="finetune", steps=total, tx=optim.build_optimizer(opt_cfg, abs_params),
        loss=make_loss(model, info), learning_rate=lambda s: float(lr_fn(s)),
        banner=(f"fine-tuning {info.name} ({info.kind}): {len(train_split)} training rows, "
                f"{total} steps (warm-up {warmup}), batch {batch_size}, init "
                f"{source.path or 'random'}, seed {int(tc.seed)}"))

    def init_params():
      init_key = jax.random.split(jax.random.key(int(tc.seed)))[0]
      params = init_params_of(model, m_cfg, init_key, p_shardings)
      if source.kind != "random":
        params = {**params, **load_backbone(source, config.init, abs_params, p_shardings)}
      return params

    train_keys = tuple(train_split.arrays)

    def batch_at(step: int) -> dict[str, np.ndarray]:
      rows = local_rows(train_batch_indices(step, batch_size, len(train_split), int(tc.seed)))
      return {k: train_split.arrays[k][rows] for k in train_keys}

    last_eval: dict[str, float] = {}

    def evaluate(params, step: int, final: bool) -> dict[str, float]:
      result = {}
      for split in eval_splits:
        out = predict_split(predict_fn, params, split, eval_batch, mesh)
        if info.kind == "squad":
          metrics, decoded = score_squad(config, info, split, out)
        else:
          metrics, decoded = score_glue(info, split, out["logits"]), None
        for k, v in metrics.items():
          result[f"eval/{split.name}/{k}"] = float(v)
        if final:
          write_predictions(workdir, info, split, out, decoded)
      headline = f"eval/{info.eval_splits[0]}/{info.main_metric}" if info.eval_splits else None
      if headline in result:
        result["eval/score"] = result[headline]
      last_eval.clear()
      last_eval.update(result)
      return result

    def write_side_files(w: str) -> None:
      if not os.path.isdir(os.path.join(w, TOKENIZER_DIR)):
        save_tokenizer(tokenizer, os.path.join(w, TOKENIZER_DIR))

    def report() -> dict[str, Any]:
      return {"task": info.name, "kind": info.kind, "squad_version": info.squad_version,
              "seed": int(tc.seed), "init": source.path or "random",
              "score": last_eval.get("eval/score"), "main_metric": info.main_metric,
              "params": param_counts(abs_params)}

    task_file = {"kind": info.kind, "task": info.name, "num_labels": info.num_labels,
                 "label_names": list(info.glue.label_names or ()) if info.glue else None,
                 "squad_version": info.squad_version,
                 "max_seq_length": int(config.data.max_seq_length),
                 "pooler": m_cfg.classifier_activation, "init": source.path}
    return Setup(
        stages=(plan,), abstract_params=abs_params, param_shardings=p_shardings,
        init_params=init_params, batch_at=batch_at, evaluate=evaluate,
        global_batch_size=batch_size, total_steps=total, stop_step=stop,
        files={CONFIG_FILE: config.to_dict(), MODEL_CONFIG_FILE: m_cfg.to_dict(),
               TASK_FILE: task_file},
        write_side_files=write_side_files, report=report)


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) the configured task in `workdir`; returns the final report.

  Report keys: status (completed | stopped | preempted), step, total_steps, task, seed,
  init, eval (`eval/<split>/<metric>` and `eval/score`, the task's headline number), score,
  main_metric, wall_seconds, params.
  """
  return loop.run(FinetuneTask(config), workdir)
