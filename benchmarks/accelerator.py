"""MobileBERT pretraining and distillation steps on one accelerator, at real size, bf16 compute.

    python benchmarks/accelerator.py [--cases=scratch_128,pd_128,...] [--batch=N]
        [--budget_s=280] [--warmup=2] [--steps=5] [--mem_fraction=0.9] [--mem_limit_gib=G]
        [--max_batch=4096] [--probe_threads=4] [--smoke]

Cases, `<kind>_<seq>` (20 masked predictions per sequence at 128, 80 at 512: BERT's 15.6%):
  scratch_S   MobileBERT train step of plain pretraining (the `scratch` stage: MLM + NSP,
              dropout on, as configs/distill_mobilebert.py:preset=scratch trains);
  pd_S        the `pd` stage of the `pkt` schedule: IB-BERT-large teacher forward online (no
              gradient) + MobileBERT forward/backward on MLM + KD + NSP (dropout off, as TF1);
  teacher_S   the IB-BERT-large forward alone as PD runs it (MLM logits at the masked
              positions), at pd_S's batch when pd_S ran, so the two times compare directly;
  pktL_S      PKT phase L (layer-wise transfer of layer L; teacher and student truncated to
              their first L layers, as the loop runs the phase).
Default: scratch_128, pd_128, teacher_128, pkt1_128, pkt24_128, scratch_512, pd_512, teacher_512.
Every train step is the loop's own (`training.make_train_step` on `objective.compute_loss`, LAMB with
the distillation config's optimizer fields, state donated); params, optimizer state and losses
are float32, matmuls bfloat16. Each step is timed from the call to `block_until_ready` with the
batch already on the device; the table shows the median of --steps after --warmup.

Batch (unless --batch): each train case is first compiled (not run) at a small probe batch, in
parallel threads, with GPU autotuning off; its memory plan (arguments + outputs + temporaries -
donated) gives bytes per example, which extrapolates linearly to the largest multiple of 8 whose
plan fits in --mem_fraction of the device's free allocator limit (`memory_stats()`, or
--mem_limit_gib). The compiled plan at that batch is the check: the batch is re-solved from the
last two plans when it does not fit or leaves more than 10% unused (at most three more
compiles, within the deadline); RESOURCE_EXHAUSTED at compile or run halves it. Without a known
limit (CPU) the batch stays fixed at 8.

FLOPs are analytic model FLOPs (`objective.stage_flops`: 2 x multiply-adds of the matmuls,
training = 3 x student forward + teacher forward); MFU divides by the chip's dense bf16 peak
(`metrics.peak_flops`), "n/a" where unknown. Memory is the compiled step's plan (XLA buffer
assignment): the figure the step needs at its peak. --budget_s is a deadline for the whole run:
a case that would not finish in time is skipped and named. The last stdout line is JSON.
`--smoke`: micro presets, sequences 32/64, batch 8, for CPU (tests/test_accelerator_benchmark.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

T_START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# layers: the student preset's depth, known here so bad arguments fail before jax is imported
REAL = dict(student="mobilebert", teacher="ib_bert_large", seqs=(128, 512), batch=8,
            max_batch=4096, max_pos=512, layers=24)
SMOKE = dict(student="mobilebert_micro", teacher="ib_bert_large_micro", seqs=(32, 64), batch=8,
             max_batch=64, max_pos=128, layers=4)
CASE_RE = re.compile(r"^(scratch|pd|teacher|pkt(\d+))_(\d+)$")
MIN_SEQ = 8
GIB = 2.0 ** 30

INCLUDES = {
    "scratch": "one optimizer step: MobileBERT forward + backward (MLM + NSP, dropout on), "
               "LAMB update, non-finite guard",
    "pd": "one optimizer step: IB-BERT-large forward (no gradient) + MobileBERT forward + "
          "backward (MLM + KD + NSP), LAMB update, non-finite guard",
    "pkt": "one optimizer step of phase L: teacher and student forward over their first L "
           "layers, layer-L transfer losses, student backward, LAMB update, non-finite guard",
    "teacher": "IB-BERT-large forward only, MLM logits at the masked positions (as in PD)",
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  kind: str            # scratch | pd | teacher | pkt
  seq: int
  layer: int | None    # pkt phase

  @property
  def preds(self) -> int:
    return max(1, round(self.seq * 20 / 128))

  @property
  def needs_teacher(self) -> bool:
    return self.kind != "scratch"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, no usage block
    self.exit(2, f"{self.prog}: error: {message}\n")


def default_cases(sizes: dict, layers: int) -> list[str]:
  lo, hi = sizes["seqs"]
  return [f"scratch_{lo}", f"pd_{lo}", f"teacher_{lo}", f"pkt1_{lo}", f"pkt{layers}_{lo}",
          f"scratch_{hi}", f"pd_{hi}", f"teacher_{hi}"]


def parse_args(argv=None):
  p = _Parser(prog="accelerator.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default="", help="comma-separated case names (default: all eight)")
  p.add_argument("--batch", type=int, default=0, help="force this batch for every case")
  p.add_argument("--budget_s", type=float, default=280.0,
                 help="deadline for the whole run in seconds, compilation included (0 = none)")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; smoke 1)")
  p.add_argument("--steps", type=int, default=None,
                 help="timed steps per case, median reported (5; smoke 3)")
  p.add_argument("--mem_fraction", type=float, default=0.9,
                 help="fraction of the free device memory a step's plan may use")
  p.add_argument("--mem_limit_gib", type=float, default=0.0,
                 help="device memory to plan for, GiB (default: memory_stats()['bytes_limit'])")
  p.add_argument("--max_batch", type=int, default=0, help="cap on a searched batch")
  p.add_argument("--probe_threads", type=int, default=4, help="parallel probe compiles")
  p.add_argument("--smoke", action="store_true", help="micro presets, seq 32/64, batch 8 (CPU)")
  args = p.parse_args(argv)
  sizes = SMOKE if args.smoke else REAL
  args.warmup = (1 if args.smoke else 2) if args.warmup is None else args.warmup
  args.steps = (3 if args.smoke else 5) if args.steps is None else args.steps
  for name, low in (("batch", 0), ("warmup", 0), ("steps", 1), ("max_batch", 0),
                    ("probe_threads", 1)):
    if getattr(args, name) < low:
      p.error(f"--{name}={getattr(args, name)} must be >= {low}")
  if args.budget_s < 0 or args.mem_limit_gib < 0:
    p.error("--budget_s and --mem_limit_gib must be >= 0")
  if not 0 < args.mem_fraction <= 1:
    p.error(f"--mem_fraction={args.mem_fraction} must be in (0, 1]")
  args.max_batch = args.max_batch or sizes["max_batch"]
  layers = sizes["layers"]
  names = [c.strip() for c in args.cases.split(",") if c.strip()] or default_cases(sizes, layers)
  valid = (", ".join(default_cases(sizes, layers)) + f" (or any scratch|pd|teacher|pkt<1..{layers}>"
           f"_<seq {MIN_SEQ}..{sizes['max_pos']}>)")
  cases = []
  for name in names:
    m = CASE_RE.match(name)
    seq = int(m.group(3)) if m else 0
    layer = int(m.group(2)) if m and m.group(2) else None
    if not m or not MIN_SEQ <= seq <= sizes["max_pos"] or (layer is not None
                                                           and not 1 <= layer <= layers):
      p.error(f"unknown case {name!r}; valid cases: {valid}")
    if name in (c.name for c in cases):
      p.error(f"case {name!r} given twice")
    cases.append(Case(name, "pkt" if layer is not None else m.group(1), seq, layer))
  args.case_list, args.sizes = cases, sizes
  return args


ARGS = parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import synthetic_batch  # noqa: E402
from configs import distill_mobilebert  # noqa: E402

from mbert_jax.models import build, example_inputs
from mbert_jax.training import metrics  # noqa: E402
from mbert_jax.training import optim  # noqa: E402
from mbert_jax.distill import objective  # noqa: E402
from mbert_jax.distill import config as distill_config  # noqa: E402
from mbert_jax.distill import schedule  # noqa: E402
from mbert_jax.training import sharding  # noqa: E402
from mbert_jax import training  # noqa: E402
from mbert_jax.distill import teacher as teacher_lib  # noqa: E402
from mbert_jax.models import build, preset  # noqa: E402
from mbert_jax.models import summary as model_summary  # noqa: E402


def say(*a):
  print(*a, flush=True)


def tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def is_oom(e: BaseException) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


def plan_bytes(compiled) -> int | None:
  """What the compiled program needs at its peak, from XLA's buffer assignment."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - a backend without it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def round8(x: float) -> int:
  return max(8, int(x) // 8 * 8)


class Env:
  """Models, schedules, mesh and the params every case starts from (made once)."""

  def __init__(self, args):
    self.args = args
    sz = args.sizes
    self.device = jax.devices()[0]
    self.mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[self.device])
    self.rules = sharding.DEFAULT_RULES
    self.rep = sharding.replicated(self.mesh)
    size = dict(compute_dtype="bfloat16", max_position_embeddings=sz["max_pos"])
    self.s_cfg, self.t_cfg = preset(sz["student"], **size), preset(sz["teacher"], **size)
    self.s_model, self.t_model = build(self.s_cfg), build(self.t_cfg)
    self.L = self.s_cfg.num_hidden_layers
    assert self.L == sz["layers"], (self.L, sz["layers"])
    # The run configs the loop would read: kt, optimizer fields, dropout, the schedules.
    self.kd_conf = distill_mobilebert.get_config("bf16=True")
    self.scratch_conf = distill_mobilebert.get_config("preset=scratch,bf16=True")
    self.opt_cfg = distill_config.optimizer_config(self.kd_conf)
    self.pkt_stages = distill_config.build_stages(self.kd_conf, self.L)
    self.scratch_stage = distill_config.build_stages(self.scratch_conf, self.L)[0]
    self.plan = teacher_lib.check_transfer(self.kd_conf.kt, self.pkt_stages, self.s_cfg, self.t_cfg,
                                           True)
    self.kt = dict(self.kd_conf.kt.to_dict())
    self.kt.update(num_student_layers=self.L, num_teacher_layers=self.t_cfg.num_hidden_layers)
    _, self.s_abs, self.s_sh = sharding.abstract_params(build(self.s_cfg), example_inputs(self.s_cfg), self.mesh, self.rules)
    _, self.t_abs, self.t_sh = sharding.abstract_params(build(self.t_cfg), example_inputs(self.t_cfg), self.mesh, self.rules)
    self.t_abs = sharding.with_shardings(self.t_abs, self.t_sh)
    proj = teacher_lib.init_transfer_params(self.kd_conf.kt, self.s_cfg, self.t_cfg,
                                            jax.random.fold_in(jax.random.key(0), 1))
    self.projection = None
    if proj is not None:
      self.projection = jax.device_put(proj, self.rep)
    self.platform = self.device.platform
    self.peak = metrics.peak_flops(self.device.device_kind, "bfloat16")
    stats = self._stats()
    self.limit = (args.mem_limit_gib * GIB if args.mem_limit_gib
                  else (stats or {}).get("bytes_limit"))
    self.proto = {}
    self._s_params = self._t_params = None
    self._copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))  # new buffers: the state is donated

  def _stats(self):
    try:
      return self.device.memory_stats()
    except Exception:  # noqa: BLE001
      return None

  def in_use(self) -> int:
    return int((self._stats() or {}).get("bytes_in_use", 0))

  def peak_in_use(self) -> int | None:
    s = self._stats()
    return int(s["peak_bytes_in_use"]) if s and "peak_bytes_in_use" in s else None

  # ---- params (initialised once; each case trains a fresh copy, the state being donated)
  def student_params(self):
    if self._s_params is None:
      self._s_params, _ = sharding.init_params(build(self.s_cfg), example_inputs(self.s_cfg), 0, self.mesh, self.rules)
    return self._s_params

  def teacher_params(self):
    if self._t_params is None:
      self._t_params, _ = sharding.init_params(build(self.t_cfg), example_inputs(self.t_cfg), 1, self.mesh, self.rules)
    return self._t_params

  def fresh_student(self, with_projection: bool):
    pristine = self.student_params()
    params = self._copy(pristine)
    if with_projection and self.projection is not None:
      params = {**params, teacher_lib.PROJECTION_KEY: self._copy(self.projection)}
    return params

  # ---- batches
  def batch_abstract(self, batch: int, seq: int, preds: int) -> dict:
    key = (seq, preds)
    if key not in self.proto:
      self.proto[key] = synthetic_batch(self.s_cfg.vocab_size, 1, seq, preds)
    return {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype,
                                    sharding=sharding.batch_sharding(self.mesh, v.ndim))
            for k, v in self.proto[key].items()}

  def batch_on_device(self, batch: int, seq: int, preds: int) -> dict:
    host = synthetic_batch(self.s_cfg.vocab_size, batch, seq, preds)
    return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim))
            for k, v in host.items()}


class Program:
  """One case's jitted function, its abstract arguments at any batch and its real ones."""

  def __init__(self, env: Env, case: Case):
    self.env, self.case = env, case
    if case.kind == "teacher":
      self._teacher_forward()
    else:
      self._train_step()

  def _teacher_forward(self):
    env = self.env
    model = env.t_model

    def forward(t_params, batch):
      return model.apply({"params": t_params}, batch["input_ids"], batch["token_type_ids"],
                         batch["attention_mask"], masked_positions=batch["masked_lm_positions"],
                         deterministic=True, heads=True, layer_outputs=False).mlm_logits

    proto = env.batch_abstract(8, self.case.seq, self.case.preds)
    b_sh = {k: v.sharding for k, v in proto.items()}
    self.fn = jax.jit(forward, in_shardings=(env.t_sh, b_sh),
                      out_shardings=sharding.batch_sharding(env.mesh, 3))
    self.fixed_bytes = tree_bytes(env.t_abs)
    self.resident_args = self.fixed_bytes  # the teacher's params are on the device already
    self.flops = float(model_summary.forward_flops(env.t_cfg, self.case.seq, None,
                                                   self.case.preds, heads=True))

  def _train_step(self):
    env, case = self.env, self.case
    if case.kind == "scratch":
      stage, dropout, teacher = env.scratch_stage, bool(env.scratch_conf.train.dropout), False
    else:
      stage = env.pkt_stages[-1] if case.kind == "pd" else env.pkt_stages[case.layer - 1]
      dropout, teacher = bool(env.kd_conf.train.dropout), True
    if case.kind == "pd":
      assert stage.name == "pd", stage.name
    ctx = objective.LossContext(env.s_model, env.t_model if teacher else None, stage, env.kt,
                                dropout, plan=env.plan if teacher else None)
    abs_params, p_sh = env.s_abs, env.s_sh
    if teacher and env.projection is not None:
      proj_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), env.projection)
      abs_params = {**abs_params, teacher_lib.PROJECTION_KEY: proj_abs}
      p_sh = {**p_sh, teacher_lib.PROJECTION_KEY: jax.tree.map(lambda _: env.rep, proj_abs)}
    tx = optim.build_optimizer(env.opt_cfg, abs_params,
                               schedule.lr_multiplier_tree(stage, abs_params),
                               lr_schedule=stage.learning_rate)
    plan = training.StagePlan(name=stage.name, steps=stage.steps, tx=tx,
                           loss=lambda p, aux, b, r: objective.compute_loss(ctx, p, aux, b, r),
                           learning_rate=lambda s: float(stage.learning_rate(s)),
                           trained=objective.first_layers_subset(objective.trained_depth(stage, env.L)))
    self.st_sh = training.state.state_shardings(p_sh, tx, abs_params, env.mesh)
    self.abs_state = training.state.abstract_state(self.st_sh, abs_params, tx)
    self.tx, self.teacher = tx, teacher
    proto = env.batch_abstract(8, case.seq, case.preds)
    b_sh = {k: v.sharding for k, v in proto.items()}
    self.fn = jax.jit(training.make_train_step(plan, 0, 1),
                      in_shardings=(self.st_sh, env.t_sh if teacher else None, b_sh),
                      out_shardings=(self.st_sh, env.rep), donate_argnums=(0,))
    self.resident_args = tree_bytes(env.t_abs) if teacher else 0
    self.fixed_bytes = tree_bytes(self.abs_state) + self.resident_args
    self.flops = objective.stage_flops(ctx, env.s_cfg, env.t_cfg if teacher else None, case.seq,
                                      case.preds)

  def abstract_args(self, batch: int):
    b = self.env.batch_abstract(batch, self.case.seq, self.case.preds)
    if self.case.kind == "teacher":
      return (self.env.t_abs, b)
    return (self.abs_state, self.env.t_abs if self.teacher else None, b)

  def lower(self, batch: int):
    return self.fn.lower(*self.abstract_args(batch))

  def compile(self, batch: int, probe: bool = False, lowered=None):
    """(compiled, plan bytes, seconds). A probe skips GPU autotuning: only its plan is read.
    Tracing (`lower`) stays on the calling thread; XLA's compile may run on another."""
    t = time.perf_counter()
    lowered = self.lower(batch) if lowered is None else lowered
    if probe and self.env.platform == "gpu":
      try:
        compiled = lowered.compile(compiler_options={"xla_gpu_autotune_level": 0})
      except Exception as e:  # noqa: BLE001 - an XLA without the option: compile plainly
        if is_oom(e):
          raise
        compiled = lowered.compile()
    else:
      compiled = lowered.compile()
    need = plan_bytes(compiled)
    if need is not None:  # jit drops arguments the step never reads: count what it keeps
      batch_bytes = tree_bytes(self.abstract_args(batch)[-1])
      kept = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
      self.fixed_bytes = min(self.fixed_bytes, max(0, int(kept)))
    return compiled, need, time.perf_counter() - t

  def timed_run(self, compiled, batch: int, warmup: int, steps: int):
    env, case = self.env, self.case
    data = env.batch_on_device(batch, case.seq, case.preds)
    out = None
    if case.kind == "teacher":
      t_params = env.teacher_params()

      def call():
        nonlocal out
        out = None
        out = compiled(t_params, data)
        return out
    else:
      params = env.fresh_student(self.teacher)
      zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), env.rep)
      opt_state = jax.jit(self.tx.init, out_shardings=self.st_sh.opt_state)(params)
      state = training.TrainState(step=zero(), params=params, opt_state=opt_state,
                               nonfinite=zero(), skipped=zero())
      aux = env.teacher_params() if self.teacher else None
      del params, opt_state

      def call():
        nonlocal state, out
        state, out = compiled(state, aux, data)
        return state, out
    jax.block_until_ready(data)
    times = []
    for i in range(warmup + steps):
      t = time.perf_counter()
      jax.block_until_ready(call())
      if i >= warmup:
        times.append(time.perf_counter() - t)
    extra = {}
    if case.kind != "teacher":
      extra = {"loss": float(out["loss"]), "finite_last_step": bool(out["finite"] > 0),
               "skipped_steps": int(state.skipped)}
      state = None
    out = data = None
    gc.collect()
    return times, extra


class Runner:
  def __init__(self, env: Env, args):
    self.env, self.args = env, args
    self.deadline = T_START + args.budget_s if args.budget_s else float("inf")
    self.results: dict[str, dict] = {}
    self.skipped: list[dict] = []
    self.failed: list[dict] = []
    self.durations: dict[str, list[float]] = {}
    self.programs: dict[str, Program] = {}
    self.probes: dict[str, tuple] = {}
    self.allowed: dict[str, float] = {}
    self.run_reserve = 1.0 if args.smoke else 10.0  # seconds a timed run may take

  def probe_batch(self, case: Case) -> int:
    if self.args.smoke:
      return 8
    return min(64, max(8, 8192 // case.seq // 8 * 8))

  def needs_search(self, case: Case) -> bool:
    if self.args.batch or self.env.limit is None:
      return False
    if case.kind == "teacher":
      pd = [c for c in self.args.case_list if c.kind == "pd" and c.seq == case.seq]
      return not pd
    return True

  def program(self, case: Case) -> Program:
    if case.name not in self.programs:
      self.programs[case.name] = Program(self.env, case)
    return self.programs[case.name]

  def run_probes(self):
    """Compile every searched case at its probe batch (threads: XLA compiles without the GIL)."""
    todo = [c for c in self.args.case_list if self.needs_search(c)]
    if not todo:
      return
    t = time.perf_counter()
    def job(case, prog, b0, lowered):
      try:
        _, need, secs = prog.compile(b0, probe=True, lowered=lowered)
        return b0, need, secs
      except Exception as e:  # noqa: BLE001
        return "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"

    futures = {}
    with ThreadPoolExecutor(max_workers=self.args.probe_threads) as pool:
      for case in todo:  # traced here, one at a time, while the pool compiles the ones before
        try:
          prog = self.program(case)
          b0 = self.probe_batch(case)
          futures[case.name] = pool.submit(job, case, prog, b0, prog.lower(b0))
        except Exception as e:  # noqa: BLE001
          self.probes[case.name] = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
      for name, fut in futures.items():
        self.probes[name] = fut.result()
    say(f"probe compiles for the batch search: {len(todo)} cases in "
        f"{time.perf_counter() - t:.1f} s ({self.args.probe_threads} threads)")

  # ---- batch choice
  def allowed_bytes(self, prog: Program) -> float:
    """Bytes the case's step plan may take: a fraction of the limit, less what else is resident."""
    resident_other = 0  # a given --mem_limit_gib is the step's alone
    if not self.args.mem_limit_gib:
      resident_other = max(0, self.env.in_use() - prog.resident_args)
    return self.args.mem_fraction * self.env.limit - resident_other

  def solve(self, prog: Program, allowed: float, points: list[tuple[int, int]]) -> int:
    """Largest multiple of 8 within `allowed` by a line through the plan sizes measured."""
    if len(points) >= 2 and points[-1][0] != points[-2][0]:
      (b1, n1), (b2, n2) = points[-2], points[-1]
      slope = (n2 - n1) / (b2 - b1)
      base = n1 - slope * b1
    else:  # one point: everything but the fixed arguments counted per example (an upper bound)
      b1, n1 = points[-1]
      base = prog.fixed_bytes
      slope = (n1 - base) / b1
    if slope <= 0:
      return self.args.max_batch
    return min(self.args.max_batch, round8((allowed - base) / slope))

  def refine(self, prog: Program, compiled, need: int, batch: int, points: list, notes: list,
             compile_s: float):
    """The compiled plan is the check: re-solve the batch from the last two plans when it does
    not fit, or when it leaves more than 10% (and 16 examples) unused and time allows; keep the
    largest compiled batch that fits."""
    allowed, spent = self.allowed_bytes(prog), 0.0
    self.allowed[prog.case.name] = allowed
    best = (batch, compiled, need) if need <= allowed else None
    tried = {batch}
    for _ in range(3):
      points.append((batch, need))
      cand = self.solve(prog, allowed, points)
      if best is None:  # nothing fits yet: smaller
        if batch <= 8:
          break
        cand = min(cand, round8(batch - 8))
      elif not (cand > best[0] * 1.1 and cand - best[0] >= 16 and cand not in tried
                and time.perf_counter() + 1.5 * compile_s + self.run_reserve < self.deadline):
        break
      batch = cand
      tried.add(batch)
      compiled, need, compile_s = prog.compile(batch)
      spent += compile_s
      if need <= allowed and (best is None or batch > best[0]):
        best = (batch, compiled, need)
    if best is None:
      notes.append(f"plan {gib(need)} GiB exceeds the target {gib(allowed)} GiB at batch {batch}")
    else:
      batch, compiled, need = best
    points.append((batch, need))
    return compiled, need, batch, spent

  def initial_batch(self, case: Case, prog: Program, notes: list[str]):
    if self.args.batch:
      return self.args.batch, "forced", []
    if case.kind == "teacher":
      pd = self.results.get(f"pd_{case.seq}")
      if pd:
        return pd["batch"], f"pd_{case.seq}", []
      if self.env.limit is None:
        return self.args.sizes["batch"], "fixed", []
    if self.env.limit is None:
      return self.args.sizes["batch"], "fixed", []
    probe = self.probes.get(case.name)
    if probe is None:  # not probed up front (a teacher case whose pd case did not run)
      b0 = self.probe_batch(case)
      _, need, _ = prog.compile(b0, probe=True)
      probe = (b0, need, 0.0)
    if probe[0] == "error":
      raise RuntimeError(f"probe compile failed: {probe[1]}")
    b0, need, _ = probe
    if need is None:
      notes.append("the backend gives no memory plan: batch fixed")
      return self.args.sizes["batch"], "fixed", []
    points = [(b0, need)]
    return self.solve(prog, self.allowed_bytes(prog), points), "search", points

  def run_case(self, case: Case) -> dict:
    args = self.args
    t0 = time.perf_counter()
    notes: list[str] = []
    prog = self.program(case)
    batch, source, points = self.initial_batch(case, prog, notes)
    compile_s = 0.0
    while True:
      try:
        compiled, need, secs = prog.compile(batch)
        compile_s += secs
        if source == "search" and need is not None:
          compiled, need, batch, secs = self.refine(prog, compiled, need, batch, points, notes,
                                                       secs)
          compile_s += secs
        times, extra = prog.timed_run(compiled, batch, args.warmup, args.steps)
        break
      except Exception as e:  # noqa: BLE001
        if not is_oom(e) or batch <= 8:
          raise
        notes.append(f"out of memory at batch {batch}: halved")
        batch = round8(batch // 2)
        source = source if source.endswith("(halved)") else source + " (halved)"
        compiled = None
        gc.collect()
    step = statistics.median(times)
    flop_s = prog.flops * batch / step
    mfu = flop_s / self.env.peak if self.env.peak else None
    return {"case": case.name, "kind": case.kind, "seq": case.seq, "predictions": case.preds,
            "layer": case.layer, "batch": batch, "batch_source": source,
            "step_s": step, "step_s_all": times, "examples_per_s": batch / step,
            "flops_per_example": prog.flops, "model_flop_per_s": flop_s, "mfu": mfu,
            "plan_bytes": need, "mem_limit_bytes": self.env.limit,
            "process_peak_bytes": self.env.peak_in_use(),
            "search": ({"probe_batch": points[0][0], "probe_plan_bytes": points[0][1],
                        "target_bytes": self.allowed.get(case.name),
                        "plans": [list(p) for p in dict.fromkeys(points)]} if points else None),
            "compile_s": compile_s, "case_wall_s": time.perf_counter() - t0,
            "includes": re.sub(r"\bL\b", str(case.layer), INCLUDES[case.kind]),
            **extra, "notes": notes}

  def estimate(self, case: Case) -> float:
    same = self.durations.get(case.kind)
    if same:
      return max(same)
    every = [d for ds in self.durations.values() for d in ds]
    return statistics.mean(every) if every else 0.0

  def run(self):
    for case in self.args.case_list:
      now = time.perf_counter()
      est = self.estimate(case)
      if now + est > self.deadline:
        reason = (f"budget: {now - T_START:.0f} s of {self.args.budget_s:.0f} s used, case "
                  f"estimated {est:.0f} s")
        self.skipped.append({"case": case.name, "reason": reason})
        say(f"{case.name:<13} skipped ({reason})")
        continue
      try:
        r = self.run_case(case)
      except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self.failed.append({"case": case.name, "error": msg})
        say(f"{case.name:<13} FAILED {msg}")
        gc.collect()
        continue
      self.results[case.name] = r
      self.durations.setdefault(case.kind, []).append(time.perf_counter() - now)
      say(f"{case.name:<13} batch {r['batch']:>5} ({r['batch_source']}): {r['step_s'] * 1e3:.1f} "
          f"ms/step, {r['examples_per_s']:.1f} ex/s, compile {r['compile_s']:.1f} s, case "
          f"{r['case_wall_s']:.1f} s")


def fmt(x, spec, scale=1.0, suffix=""):
  return "n/a" if x is None else f"{x * scale:{spec}}{suffix}"


def gib(x) -> str:
  return "n/a" if x is None else f"{x / GIB:.3g}"


def table(env: Env, results: list[dict]) -> list[str]:
  head = (f"{'case':<12} {'batch':>6} {'source':<10} {'step ms':>9} {'ex/s':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'mem GiB':>8} {'mem %':>6} {'compile s':>9}")
  lines = [head, "-" * len(head)]
  for r in results:
    mem_pct = r["plan_bytes"] / env.limit if env.limit and r["plan_bytes"] is not None else None
    lines.append(
        f"{r['case']:<12} {r['batch']:>6} {r['batch_source'].split(' ')[0]:<10} "
        f"{r['step_s'] * 1e3:>9.1f} {r['examples_per_s']:>9.1f} "
        f"{r['model_flop_per_s'] / 1e12:>8.3g} {fmt(r['mfu'], '.1%'):>6} "
        f"{gib(r['plan_bytes']):>8} {fmt(mem_pct, '.0%'):>6} "
        f"{r['compile_s']:>9.1f}")
  return lines


def hints(env: Env, res: dict[str, dict]) -> list[str]:
  """What the measurements themselves say about where the time goes (nothing assumed)."""
  out = []
  for seq in sorted({r["seq"] for r in res.values()}):
    pd, te = res.get(f"pd_{seq}"), res.get(f"teacher_{seq}")
    if pd and te and pd["batch"] == te["batch"]:
      t_share = te["step_s"] / pd["step_s"]
      f_share = te["flops_per_example"] / pd["flops_per_example"]
      line = (f"seq {seq}: the teacher forward alone takes {t_share:.0%} of the PD step's time "
              f"for {f_share:.0%} of its model FLOPs")
      rest_t = pd["step_s"] - te["step_s"]
      if rest_t > 0:
        rest = (pd["flops_per_example"] - te["flops_per_example"]) * pd["batch"] / rest_t
        line += (f"; the rest of the step (student forward + backward, losses, LAMB) runs at "
                 f"{rest / 1e12:.3g} TFLOP/s vs the teacher forward's "
                 f"{te['model_flop_per_s'] / 1e12:.3g}")
        if env.peak:
          line += f" (MFU {rest / env.peak:.1%} vs {te['mfu']:.1%})"
      else:
        line += " (no time left for the rest of the step: noise or overlap; rerun)"
      out.append(line)
    pk = sorted((r for r in res.values() if r["kind"] == "pkt" and r["seq"] == seq),
                key=lambda r: r["layer"])
    if len(pk) >= 2:
      lo, hi = pk[0], pk[-1]
      t_ratio = (lo["step_s"] / lo["batch"]) / (hi["step_s"] / hi["batch"])
      f_ratio = lo["flops_per_example"] / hi["flops_per_example"]
      line = (f"seq {seq}: PKT phase {lo['layer']} takes {t_ratio:.0%} of phase {hi['layer']}'s "
              f"time per example for {f_ratio:.0%} of its model FLOPs")
      if env.peak:
        line += f" (MFU {lo['mfu']:.1%} vs {hi['mfu']:.1%})"
      out.append(line)
  return out


def main():
  args = ARGS
  env = Env(args)
  d = env.device
  say(f"accelerator benchmark{' (smoke)' if args.smoke else ''}: {d.device_kind} ({d.platform}, "
      f"{jax.device_count()} device(s), 1 used), jax {jax.__version__}, "
      f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
  millions = lambda cfg: model_summary.param_table(cfg)["total"] / 1e6
  say(f"student {args.sizes['student']} ({millions(env.s_cfg):.1f}M params), teacher "
      f"{args.sizes['teacher']} ({millions(env.t_cfg):.1f}M); bf16 matmuls, fp32 params, "
      f"optimizer state and losses; {env.opt_cfg.name.upper()}; 1-device mesh")
  say(f"dense bf16 peak: {fmt(env.peak, '.0f', 1e-12, ' TFLOP/s')}; memory limit: "
      f"{gib(env.limit) + ' GiB' if env.limit else 'n/a'}"
      f"{' (--mem_limit_gib)' if args.mem_limit_gib else ''}; batch search target "
      f"{args.mem_fraction:.0%} of the free memory"
      + (f"; XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']}"
         if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ else ""))
  say(f"cases: {', '.join(c.name for c in args.case_list)}; {args.warmup} warm-up + {args.steps} "
      "timed steps each; " + (f"deadline {args.budget_s:.0f} s" if args.budget_s
                               else "no deadline"))
  if env.limit is None and not args.batch:
    say(f"batch: fixed at {args.sizes['batch']} (no device memory limit known; --batch or "
        "--mem_limit_gib to choose)")
  runner = Runner(env, args)
  if time.perf_counter() < runner.deadline:  # params every case starts from, made once
    if any(c.needs_teacher for c in args.case_list):
      env.teacher_params()
    if any(c.kind != "teacher" for c in args.case_list):
      env.student_params()
    runner.run_probes()
  runner.run()
  res = [runner.results[c.name] for c in args.case_list if c.name in runner.results]
  say("")
  for line in table(env, res):
    say(line)
  say("each step is timed from the call to block_until_ready, batch on the device, median of "
      f"{args.steps}; mem = the compiled step's peak memory plan (arguments + outputs + "
      "temporaries - donated); TFLOP/s and MFU from analytic model FLOPs. Each time includes:")
  for kind in dict.fromkeys(r["kind"] for r in res):
    say(f"  {kind:<8} {INCLUDES[kind]}")
  for r in res:
    for n in r["notes"]:
      say(f"note {r['case']}: {n}")
  for s in runner.skipped:
    say(f"skipped {s['case']}: {s['reason']}")
  for f in runner.failed:
    say(f"failed {f['case']}: {f['error']}")
  found = hints(env, runner.results)
  if found:
    say("what limits MFU (from the measurements above):")
    for h in found:
      say(f"  {h}")
  wall = time.perf_counter() - T_START
  peak = env.peak_in_use()
  say(f"total wall time {wall:.1f} s" + (f"; device allocator peak over the run {gib(peak)} GiB"
                                         if peak is not None else ""))
  print(json.dumps({
      "benchmark": "accelerator", "smoke": args.smoke, "device_kind": d.device_kind,
      "platform": d.platform, "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "student": args.sizes["student"], "teacher": args.sizes["teacher"],
      "compute_dtype": "bfloat16", "optimizer": env.opt_cfg.name, "peak_flops": env.peak,
      "mem_limit_bytes": env.limit, "mem_fraction": args.mem_fraction,
      "max_batch": args.max_batch, "budget_s": args.budget_s, "wall_s": wall,
      "process_peak_bytes": env.peak_in_use(), "cases": res, "skipped": runner.skipped,
      "failed": runner.failed, "hints": found}), flush=True)
  return 1 if runner.failed else 0


if __name__ == "__main__":
  sys.exit(main())
