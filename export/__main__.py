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


def verify(model, path, quant: str, embedding: str, moe: str, n_prompt: int = 12,
           n_decode: int = 8, n_greedy: int = 16) -> dict:
  """Runs the .tflite (prefill + decode) against PyTorch with the same weights on our
  quantization grid (litert.fake_quant; activations stay float there, the .tflite
  quantizes them dynamically): max logit error and argmax agreement on random tokens, and
  how many of `n_greedy` greedy tokens agree. With --moe delegate the MobileMoeBlock
  delegate is loaded and its claimed/refused counts are reported."""
  import torch
  from export import litert
  from export.runner import LiteRTLM
  dlg = None
  if moe == 'delegate' and model.cfg['moe']['n_experts']:
    from export import delegate
    dlg = delegate.load(activations='fp32')
  lm = LiteRTLM(path, delegate=dlg)
  ref_model = litert.fake_quant(model, quant, embedding)
  n = min(n_prompt + n_decode, lm.kv_len)
  tok = np.random.default_rng(0).integers(0, model.cfg['vocab_size'], n)
  got = np.concatenate([lm.prefill(tok[:n_prompt])] + [lm.decode(t)[None] for t in tok[n_prompt:n]])
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(tok[None]).long())[0].numpy()
  out = {'reference': f'PyTorch, weights on the {quant} grid',
         'max_abs_logit_err': float(np.abs(got - ref).max()),
         'logit_scale': float(np.abs(ref).max()),
         'argmax_agree': float((got.argmax(-1) == ref.argmax(-1)).mean())}
  # Greedy continuation of a short prompt: .tflite decode loop vs PyTorch full forwards.
  n_greedy = min(n_greedy, lm.kv_len - 4)
  ids = list(tok[:4])
  tfl = lm.generate(ids, n_greedy)
  seq = list(ids)
  with torch.no_grad():
    for _ in range(n_greedy):
      seq.append(int(ref_model(torch.tensor([seq]))[0, -1].argmax()))
  agree = next((i for i, (a, b) in enumerate(zip(tfl, seq[4:])) if a != b), n_greedy)
  out['greedy_tokens_agreeing'] = f'{agree}/{n_greedy}'
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
  ap.add_argument('--quant', choices=('int4_g32', 'int4_channel', 'int8', 'fp32'),
                  help="default: the checkpoint's QAT scheme (model.quant.weights), else int4_g32")
  ap.add_argument('--embedding', default='auto', choices=('auto', 'int4_g32', 'int4', 'int8', 'fp32'),
                  help="auto: the --quant scheme (a tied embedding is then stored once); "
                       "int4 = INT4 channel-wise")
  ap.add_argument('--moe', default='portable', choices=('portable', 'delegate'))
  ap.add_argument('--prefill', default='32,128', help='comma-separated prefill lengths')
  ap.add_argument('--kv-len', type=int, default=0, help='KV cache length (0: max_seq_len)')
  ap.add_argument('--torch-out', help='also write the PyTorch safetensors dir here')
  ap.add_argument('--hf-out', help='also write a Hugging Face transformers dir here')
  ap.add_argument('--no-verify', action='store_true')
  ap.add_argument('--litertlm', metavar='DIR', help='also bundle a .litertlm here (needs --tokenizer)')
  ap.add_argument('--tokenizer', help='SentencePiece .model for --litertlm')
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
  # A QAT checkpoint was trained on one grid: export on that grid unless told otherwise.
  qat = model.cfg.get('quant') or {}
  to_cli = {'int4_g32': 'int4_g32', 'int4_channel': 'int4_channel', 'int8_channel': 'int8'}
  if a.quant is None:
    a.quant = to_cli.get(qat.get('weights'), 'int4_g32')
  if a.embedding == 'auto' and qat.get('weights'):
    a.embedding = {'int4_g32': 'int4_g32', 'int4_channel': 'int4', 'int8_channel': 'int8'}.get(
        qat.get('embedding'), 'auto')
  print(f'[export] weights {a.quant}, embedding {a.embedding}, MoE {a.moe}', flush=True)
  prefill = tuple(int(x) for x in a.prefill.split(','))
  rep = litert.export(model, a.out, quant=a.quant, embedding=a.embedding, moe=a.moe,
                      prefill_lens=prefill, kv_len=a.kv_len,
                      log=lambda m: print(m, flush=True))
  rep['float_fc_weights'] = len(litert.check_router(a.out))
  if not a.no_verify:
    print('[export] verifying against PyTorch (prefill + decode)...', flush=True)
    rep['verify'] = verify(model, a.out, a.quant, a.embedding, a.moe)
  if a.litertlm:
    if not a.tokenizer:
      ap.error('--litertlm needs --tokenizer')
    rep['litertlm'] = litert.bundle(a.out, a.litertlm, a.tokenizer, a.kv_len or model.cfg['max_seq_len'])
    print(f'[export] LiteRT-LM bundle: {rep["litertlm"]}', flush=True)
  rep['seconds'] = round(time.time() - t0, 1)
  print(json.dumps(rep, indent=2))
  mb = rep['file_bytes'] / 2**20
  print(f'[export] {a.out}: {mb:.2f} MiB, INT4 {100 * rep["int4_fraction"]:.1f}% of weight bytes, '
        f'signatures {rep["signatures"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
