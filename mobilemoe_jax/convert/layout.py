"""The released MobileMoE's float tensor layout <-> our parameter tree: pure array mapping.

Release side: {tensor name: array} in the checkpoint's layout (notes
`shared/notes/mobilemoe_release.md` §3): linears `[out, in]`, routed experts `[E, in, out]`
with gate | up concatenated along out, the router `[E, H]`, the selection-only `expert_bias`
`[E]`, the tied embedding `[V, H]` (no `lm_head`). Names are those of the BF16 layout
hypothesis (§3.3): the QAT file's `*.qweight` / `*.weight_scale` (`experts.*_qweight` /
`*_scale`) become these names once dequantised. Dense FFN layers (`moe.every > 1`, absent
from the release) are named as in Llama 4: `feed_forward.{gate,up,down}_proj.weight`; an
untied head (ours only) is `lm_head.weight [V, H]`.

Our side: {path: array}, the paths of `nnx.to_flat_state(nnx.state(model))`, e.g.
`('blocks', 0, 'attn', 'q')`; `from_model` / `into_model` move it in and out of a model.

RoPE: the release rotates adjacent pairs (2i, 2i+1) of each head, our model the halves
(i, i + Dh/2) (model/layers.py, rope). Both rotate pair i by the same angle, so the release's
q_proj / k_proj rows are permuted within each head on the way in (`ROPE_ROWS`) and back on
the way out. The permutation moves whole output rows, so on the packed QAT tensors (packed
and grouped along the input axis) it applies to `qweight` and `weight_scale` rows alike.
"""
from typing import Mapping

import numpy as np

from mobilemoe_jax import config as config_lib

Path = tuple


def rope_rows(n_heads: int, head_dim: int) -> np.ndarray:
  """[n_heads * head_dim] row order taking the release's q/k rows (adjacent RoPE pairs) to
  ours (half-split): ours[r] = release[rope_rows(...)[r]]. Within a head, our row c is
  release row 2c and our row c + Dh/2 is release row 2c + 1."""
  head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
  return (np.arange(n_heads)[:, None] * head_dim + head[None]).reshape(-1)


def rope_rows_back(n_heads: int, head_dim: int) -> np.ndarray:
  """The inverse of `rope_rows`: release[r] = ours[rope_rows_back(...)[r]]."""
  return np.argsort(rope_rows(n_heads, head_dim))


def tensor_shapes(cfg) -> dict[str, tuple]:
  """{release tensor name: shape} of every float tensor a model with config `cfg` has."""
  d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  shapes = {'model.embed_tokens.weight': (cfg.vocab_size, d), 'model.norm.weight': (d,)}
  if not cfg.tie_embeddings:
    shapes['lm_head.weight'] = (cfg.vocab_size, d)
  m = cfg.moe
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,),
                   p + 'self_attn.q_proj.weight': (h * dh, d),
                   p + 'self_attn.k_proj.weight': (kv * dh, d),
                   p + 'self_attn.v_proj.weight': (kv * dh, d),
                   p + 'self_attn.o_proj.weight': (d, h * dh)})
    f = p + 'feed_forward.'
    if config_lib.is_moe_layer(cfg, i):
      shapes.update({f + 'router.weight': (m.n_experts, d),
                     f + 'experts.gate_up_proj': (m.n_experts, d, 2 * m.d_expert),
                     f + 'experts.down_proj': (m.n_experts, m.d_expert, d)})
      if m.expert_bias:
        shapes[f + 'expert_bias'] = (m.n_experts,)
      if m.n_shared:
        s = m.n_shared * m.d_shared
        shapes.update({f + 'shared_expert.gate_proj.weight': (s, d),
                       f + 'shared_expert.up_proj.weight': (s, d),
                       f + 'shared_expert.down_proj.weight': (d, s)})
    else:
      shapes.update({f + 'gate_proj.weight': (cfg.d_ff, d), f + 'up_proj.weight': (cfg.d_ff, d),
                     f + 'down_proj.weight': (d, cfg.d_ff)})
  return shapes


def check_tensors(tensors: Mapping[str, np.ndarray], cfg, source: str = 'checkpoint'):
  """Raises ValueError listing every missing, unexpected and wrongly shaped tensor."""
  want = tensor_shapes(cfg)
  missing = sorted(set(want) - set(tensors))
  unexpected = sorted(set(tensors) - set(want))
  shapes = [f'{n}: {tuple(tensors[n].shape)} (expected {want[n]})' for n in want
            if n in tensors and tuple(tensors[n].shape) != want[n]]
  if missing or unexpected or shapes:
    raise ValueError(f'{source}: tensors do not match the config: missing {missing}, '
                     f'unexpected {unexpected}, wrong shape {shapes}')


def to_ours(tensors: Mapping[str, np.ndarray], cfg, source: str = 'checkpoint') -> dict:
  """Release-layout float tensors -> {our param path: array} (dtypes kept as given)."""
  check_tensors(tensors, cfg, source)
  t = {n: np.asarray(a) for n, a in tensors.items()}
  d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  out = {('embed',): t['model.embed_tokens.weight'], ('final_norm', 'scale'): t['model.norm.weight']}
  if not cfg.tie_embeddings:
    out[('head',)] = t['lm_head.weight'].T
  for i in range(cfg.n_layers):
    p, b = f'model.layers.{i}.', ('blocks', i)
    a = p + 'self_attn.'
    out[b + ('attn_norm', 'scale')] = t[p + 'input_layernorm.weight']
    out[b + ('ffn_norm', 'scale')] = t[p + 'post_attention_layernorm.weight']
    out[b + ('attn', 'q')] = t[a + 'q_proj.weight'][rope_rows(h, dh)].T.reshape(d, h, dh)
    out[b + ('attn', 'k')] = t[a + 'k_proj.weight'][rope_rows(kv, dh)].T.reshape(d, kv, dh)
    out[b + ('attn', 'v')] = t[a + 'v_proj.weight'].T.reshape(d, kv, dh)
    out[b + ('attn', 'o')] = t[a + 'o_proj.weight'].T.reshape(h, dh, d)
    f, ffn = p + 'feed_forward.', b + ('ffn',)
    if config_lib.is_moe_layer(cfg, i):
      m = cfg.moe
      gate_up = t[f + 'experts.gate_up_proj']                              # [E, H, 2I]
      out[ffn + ('router',)] = t[f + 'router.weight'].T
      out[ffn + ('gate',)] = gate_up[..., :m.d_expert]
      out[ffn + ('up',)] = gate_up[..., m.d_expert:]
      out[ffn + ('down',)] = t[f + 'experts.down_proj']
      if m.expert_bias:
        out[ffn + ('expert_bias',)] = t[f + 'expert_bias']
      if m.n_shared:
        for name in ('gate', 'up', 'down'):
          out[ffn + ('shared', name)] = t[f + f'shared_expert.{name}_proj.weight'].T
    else:
      for name in ('gate', 'up', 'down'):
        out[ffn + (name,)] = t[f + f'{name}_proj.weight'].T
  return out


def to_release(params: Mapping[Path, np.ndarray], cfg) -> dict[str, np.ndarray]:
  """{our param path: array} -> release-layout float tensors; the inverse of `to_ours`.
  Paths of other variables (learned quantization scales) are ignored."""
  p_ = {k: np.asarray(v) for k, v in params.items()}
  d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  out = {'model.embed_tokens.weight': p_[('embed',)], 'model.norm.weight': p_[('final_norm', 'scale')]}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = p_[('head',)].T
  for i in range(cfg.n_layers):
    p, b = f'model.layers.{i}.', ('blocks', i)
    a = p + 'self_attn.'
    out[p + 'input_layernorm.weight'] = p_[b + ('attn_norm', 'scale')]
    out[p + 'post_attention_layernorm.weight'] = p_[b + ('ffn_norm', 'scale')]
    out[a + 'q_proj.weight'] = p_[b + ('attn', 'q')].reshape(d, h * dh).T[rope_rows_back(h, dh)]
    out[a + 'k_proj.weight'] = p_[b + ('attn', 'k')].reshape(d, kv * dh).T[rope_rows_back(kv, dh)]
    out[a + 'v_proj.weight'] = p_[b + ('attn', 'v')].reshape(d, kv * dh).T
    out[a + 'o_proj.weight'] = p_[b + ('attn', 'o')].reshape(h * dh, d).T
    f, ffn = p + 'feed_forward.', b + ('ffn',)
    if config_lib.is_moe_layer(cfg, i):
      m = cfg.moe
      out[f + 'router.weight'] = p_[ffn + ('router',)].T
      out[f + 'experts.gate_up_proj'] = np.concatenate([p_[ffn + ('gate',)], p_[ffn + ('up',)]], -1)
      out[f + 'experts.down_proj'] = p_[ffn + ('down',)]
      if m.expert_bias:
        out[f + 'expert_bias'] = p_[ffn + ('expert_bias',)]
      if m.n_shared:
        for name in ('gate', 'up', 'down'):
          out[f + f'shared_expert.{name}_proj.weight'] = p_[ffn + ('shared', name)].T
    else:
      for name in ('gate', 'up', 'down'):
        out[f + f'{name}_proj.weight'] = p_[ffn + (name,)].T
  return {n: np.ascontiguousarray(a) for n, a in out.items()}


def from_model(model) -> dict:
  """{path: np.ndarray} of a model's weights and expert biases (what `to_release` reads)."""
  from flax import nnx
  from mobilemoe_jax.moe.layer import ExpertBias
  state = nnx.state(model, nnx.Any(nnx.Param, ExpertBias))
  return {tuple(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)
          if not path[-1].endswith('_scale')}


def into_model(model, params: Mapping[Path, np.ndarray], source: str = 'checkpoint'):
  """Writes {path: array} into `model` (cast to each variable's dtype). Every weight and
  expert bias of the model must be given, with its shape; learned quantization scales
  (`*_scale`) are left as they are."""
  import jax.numpy as jnp
  from flax import nnx
  have = from_model(model)
  missing = sorted(map(str, set(have) - set(params)))
  unexpected = sorted(map(str, set(params) - set(have)))
  shapes = [f'{k}: {tuple(np.shape(params[k]))} (model {v.shape})' for k, v in have.items()
            if k in params and tuple(np.shape(params[k])) != v.shape]
  if missing or unexpected or shapes:
    raise ValueError(f'{source}: parameters do not match the model: missing {missing}, '
                     f'unexpected {unexpected}, wrong shape {shapes}')
  state = nnx.state(model)
  for path, v in nnx.to_flat_state(state):
    if tuple(path) in params:
      v.set_value(jnp.asarray(params[tuple(path)], v.get_value().dtype))
  nnx.update(model, state)
