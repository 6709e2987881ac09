"""Hugging Face directories load natively and give our logits; dense imports back."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp
from flax import nnx

from configs import tiny
from export import hf
from export import torch_model as tm
from mobilemoe_jax.model import Transformer
from tests.test_export_torch import TOKENS, make


def _hf_logits(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  with torch.no_grad():
    return type(model).__name__, model(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.mark.parametrize('kind,window,cls,moe', [
    ('dense', 64, 'Qwen2ForCausalLM', {}),      # tiny: windowed and global layers alternate
    ('dense', 0, 'LlamaForCausalLM', {}),
    ('moe', 64, 'Qwen2MoeForCausalLM', {}),
    ('moe', 0, 'Qwen2MoeForCausalLM', dict(n_shared=0, norm_topk_prob=False, first_dense=2)),
])
def test_hf_logits_equal_ours(tmp_path, kind, window, cls, moe):
  cfg, m = make(kind, **moe)
  cfg.sliding_window = window
  pt = tm.from_flax(m, cfg)
  hf.save(pt, str(tmp_path))
  name, got = _hf_logits(str(tmp_path))
  assert name == cls
  with torch.no_grad():
    want = pt(torch.from_numpy(TOKENS)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if window:
    # The 90-token input passes the 64 window: dropping it must change the logits.
    cfg.sliding_window = 0
    with torch.no_grad():
      no_window = tm.from_flax(m, cfg)(torch.from_numpy(TOKENS)).numpy()
    assert np.abs(no_window - want).max() > 1e-3


def test_import_dense_roundtrip_to_jax(tmp_path):
  cfg, m = make('dense')
  pt = tm.from_flax(m, cfg)
  hf.save(pt, str(tmp_path))
  back = hf.import_dense(str(tmp_path))
  assert back.cfg == pt.cfg
  fresh = Transformer(cfg, rngs=nnx.Rngs(1))
  hf.to_flax_state(back, fresh)
  np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(TOKENS))[0]),
                             np.asarray(m(jnp.asarray(TOKENS))[0]), atol=1e-5, rtol=0)


def test_unmappable_moe_is_refused():
  cfg, m = make('moe', score_func='sigmoid')
  with pytest.raises(hf.Unsupported, match='score_func'):
    hf.save(tm.from_flax(m, cfg), '/nonexistent/never-written')
