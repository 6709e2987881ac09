"""Export a MobileMoE checkpoint to a LiteRT `.tflite` (and optionally PyTorch/HF dirs).

  python -m export --checkpoint runs/tiny/checkpoints --out model.tflite
  python -m export --checkpoint torch_dir --out model.tflite --quant int4_channel --moe delegate
  python -m export --random-init configs/tiny.py:moe --out /tmp/tiny.tflite   # smoke test

Prints progress and a report: file size, the fraction of weight bytes stored as INT4 (read
from the flatbuffer schema), signatures, and the verification against PyTorch.
"""
import argparse
import json
import sys
import time

import numpy as np


def verify(model, path, moe: str, n_prompt: int = 12, n_decode: int = 8) -> dict:
  """Runs the .tflite (prefill + decode) and PyTorch on the same random tokens.
  Reports the max logit error and greedy-token agreement; with --moe delegate the
  MobileMoeBlock delegate is loaded (it must claim every MoE node)."""
  import torch
  from export.runner import LiteRTLM
  dlg = None
  if moe == 'delegate' and model.cfg['moe']['n_experts']:
    from export import delegate
    dlg = delegate.load(activations='fp32')
  lm = LiteRTLM(path, delegate=dlg)
  n = min(n_prompt + n_decode, lm.kv_len)
  tok = np.random.default_rng(0).integers(0, model.cfg['vocab_size'], n)
  got = np.concatenate([lm.prefill(tok[:n_prompt]), np.stack([lm.decode(t) for t in tok[n_prompt:]])])
  with torch.no_grad():
    ref = model(torch.from_numpy(tok[None]).long())[0].numpy()
  out = {'max_abs_logit_err': float(np.abs(got - ref).max()),
         'logit_scale': float(np.abs(ref).max()),
         'argmax_agree': float((got.argmax(-1) == ref.argmax(-1)).mean())}
  if dlg is not None:
    from export import delegate
    st = delegate.stats(dlg)
    out['delegate'] = {k: st[k] for k in ('claimed', 'refused', 'invokes')}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(prog='python -m export', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoint', help='PyTorch export dir (config.json + model.safetensors) '
                   'or an Orbax training checkpoint dir')
  src.add_argument('--random-init', metavar='CONFIG', help='configs/x.py:arg, random weights')
  ap.add_argument('--config', help='configs/x.py:arg to check the checkpoint against')
  ap.add_argument('--out', required=True, help='output .tflite')
  ap.add_argument('--quant', default='int4_g32', choices=('int4_g32', 'int4_channel', 'int8', 'fp32'))
  ap.add_argument('--embedding', default='int8', choices=('int8', 'int4', 'fp32'))
  ap.add_argument('--moe', default='portable', choices=('portable', 'delegate'))
  ap.add_argument('--prefill', default='32,128', help='comma-separated prefill lengths')
  ap.add_argument('--kv-len', type=int, default=0, help='KV cache length (0: max_seq_len)')
  ap.add_argument('--torch-out', help='also write the PyTorch safetensors dir here')
  ap.add_argument('--hf-out', help='also write a Hugging Face transformers dir here')
  ap.add_argument('--no-verify', action='store_true')
  a = ap.parse_args(argv)

  from export import checkpoint, litert, torch_model
  t0 = time.time()
  print('[export] loading weights...', flush=True)
  if a.random_init:
    import flax.nnx as nnx
    from mobilemoe_jax.model import Transformer
    cfg = checkpoint.load_config(a.random_init).model
    model = torch_model.from_flax(Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
  else:
    model = checkpoint.load_any(a.checkpoint, a.config)
  n_params = sum(p.numel() for p in model.parameters())
  print(f'[export] model: {n_params / 1e6:.2f}M params, {model.cfg["n_layers"]} layers, '
        f'{model.cfg["moe"]["n_experts"]} experts', flush=True)
  if a.torch_out:
    torch_model.save(model, a.torch_out)
    print(f'[export] PyTorch dir: {a.torch_out}')
  if a.hf_out:
    from export import hf
    hf.save(model, a.hf_out)
    print(f'[export] Hugging Face dir: {a.hf_out}')
  prefill = tuple(int(x) for x in a.prefill.split(','))
  rep = litert.export(model, a.out, quant=a.quant, embedding=a.embedding, moe=a.moe,
                      prefill_lens=prefill, kv_len=a.kv_len,
                      log=lambda m: print(m, flush=True))
  rep['float_fc_weights'] = len(litert.check_router(a.out))
  if not a.no_verify:
    print('[export] verifying against PyTorch (prefill + decode)...', flush=True)
    rep['verify'] = verify(model, a.out, a.moe)
  rep['seconds'] = round(time.time() - t0, 1)
  print(json.dumps(rep, indent=2))
  mb = rep['file_bytes'] / 2**20
  print(f'[export] {a.out}: {mb:.2f} MiB, INT4 {100 * rep["int4_fraction"]:.1f}% of weight bytes, '
        f'signatures {rep["signatures"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
