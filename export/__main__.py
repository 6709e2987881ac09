"""Export a MobileMoE checkpoint to a LiteRT `.tflite` (and optionally PyTorch/HF dirs).

  python -m export --checkpoint runs/tiny/checkpoints --out model.tflite
  python -m export --checkpoint torch_dir --out model.tflite --quant int4_channel --moe delegate
  python -m export --checkpoint torch_dir --out model.tflite --moe delegate --attention delegate
  python -m export --random-init configs/tiny.py:moe --out /tmp/tiny.tflite   # smoke test

Prints progress and a report: file size, the fraction of weight bytes stored as INT4 (read
from the flatbuffer schema), signatures, and the verification against PyTorch.
"""
import argparse
import json
import os
import sys
import time

import numpy as np


def verify(model, path, quant: str, embedding: str, tokenizer=None, n_greedy: int = 16,
           moe: str = 'portable') -> dict:
  """Runs the .tflite (prefill + decode) against PyTorch computing what the .tflite should:
  weights on our grid (litert.fake_quant) and, for integer weights, each FC input on the
  int8 grid LiteRT quantizes it to at run time (grid.fake_quant_act, 'int8_dynamic').
  A file with the delegate's ops (--moe / --attention delegate) runs on the delegate; with
  INT4 weights the delegate also runs the FCs (fully_connected, int8 activations), which
  compute with the block scales as stored, so the reference keeps them exactly (a released
  checkpoint's fp16 scales included). On the stock interpreter XNNPACK runs the FCs, and the
  reference rounds their block scales to bf16 as XNNPACK does (export/README.md, "Agreement
  with JAX").
  Prompts: text (runner.PROMPTS) when a tokenizer is given, else random token ids (not text:
  a trained model's top logits are near-ties there, so greedy agreement means little).
  Reports max logit error and argmax agreement over prompt + continuation, greedy tokens
  agreeing per prompt (with the logit margins where they part), and for a file with the
  delegate's ops its claimed/refused counts (without INT4 weights its experts run with fp32
  activations here)."""
  import torch
  from export import litert
  from export.runner import PROMPTS, LiteRTLM, greedy_agreement, needs_delegate
  dlg, fcs_on_delegate = None, False
  if needs_delegate(path):
    from export import delegate
    fcs_on_delegate = quant.startswith('int4')
    dlg = delegate.load(activations='int8' if fcs_on_delegate else 'fp32',
                        fully_connected=fcs_on_delegate)
  lm = LiteRTLM(path, delegate=dlg)
  # The experts on moe's grid; the FCs' block scales as the kernels that run them read them.
  ref_model = litert.fake_quant(model, quant, embedding, moe, xnnpack=not fcs_on_delegate)
  if quant != 'fp32':
    quantize_fc_inputs(ref_model)
  if tokenizer is not None:
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in PROMPTS]
    kind = f'{len(prompts)} text prompts (export.runner.PROMPTS)'
  else:
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, model.cfg['vocab_size'], 8)) for _ in range(4)]
    kind = '4 random-token prompts (no tokenizer: pass --tokenizer for text)'
  n_greedy = min(n_greedy, lm.kv_len - max(map(len, prompts)))

  def ref_logits(ids):
    with torch.no_grad():
      return ref_model(torch.tensor([ids]).long())[0].numpy()

  results, err, scale, agree = [], 0.0, 0.0, []
  for p in prompts:
    r = greedy_agreement(lm, lambda ids: ref_logits(ids)[-1], p, n_greedy)
    results.append(r)
    # Teacher-forced on the .tflite's continuation: prefill the prompt, decode the rest.
    lm.reset()
    cont = r['tflite'][:-1]
    # A --prefill-logits last file gives the prompt's last row only: compared from there.
    first = lm.prefill(p) if lm.prefill_logits == 'all' else lm.prefill_last(p)[None]
    got = np.concatenate([first] + [lm.decode(t)[None] for t in cont])
    want = ref_logits(list(p) + list(cont))[len(p) - len(first):]
    err, scale = max(err, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
    agree.append(got.argmax(-1) == want.argmax(-1))
  n_full = sum(r['agree'] == n_greedy for r in results)
  out = {'reference': f'PyTorch, weights on the {quant} grid'
                      + (', FC inputs on the int8_dynamic grid' if quant != 'fp32' else '')
                      + (', FCs on the delegate' if fcs_on_delegate else ''),
         'prompts': kind,
         'max_abs_logit_err': err, 'logit_scale': scale,
         'argmax_agree': float(np.concatenate(agree).mean()),
         'greedy_tokens_agreeing': f'{n_greedy}/{n_greedy} on {n_full} of {len(prompts)} prompts',
         'greedy_agree_per_prompt': [r['agree'] for r in results],
         # Where they part: how close a call it was for each side (near-ties are ~0.01).
         'divergences': [{'prompt': i, 'step': r['agree'], 'ref_margin': r['ref_margin'],
                          'tflite_margin': r['tflite_margin']}
                         for i, r in enumerate(results) if 'ref_margin' in r]}
  if dlg is not None:
    from export import delegate
    st = delegate.stats(dlg)
    out['delegate'] = {k: st[k] for k in ('claimed', 'refused', 'invokes')}
  return out


def quantize_fc_inputs(torch_model, scheme='int8_dynamic'):
  """Puts each integer-weight Linear's input on the int8 grid LiteRT quantizes it to at run
  time (a forward pre-hook on this reference copy; the routers stay float, as exported)."""
  import torch
  from mobilemoe_jax.quant import grid

  def hook(_, args):
    return (torch.from_numpy(grid.fake_quant_act(args[0].detach().numpy(), scheme)),)
  for name, mod in torch_model.named_modules():
    if isinstance(mod, torch.nn.Linear) and not name.endswith('router'):
      mod.register_forward_pre_hook(hook)
  return torch_model


def checkpoint_tokenizer(path: str):
  """The tokenizer an Orbax training checkpoint was trained with (its meta config), or None
  (a PyTorch dir, or the file is not there)."""
  from mobilemoe_jax.data.tokenizer import load_tokenizer
  from mobilemoe_jax.train import loading
  try:
    tok = loading.tokenizer_path(loading.read_config(path))
  except (OSError, ValueError, loading.ckpt_lib.CheckpointError):
    return None
  return load_tokenizer(tok) if tok and os.path.exists(tok) else None


def export_litertlm(model, a, prefill) -> dict:
  """The LiteRT-LM bundle of --litertlm: the model exported again in the runtime's signature
  convention (litert.ExportableLiteRTLM) on the same weights grid, with stock builtins only
  (the runtime cannot load export/delegate), bundled with the tokenizer; then, unless
  --no-verify, greedy text from LiteRT-LM vs export.runner on the --out file for the
  PROMPTS."""
  import tempfile
  from export import litert, litertlm
  if a.moe == 'delegate' or a.attention == 'delegate':
    print('[export] note: the LiteRT-LM bundle uses --moe/--attention portable: LiteRT-LM '
          'takes no delegate or custom op kernel (export/README.md, LiteRT-LM)', flush=True)
  name = os.path.splitext(os.path.basename(a.out))[0]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, name + '.tflite')
    litert.export(model, path, quant=a.quant, embedding=a.embedding, prefill_lens=prefill,
                  kv_len=a.kv_len, convention='litertlm', kv_cache=a.kv_cache,
                  log=lambda m: print(m, flush=True))
    out = {'path': litertlm.bundle(path, a.litertlm, a.tokenizer,
                                   a.kv_len or model.cfg['max_seq_len'])}
  print(f'[export] LiteRT-LM bundle: {out["path"]}', flush=True)
  if not a.no_verify:
    from mobilemoe_jax.data.tokenizer import load_tokenizer
    out['verify'] = litertlm.agreement(out['path'], a.out, load_tokenizer(a.tokenizer))
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
  ap.add_argument('--attention', default='portable', choices=('portable', 'delegate'),
                  help="delegate: attention as MobileKvAttention ops in decode and prefill "
                       "(export/delegate reads only the filled cache slots and the causal new "
                       "tokens)")
  ap.add_argument('--prefill', default='32,128', help='comma-separated prefill lengths')
  ap.add_argument('--prefill-logits', default='all', choices=('all', 'last'),
                  help="what prefill returns: 'all' positions (scoring, eval) or the 'last' "
                       "real token's only (generation: skips the T x vocab lm_head)")
  ap.add_argument('--kv-len', type=int, default=0, help='KV cache length (0: max_seq_len)')
  ap.add_argument('--kv-cache', default='f32', choices=('f32', 'int8'),
                  help='cache tensor dtype; int8: int8 K/V + f32 scales per token and KV head '
                       "(the int8 grid of model.quant.kv_cache='int8'; 4x less cache memory)")
  ap.add_argument('--torch-out', help='also write the PyTorch safetensors dir here')
  ap.add_argument('--hf-out', help='also write a Hugging Face transformers dir here')
  ap.add_argument('--no-verify', action='store_true')
  ap.add_argument('--report', metavar='PATH', help='also write the report (printed as JSON) here')
  ap.add_argument('--litertlm', metavar='DIR',
                  help='also write a .litertlm bundle for the LiteRT-LM runtime here (needs '
                       '--tokenizer; stock builtins only, export/litertlm.py)')
  ap.add_argument('--tokenizer', help='SentencePiece .model (or tokenizer.json / a dir with one): '
                  "text prompts for the verification, --hf-out's tokenizer files (default: an "
                  "Orbax checkpoint's own) and --litertlm")
  a = ap.parse_args(argv)
  if a.litertlm and not a.tokenizer:
    ap.error('--litertlm needs --tokenizer (the bundle carries it)')

  from export import checkpoint, litert, torch_model
  if a.tokenizer:
    from mobilemoe_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(a.tokenizer)
  else:
    tok = checkpoint_tokenizer(a.checkpoint) if a.checkpoint else None
  if a.hf_out and tok is None:
    ap.error('--hf-out needs --tokenizer (the checkpoint does not name one)')
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
    hf.save(model, a.hf_out, tok)
    print(f'[export] Hugging Face dir: {a.hf_out}')
  # A QAT checkpoint was trained on one grid: export on that grid unless told otherwise.
  qat = model.cfg.get('quant') or {}
  to_cli = {'int4_g32': 'int4_g32', 'int4_channel': 'int4_channel', 'int8_channel': 'int8'}
  if a.quant is None:
    a.quant = to_cli.get(qat.get('weights'), 'int4_g32')
  if a.embedding == 'auto' and qat.get('weights'):
    a.embedding = {'int4_g32': 'int4_g32', 'int4_channel': 'int4', 'int8_channel': 'int8'}.get(
        qat.get('embedding'), 'auto')
  print(f'[export] weights {a.quant}, embedding {a.embedding}, MoE {a.moe}, attention '
        f'{a.attention}, prefill logits {a.prefill_logits}, KV cache {a.kv_cache}', flush=True)
  prefill = tuple(int(x) for x in a.prefill.split(','))
  rep = litert.export(model, a.out, quant=a.quant, embedding=a.embedding, moe=a.moe,
                      attention=a.attention, prefill_lens=prefill, kv_len=a.kv_len,
                      prefill_logits=a.prefill_logits, kv_cache=a.kv_cache,
                      log=lambda m: print(m, flush=True))
  rep['float_fc_weights'] = len(litert.check_router(a.out))
  if not a.no_verify:
    print('[export] verifying against PyTorch (prefill + decode)...', flush=True)
    rep['verify'] = verify(model, a.out, a.quant, a.embedding, tok, moe=a.moe)
  if a.litertlm:
    rep['litertlm'] = export_litertlm(model, a, prefill)
  rep['seconds'] = round(time.time() - t0, 1)
  print(json.dumps(rep, indent=2))
  if a.report:
    with open(a.report, 'w') as f:
      json.dump(rep, f, indent=2)
  mb = rep['file_bytes'] / 2**20
  print(f'[export] {a.out}: {mb:.2f} MiB, INT4 {100 * rep["int4_fraction"]:.1f}% of weight bytes, '
        f'signatures {rep["signatures"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
