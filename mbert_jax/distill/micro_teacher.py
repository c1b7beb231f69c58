"""Micro ModernBERT/EuroBERT teachers made on the spot, for the offline `,smoke` presets:
`teacher.checkpoint = "micro:<modern preset>"` becomes, in the run's workdir, a Hugging Face
masked-LM directory of that preset, randomly initialised, beside a byte-level BPE
tokenizer.json trained on the built-in corpus (its vocabulary is the student's).

A random teacher teaches nothing worth learning: these exist so that every code path of a
full-size preset (the tokenizer, the shapes, the transfer terms, no NSP) runs on a CPU in
seconds. Pretrain one first (configs/modernbert_teacher.py) for a teacher worth distilling.
"""

from __future__ import annotations

import itertools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from mbert_jax.data import bpe
from mbert_jax.data.builtin_corpus import iter_builtin_documents
from mbert_jax.data.tokenizer import save_tokenizer
from mbert_jax.interop import hf_export
from mbert_jax.models import build, modern_preset

PREFIX = "micro:"
DIRECTORY = "micro_teacher"
# Documents the BPE is trained on: enough for a 1k vocabulary, seconds on one core.
TRAINING_DOCUMENTS = 400
SEED = 0


def is_micro(spec: str) -> bool:
  return str(spec).startswith(PREFIX)


def _texts():
  return (d.text for d in itertools.islice(iter_builtin_documents(), TRAINING_DOCUMENTS))


def materialize(spec: str, workdir: str, data_cfg) -> str:
  """The directory of the micro teacher `spec` names, written once into `workdir`."""
  name = spec[len(PREFIX):]
  cfg = modern_preset(name)
  directory = os.path.join(workdir, DIRECTORY)
  if os.path.isfile(os.path.join(directory, "config.json")):
    return directory
  tok = bpe.train_bpe(_texts(), cfg.vocab_size, cfg.family)
  specials = bpe.SPECIALS[cfg.family]
  mask = next(t for t in specials if "MASK" in t.upper())
  pad = next(t for t in specials if "PAD" in t.upper())
  cfg = cfg.replace(vocab_size=tok.get_vocab_size(with_added_tokens=True),
                    mask_token_id=tok.token_to_id(mask), pad_token_id=tok.token_to_id(pad),
                    max_position_embeddings=max(cfg.max_position_embeddings,
                                                int(data_cfg.max_seq_length)))
  model = build(cfg)
  params = nn.unbox(model.init(jax.random.key(SEED), jnp.zeros((1, 4), jnp.int32),
                               masked_positions=jnp.zeros((1, 1), jnp.int32))["params"])
  tmp = directory + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  save_tokenizer(tok, tmp)  # the files AutoTokenizer reads, like a checkpoint from the hub
  hf_export.save_modern(cfg, params, tmp)
  os.replace(tmp, directory)
  logging.warning("teacher: a RANDOM micro %s (%s) with a %d-token BPE vocabulary, written to "
                  "%s: it exercises the code paths, it teaches nothing", cfg.family, name,
                  cfg.vocab_size, directory)
  return directory


__all__ = ["DIRECTORY", "PREFIX", "is_micro", "materialize"]
