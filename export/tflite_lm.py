"""The lm_eval backend on an exported `.tflite`: the quantized on-device model, same harness.

  lm = TFLiteLM('model.tflite', tokenizer)          # or --backend=tflite on the CLI
  lm_eval ... --model mobilemoe-tflite --model_args path=model.tflite,tokenizer=tok.model

The interpreter is export.runner.LiteRTLM (the exporter's runner on ai_edge_litert):
`prefill_<T>` and `decode` signatures over an external KV cache, batch 1. Its contract, all
this backend relies on:

  runner.reset()                 empty the KV cache
  runner.prefill(ids) -> [n, V]  append ids to the cache; logits after each of them
                                 (a file exported with --prefill-logits all, the default)
  runner.decode(id)   -> [V]     append one id; the next-token logits
  runner.kv / runner.pos         the cache (views) and its fill (copied to reuse a shared
                                 context; assigning a dict of arrays copies them back in)
  runner.kv_len                  cache length = the longest sequence it can score

Multiple-choice requests repeat one context for every choice; the context is prefilled once
and its cache reused, which makes the per-sequence interpreter affordable.
"""
import numpy as np
from lm_eval.api.registry import register_model

from mobilemoe_jax.eval.base import TokenLM


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)  # sums over long continuations: keep the rounding out of them
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@register_model('mobilemoe-tflite')
class TFLiteLM(TokenLM):

  def __init__(self, path=None, tokenizer=None, *, runner=None, num_threads: int = 2,
               max_gen_toks: int = 256, delegate: bool = False, seed: int = 0, **unused):
    if tokenizer is None:
      raise ValueError('TFLiteLM needs a tokenizer (a path or a loaded Tokenizer)')
    if isinstance(tokenizer, str):
      from mobilemoe_jax.data.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(tokenizer)
    if runner is None:
      if path is None:
        raise ValueError('TFLiteLM needs path=model.tflite (or a runner)')
      from export.runner import LiteRTLM, needs_delegate
      dlg = None
      if delegate or needs_delegate(str(path)):   # MobileMoeBlock / MobileKvAttention ops
        from export import delegate as delegate_lib
        dlg = delegate_lib.load()
      runner = LiteRTLM(str(path), int(num_threads), dlg)
    if getattr(runner, 'prefill_logits', 'all') != 'all':
      raise ValueError(f'{path or "the runner"}: a .tflite exported with --prefill-logits last '
                       '(prefill returns only the last token\'s logits); scoring needs every '
                       'position: export with --prefill-logits all (the default)')
    super().__init__(tokenizer, runner.kv_len, max_gen_toks)
    self.runner = runner
    self.rng = np.random.default_rng(int(seed))

  def _score_pairs(self, pairs):
    r = self.runner
    results = [None] * len(pairs)
    # Same context next to each other, so each context is prefilled once.
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
    cached_ctx, saved = None, None
    for i in order:
      ctx, cont = pairs[i]
      if ctx != cached_ctx:
        r.reset()
        first = r.prefill(ctx)[-1]                     # predicts cont[0]
        # Copies: r.kv are views of the interpreter's cache buffers, written by every call.
        saved = ({n: v.copy() for n, v in r.kv.items()}, r.pos, first)
        cached_ctx = ctx
      else:
        r.kv, r.pos = {n: v.copy() for n, v in saved[0].items()}, saved[1]
      logits = saved[2][None]                          # [1, V]
      if len(cont) > 1:
        logits = np.concatenate([logits, r.prefill(cont[:-1])])   # [len(cont), V]
      logp = log_softmax(logits)[np.arange(len(cont)), cont]
      greedy = bool((logits.argmax(-1) == np.asarray(cont)).all())
      results[i] = (float(logp.sum()), greedy)
    return results

  def _generate_ids(self, prompts, max_new, should_stop, temperature):
    from export.runner import sample
    r, out = self.runner, []
    for prompt in prompts:
      r.reset()
      logits = r.prefill(prompt)[-1]
      ids = []
      for _ in range(max_new):
        tok = sample(logits, self.rng, temperature)
        if tok in self.tok.stop_ids:
          break
        ids.append(tok)
        if should_stop(ids) or r.pos >= r.kv_len:
          break
        logits = r.decode(tok)
      out.append(ids)
    return out
