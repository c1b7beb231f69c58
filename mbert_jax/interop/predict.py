"""Run an exported fine-tuned model on text: labels for GLUE-style classifiers, scores for
regression, answers for SQuAD-style span extractors.

    python -m mbert_jax.predict --model=exports/sst2-onnx --text="a gentle, lovely film"
    python -m mbert_jax.predict --model=exports/mrpc-onnx --text="..." --text_pair="..."
    python -m mbert_jax.predict --model=exports/squad-flax --text="Who keeps it ?" \
        --context="The tower's keeper is Anna ."
    python -m mbert_jax.predict --model=exports/sst2-onnx --file=sentences.txt

`--model` is a `python -m mbert_jax.export` directory in the onnx or flax format: its task.json
says what the model does and how the run encoded text (sequence length, casing), its
tokenizer files encode the input. `--backend=auto` takes ONNX Runtime when the directory holds
model.onnx, else Flax. `--file` reads one example per line; pair tasks and question answering
separate the two parts with a tab (`text<TAB>pair`, `question<TAB>context`).

Output: one tab-separated line per example (label, probability, text; score, text; answer,
probability, question), or JSON lines with `--json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mbert_jax import cli
from mbert_jax.data.tokenizer import FINETUNE_SPECIAL_TOKENS, load_tokenizer
from mbert_jax.finetune import glue, squad
from mbert_jax.interop import onnx_export
from mbert_jax.interop.export_files import FLAX_PARAMS_FILE, ONNX_FILE, TASK_FILE
from mbert_jax.interop.model_source import load_flax
from mbert_jax.interop.hf_names import CONFIG_NAME
from mbert_jax.models import build_classifier, build_span_extractor

BACKENDS = ("auto", "onnx", "flax")
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class Example:
  text: str
  pair: str | None = None     # second sentence, or the context for question answering


@dataclasses.dataclass
class Model:
  path: str
  backend: str                # onnx | flax
  task: dict[str, Any]        # the export's task.json
  tokenizer: Any              # tokenizers.Tokenizer
  forward: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


# ---------------------------------------------------------------------------- loading
def read_task(path: str) -> dict[str, Any]:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--model={path}: no such directory")
  task_path = os.path.join(path, TASK_FILE)
  if not os.path.isfile(task_path):
    raise ValueError(f"--model={path} is not an export of a fine-tuned model (no {TASK_FILE}); "
                     "predict runs classification and question-answering exports made with "
                     "`python -m mbert_jax.export --format=onnx|flax`")
  with open(task_path) as f:
    task = json.load(f)
  if task.get("head") not in ("classification", "question_answering"):
    raise ValueError(f"{task_path}: head {task.get('head')!r} is neither classification nor "
                     "question_answering")
  return task


def _tokenizer(path: str, lower_case: bool):
  """The export's tokenizer.json (preferred) or vocab.txt, read as the fine-tuning run read it."""
  try:
    return load_tokenizer(path, lower_case=lower_case, require=FINETUNE_SPECIAL_TOKENS,
                          setting="--model")
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--model={path} has no tokenizer (tokenizer.json or vocab.txt), "
                            "so text cannot be encoded: export from a run that has tokenizer/, "
                            "or copy its tokenizer files into the directory") from e


def choose_backend(path: str, backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"--backend={backend!r}: choose one of {', '.join(BACKENDS)}")
  has_onnx = os.path.isfile(os.path.join(path, ONNX_FILE))
  has_flax = os.path.isfile(os.path.join(path, FLAX_PARAMS_FILE))
  if backend == "auto":
    if not (has_onnx or has_flax):
      is_hf = os.path.isfile(os.path.join(path, CONFIG_NAME))
      hint = (": it is a Hugging Face export, load it with transformers, or export the run "
              "with --format=onnx or --format=flax" if is_hf else "")
      raise FileNotFoundError(f"--model={path} holds neither {ONNX_FILE} nor "
                              f"{FLAX_PARAMS_FILE}{hint}")
    return "onnx" if has_onnx else "flax"
  if backend == "onnx" and not has_onnx:
    raise FileNotFoundError(f"--backend=onnx: {path} has no {ONNX_FILE} (export with "
                            "--format=onnx)")
  if backend == "flax" and not has_flax:
    raise FileNotFoundError(f"--backend=flax: {path} has no {FLAX_PARAMS_FILE} (export with "
                            "--format=flax)")
  return backend


def onnx_forward(path: str, threads: int | None = None) -> Callable:
  try:
    sess = onnx_export.session(os.path.join(path, ONNX_FILE), threads)
  except ImportError as e:
    raise ValueError(f"ONNX Runtime is not installed: pip install 'mbert-jax[onnx]' ({e})") from e
  return lambda batch: onnx_export.run_session(sess, batch)


def flax_forward(path: str, task: dict[str, Any]) -> Callable:
  cfg, params = load_flax(path)
  cfg = cfg.replace(compute_dtype="float32")
  if task["head"] == "classification":
    model = build_classifier(cfg, int(task["num_labels"]), 0.0)
  else:
    model = build_span_extractor(cfg)
  apply = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m))

  def forward(batch):
    out = apply(params, *(jnp.asarray(batch[k], jnp.int32) for k in INPUT_NAMES))
    if task["head"] == "classification":
      return {"logits": np.asarray(out)}
    return {"start_logits": np.asarray(out[0]), "end_logits": np.asarray(out[1])}

  return forward


def load(path: str, backend: str = "auto", threads: int | None = None) -> Model:
  task = read_task(path)
  backend = choose_backend(path, backend)
  tokenizer = _tokenizer(path, bool(task.get("lower_case", True)))
  forward = onnx_forward(path, threads) if backend == "onnx" else flax_forward(path, task)
  return Model(path, backend, task, tokenizer, forward)


# ---------------------------------------------------------------------------- inputs
def parse_lines(lines: Sequence[str], needs_pair: bool, where: str) -> list[Example]:
  """One example per non-empty line; `text<TAB>pair` where the task takes two parts."""
  out = []
  for n, line in enumerate(lines, 1):
    line = line.rstrip("\n").rstrip("\r")
    if not line.strip():
      continue
    parts = line.split("\t")
    if needs_pair and len(parts) != 2:
      raise ValueError(f"{where} line {n}: expected two tab-separated parts, found "
                       f"{len(parts)}")
    if not needs_pair and len(parts) != 1:
      raise ValueError(f"{where} line {n}: this task takes one text per line, found "
                       f"{len(parts)} tab-separated parts")
    out.append(Example(parts[0], parts[1] if needs_pair else None))
  if not out:
    raise ValueError(f"{where} holds no examples")
  return out


def needs_pair(task: dict[str, Any]) -> bool:
  return task["head"] == "question_answering" or len(task.get("text_fields") or ()) == 2


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield slice(start, min(start + size, n))


def _run(model: Model, arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  outs: dict[str, list[np.ndarray]] = {}
  for rows in _batches(arrays["input_ids"].shape[0], batch_size):
    for k, v in model.forward({k: arrays[k][rows] for k in INPUT_NAMES}).items():
      outs.setdefault(k, []).append(np.asarray(v, np.float32))
  return {k: np.concatenate(v) for k, v in outs.items()}


# ---------------------------------------------------------------------------- outputs
def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def classify(model: Model, examples: Sequence[Example], batch_size: int = 32
             ) -> list[dict[str, Any]]:
  t = model.task
  pairs = [e.pair for e in examples] if needs_pair(t) else None
  enc = glue.encode_pairs(model.tokenizer, [e.text for e in examples], pairs,
                           int(t["max_seq_length"]))
  logits = _run(model, enc, batch_size)["logits"]
  if int(t["num_labels"]) == 1:
    return [{"score": float(v)} for v in logits[:, 0]]
  names = t.get("label_names") or [str(i) for i in range(logits.shape[-1])]
  probs = _softmax(logits.astype(np.float64))
  return [{"label": names[int(i)], "label_id": int(i), "probability": float(p[i])}
          for i, p in zip(probs.argmax(-1), probs)]


def answer(model: Model, examples: Sequence[Example], batch_size: int = 32
           ) -> list[dict[str, Any]]:
  t = model.task
  rows = [{"id": str(i), "question": e.text, "context": e.pair,
           "answers": {"text": [], "answer_start": []}} for i, e in enumerate(examples)]
  v2 = t.get("squad_version") == "2.0"
  # Questions come without gold answers here; the flag only governs labels, which go unused.
  feats = squad.prepare_squad_features(
      rows, model.tokenizer, max_seq_length=int(t["max_seq_length"]),
      doc_stride=int(t["doc_stride"]), max_query_length=int(t["max_query_length"]),
      version_2_with_negative=True, is_training=False)
  out = _run(model, feats.model_inputs(), batch_size)
  decoded = squad.postprocess_squad_predictions(
      rows, feats, out["start_logits"], out["end_logits"], n_best_size=int(t["n_best_size"]),
      max_answer_length=int(t["max_answer_length"]), version_2_with_negative=v2,
      null_score_diff_threshold=float(t["null_score_diff_threshold"]))
  results = []
  for row in rows:
    text = decoded.predictions[row["id"]]
    best = next((c for c in decoded.nbest.get(row["id"], []) if c["text"] == text), None)
    results.append({"answer": text,
                    "probability": float(best["probability"]) if best else float("nan")})
  return results


def predict(model: Model, examples: Sequence[Example], batch_size: int = 32
            ) -> list[dict[str, Any]]:
  if model.task["head"] == "classification":
    return classify(model, examples, batch_size)
  for i, e in enumerate(examples):
    if not e.pair:
      raise ValueError(f"example {i + 1}: question answering needs a context (--context, or "
                       "question<TAB>context lines in --file)")
  return answer(model, examples, batch_size)


def format_line(example: Example, result: dict[str, Any]) -> str:
  if "label" in result:
    return f"{result['label']}\t{result['probability']:.4f}\t{example.text}"
  if "score" in result:
    return f"{result['score']:.4f}\t{example.text}"
  return f"{result['answer'] or '(no answer)'}\t{result['probability']:.4f}\t{example.text}"


# ---------------------------------------------------------------------------- command
def examples_from_flags(task: dict[str, Any], text: str | None, pair: str | None,
                        file: str | None) -> list[Example]:
  if (text is None) == (file is None):
    raise ValueError("give either --text (one example) or --file (one example per line)")
  two = needs_pair(task)
  if file is not None:
    if pair is not None:
      raise ValueError("--text_pair/--context go with --text; in --file put them after a tab")
    with open(file, encoding="utf-8") as f:
      return parse_lines(f.readlines(), two, file)
  if two and pair is None:
    flag = "--context" if task["head"] == "question_answering" else "--text_pair"
    raise ValueError(f"{task['task']} takes two parts: give {flag} with --text")
  if not two and pair is not None:
    raise ValueError(f"{task['task']} takes one text; drop --text_pair/--context")
  return [Example(text, pair)]


def main(argv=None):
  from absl import app, flags

  flags.DEFINE_string("model", None, "an export directory (onnx or flax format)")
  flags.DEFINE_string("text", None, "one input text (the question for question answering)")
  flags.DEFINE_string("text_pair", None, "the second sentence of a pair task")
  flags.DEFINE_string("context", None, "the passage to answer from (question answering)")
  flags.DEFINE_string("file", None, "a file with one example per line (parts tab-separated)")
  flags.DEFINE_string("backend", "auto", "auto | onnx (ONNX Runtime) | flax")
  flags.DEFINE_integer("batch_size", 32, "examples per forward pass")
  flags.DEFINE_integer("threads", 0, "ONNX Runtime intra-op threads (0: its default)")
  flags.DEFINE_bool("json", False, "print JSON lines instead of tab-separated text")
  flags.mark_flags_as_required(["model"])
  FLAGS = flags.FLAGS

  def run(_):
    def go():
      if FLAGS.text_pair is not None and FLAGS.context is not None:
        raise ValueError("give --text_pair or --context, not both")
      if FLAGS.batch_size < 1:
        raise ValueError(f"--batch_size={FLAGS.batch_size} must be >= 1")
      pair = FLAGS.context if FLAGS.context is not None else FLAGS.text_pair
      task = read_task(FLAGS.model)
      examples = examples_from_flags(task, FLAGS.text, pair, FLAGS.file)
      model = load(FLAGS.model, FLAGS.backend, FLAGS.threads or None)
      return examples, predict(model, examples, FLAGS.batch_size)

    examples, results = cli.guarded(go)
    for e, r in zip(examples, results):
      if FLAGS.json:
        print(json.dumps({"text": e.text, **({"pair": e.pair} if e.pair else {}), **r}))
      else:
        print(format_line(e, r))

  app.run(run, argv)


if __name__ == "__main__":
  main()
