"""The MoE feed-forward block: router, fine-grained routed experts, shared experts."""
import jax
import jax.numpy as jnp
from flax import nnx

from mobilemoe_jax.model.layers import MLP, act, add_quant_scale, kernel, param
from mobilemoe_jax.moe import dispatch, routing


class ExpertBias(nnx.Variable):
  """Aux-loss-free balancing bias: not trained by the optimizer, nudged from the load."""


class MoE(nnx.Module):
  def __init__(self, cfg, rngs: nnx.Rngs):
    m, d = cfg.moe, cfg.d_model
    pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    self.router = param(rngs, (d, m.n_experts), ('embed', None), std, pd)
    self.gate = param(rngs, (m.n_experts, d, m.d_expert), ('expert', 'embed', 'expert_mlp'), std, pd)
    self.up = param(rngs, (m.n_experts, d, m.d_expert), ('expert', 'embed', 'expert_mlp'), std, pd)
    self.down = param(rngs, (m.n_experts, m.d_expert, d), ('expert', 'expert_mlp', 'embed'),
                      std / (2 * cfg.n_layers) ** 0.5, pd)
    # S shared experts of hidden F_s are one SwiGLU of hidden S * F_s: the same function.
    self.shared = MLP(cfg, m.n_shared * m.d_shared, rngs) if m.n_shared else None
    self.expert_bias = ExpertBias(jnp.zeros((m.n_experts,), jnp.float32), axes=(None,)) \
        if m.expert_bias else None
    self.cfg = m
    self.dtype = jnp.dtype(cfg.dtype)
    self.quant = cfg.quant
    self.ep_chunks = m.get('ep_overlap_chunks', 1)   # configs saved before the field
    for name in ('gate', 'up', 'down'):
      add_quant_scale(self, name, cfg.quant, n_batch=1)
    # The router stays float unless quant.router: a flipped top-k choice costs more than
    # the few bytes it saves.
    self.router_quant = cfg.quant if cfg.quant.router else None
    if cfg.quant.router:
      add_quant_scale(self, 'router', cfg.quant)

  def __call__(self, x, valid=None):
    """x: [B, T, D]; valid: [B, T] 0/1 (padding excluded from losses and stats).
    Returns (y [B, T, D], stats dict)."""
    m, dt, qc = self.cfg, self.dtype, self.quant
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    valid = None if valid is None else valid.reshape(b * t)
    # The router stays in fp32: bf16 logits flip top-k choices near ties.
    router = kernel(self, 'router', self.router_quant, jnp.float32)
    logits = flat.astype(jnp.float32) @ router                                     # [N, E]
    bias = None if self.expert_bias is None else self.expert_bias[...]
    weights, experts, scores = routing.route(
        logits, top_k=m.top_k, score_func=m.score_func, norm_topk_prob=m.norm_topk_prob,
        routed_scale=m.routed_scale, bias=bias)
    # Experts see int8 inputs in the .tflite (when quant.activations is set); the float
    # router does not.
    # Named scopes label the kernels in a profile. Nothing routed feeds the shared expert,
    # so under expert parallelism XLA may run it while the all-to-alls are in flight.
    with jax.named_scope('routed_experts'):
      y, dropped = dispatch.run_experts(
          act(flat, qc), weights.astype(dt), experts, kernel(self, 'gate', qc, dt, n_batch=1),
          kernel(self, 'up', qc, dt, n_batch=1), kernel(self, 'down', qc, dt, n_batch=1),
          method=m.dispatch, capacity_factor=m.capacity_factor, act=lambda h: act(h, qc), ep_chunks=self.ep_chunks)
    y = y.reshape(b, t, d)
    if self.shared is not None:
      with jax.named_scope('shared_expert'):
        y = y + self.shared(x)
    stats = {
        'aux_loss': routing.load_balancing_loss(scores, experts, m.n_experts, valid),
        'z_loss': routing.z_loss(logits, valid),
        'tokens_per_expert': routing.tokens_per_expert(experts, m.n_experts, valid),
        'dropped': dropped,
    }
    return y, stats

  def update_expert_bias(self, tokens_per_expert, rate: float):
    """Aux-loss-free step: raise the bias of under-loaded experts, lower over-loaded ones."""
    if self.expert_bias is not None:
      load = tokens_per_expert.astype(jnp.float32)
      self.expert_bias[...] += rate * jnp.sign(load.mean() - load)
