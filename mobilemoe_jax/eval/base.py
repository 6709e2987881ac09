"""What both backends share: the lm_eval request plumbing on top of two token-level primitives.

A backend (JAX model, `.tflite` interpreter) implements only

  _score_pairs(pairs)        [(context ids, continuation ids)] -> [(sum log p(cont | ctx), greedy)]
  _generate_ids(prompts, max_new, should_stop, temperature)    -> [generated ids per prompt]

and this class turns lm_eval's text requests into those calls: tokenization with <bos> the way
the model was trained (documents are `<bos> text <eos>`), left truncation to the context,
rolling windows for perplexity, stop strings for generation. Keeping this in one place is what
makes the two backends comparable: they differ only in the forward pass.
"""
import abc
from collections.abc import Callable, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

Pair = tuple[list[int], list[int]]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """The text before the earliest stop string (lm_eval's convention: the stop is not kept)."""
  cut = len(text)
  for stop in until:
    if stop:
      i = text.find(stop)
      if i != -1:
        cut = min(cut, i)
  return text[:cut]


class TokenLM(TemplateLM):
  """lm_eval model over a project `Tokenizer` (mobilemoe_jax.data.tokenizer) and a backend."""

  def __init__(self, tokenizer, max_length: int, max_gen_toks: int = 256):
    super().__init__()
    self.tok = tokenizer
    self._max_length = int(max_length)
    self.max_gen_toks = int(max_gen_toks)

  # -- the two primitives a backend provides ---------------------------------------------------
  @abc.abstractmethod
  def _score_pairs(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether greedy decoding reproduces it.
    `context + continuation` fits in `max_length + 1` tokens and context is non-empty."""

  @abc.abstractmethod
  def _generate_ids(self, prompts: list[list[int]], max_new: int,
                    should_stop: Callable[[list[int]], bool],
                    temperature: float) -> list[list[int]]:
    """Decodes up to `max_new` tokens per prompt; a row ends when should_stop(ids) is true
    or at one of the tokenizer's stop ids (<eos>, the end of a chat turn; not included)."""

  # -- lm_eval's TemplateLM interface ------------------------------------------------------------
  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    # Training documents start with <bos>, so an empty context is <bos>, not <eos>.
    return self.tok.bos_id

  @property
  def tokenizer_name(self) -> str:
    return str(self.tok.path)

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    ids = self.tok.encode(string)
    return ids if add_special_tokens is False else [self.tok.bos_id] + ids

  def tok_decode(self, ids) -> str:
    return self.tok.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """requests: [((context, continuation), context ids, continuation ids)]."""
    pairs = [self._fit(ctx, cont) for _, ctx, cont in requests]
    results = self._score_pairs(pairs)
    for (key, _, _), res in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', key, res)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole documents: each token scored once, windows of max_length."""
    pairs, owner = [], []
    for i, req in enumerate(requests):
      (text,) = req.args
      windows = lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text, add_special_tokens=False),
          prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
      for window in windows:
        pairs.append(lm_utils.make_disjoint_window(window))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self._score_pairs(pairs)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled) continuation, cut at the first stop string."""
    # Requests of one task share gen_kwargs; group so each group is one batched decode.
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    out = [''] * len(requests)
    for idx in groups.values():
      kwargs = dict(requests[idx[0]].args[1])
      until = kwargs.pop('until', None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop('max_gen_toks', self.max_gen_toks))
      max_new = max(1, min(max_new, self.max_length - 1))
      temperature = float(kwargs.pop('temperature', 0.0)) if kwargs.pop('do_sample', False) else 0.0
      # Keep the end of long prompts: the question is at the end, few-shot examples first.
      budget = self.max_length - max_new
      prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in idx]

      def should_stop(ids: list[int]) -> bool:
        text = self.tok.decode(ids)
        return any(s and s in text for s in until)

      for i, ids in zip(idx, self._generate_ids(prompts, max_new, should_stop, temperature)):
        out[i] = cut_at_stop(self.tok.decode(ids), until)
        self.cache_hook.add_partial('generate_until', requests[i].args, out[i])
    return out

  # -- helpers -----------------------------------------------------------------------------------
  def _fit(self, ctx: list[int], cont: list[int]) -> Pair:
    """Left-truncates so the model input (context + continuation minus the last token) fits."""
    if not cont:
      raise ValueError('empty continuation: nothing to score')
    keep = self.max_length + 1
    if len(ctx) + len(cont) > keep:
      if len(cont) >= keep:
        raise ValueError(f'continuation of {len(cont)} tokens does not fit the context '
                         f'({self.max_length})')
      ctx = ctx[len(ctx) + len(cont) - keep:]
    return list(ctx), list(cont)
