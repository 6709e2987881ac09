"""Shared by the eval and tokenizer tests: a small SentencePiece tokenizer (the conftest
fixture `spm_tokenizer` holds one), a tiny random model, and the reference log-likelihood computed straight from the model's logits (no adapter code)."""
import inspect
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from configs import tiny
from mobilemoe_jax.data import tokenizer as tokenizer_lib
from mobilemoe_jax.model import Transformer

EVAL_DATA = pathlib.Path(__file__).parents[1] / 'data' / 'eval'


def make_tokenizer(directory) -> tokenizer_lib.Tokenizer:
  """A 512-piece SentencePiece model trained in a second on stdlib docstrings."""
  import collections
  import json as json_mod
  import os
  import re
  texts = [inspect.getdoc(m) or '' for m in (collections, json_mod, os, re, inspect, pathlib)]
  texts += [json.dumps(json.loads(l)) for l in (EVAL_DATA / 'tiny_mc.jsonl').read_text().splitlines()]
  path = tokenizer_lib.train_sentencepiece(texts, str(pathlib.Path(directory) / 'spm.model'),
                                           vocab_size=512)
  return tokenizer_lib.load_tokenizer(path)


def tiny_model(arg: str = 'moe', seed: int = 0):
  return Transformer(tiny.get_config(arg).model, rngs=nnx.Rngs(seed))


# Jitted: run eagerly, every op of the MoE forward compiles again for each new length.
forward_logits = nnx.jit(lambda model, ids: model(ids)[0])


def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
  """sum_i log p(x_i | x_<i) over the continuation tokens, from one plain forward pass.
  Tokens: <bos> + encode(context + continuation); the context is its own encoding's length."""
  whole = [tok.bos_id] + tok.encode(context + continuation)
  n_ctx = 1 + len(tok.encode(context))
  logits = forward_logits(model, np.asarray([whole], np.int32))
  logp = np.asarray(jax.nn.log_softmax(logits[0], -1), np.float64)   # [T, V]
  return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))
