"""How closely a released MobileMoE QAT snapshot's INT4 `.tflite` follows JAX
(export/README.md, "Released MobileMoE snapshots on device", "Agreement with JAX").

No real weights are here: tests/support/release_snapshot.py writes a synthetic snapshot with
the released S's structure at tiny dims (QK-norm, Llama-3 RoPE, sigmoid + bias routing, shared
expert, tied, every layer an MoE) in exactly the released layout. It is imported (as `python -m
mobilemoe_jax.convert import` does) and exported INT4 block-32 with the MoE blocks and decode
attention as the delegate's ops, twice:
  released    the experts as the released integers (MobileMoeBlock `expert_group_axis` out)
  regridded   the experts re-quantized to input-axis groups of 32 (the MoE's `expert_grid`
              dropped: what the portable lowering and `--quant int4_channel` get)
Each file greedily continues 8 random-token prompts for 16 steps next to a reference (where
they part: the step and both sides' logit margins), then runs teacher-forced over the
reference's tokens (|dlogit| per position: its median and max over each prompt). Runtimes:
  xnnpack      the default interpreter (XNNPACK) + our delegate, int8 activations
  builtin      TFLite's builtin kernels (no default delegate) + our delegate
  delegate_fc  the default interpreter + our delegate claiming the FULLY_CONNECTED nodes it
               supports too (`export.delegate.load(fully_connected=True)`; `delegate` in the
               row says how many nodes it claimed and the messages of those it left)
References:
  jax          the imported JAX model on the QAT grid, int8 dynamic activations
  torch_bf16   PyTorch computing what XNNPACK does: the released integers, FC inputs int8,
               the FCs' fp16 block scales rounded to bf16 (`litert.fake_quant(xnnpack=True)`)
It also records how many of the FCs' fp16 block scales bf16 rounding moves, and by how much.

  python bench/release_agreement.py          # -> bench/results/release_agreement.json
  python bench/release_agreement.py --table  # the README tables of that file
"""
import argparse
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import runinfo  # noqa: E402

OUT = os.path.join(REPO, 'bench', 'results', 'release_agreement.json')
# The released S's structure at tiny dims: no NoPE layer (S has none), RoPE scaling that
# bites at head_dim 16 (wavelengths over 64 are scaled), 8 experts top-4 of 32 (one output
# group each), shared 64; max_position_embeddings (64) = the KV cache.
S_LIKE = dict(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8,
              top_k=4, d_expert=32, d_shared=64, nope=(), rope_original=64, rope_factor=4.0)
N_PROMPTS, PROMPT_LEN, N_STEPS, KV_LEN = 8, 8, 16, 64
FILES = ('released', 'regridded')
RUNTIMES = ('xnnpack', 'builtin', 'delegate_fc')
REFERENCES = ('jax', 'torch_bf16')


def prompts() -> list:
  rng = np.random.default_rng(0)
  return [[int(t) for t in rng.integers(0, S_LIKE['vocab'], PROMPT_LEN)] for _ in range(N_PROMPTS)]


def import_snapshot(root: str) -> str:
  """Writes the synthetic snapshot under root and imports it; returns the Orbax checkpoint."""
  from mobilemoe_jax.convert import __main__ as convert
  from tests.support.release_snapshot import write_snapshot
  write_snapshot(os.path.join(root, 'snap'), layout='qat', **S_LIKE)
  if convert.main(['import', os.path.join(root, 'snap'), os.path.join(root, 'imported')]) != 0:
    raise RuntimeError(f'importing the synthetic snapshot under {root} failed')
  return os.path.join(root, 'imported', 'checkpoints')


def export_file(ckpt: str, path: str, experts: str = 'released') -> str:
  """The import as an INT4 block-32 .tflite, MoE blocks and attention on the delegate.
  experts: 'released' (the exact integers) or 'regridded' (input-axis groups of 32)."""
  from export import checkpoint, litert, torch_model
  model = checkpoint.load_any(ckpt)
  if experts == 'regridded':
    for m in model.modules():
      if isinstance(m, torch_model.MoE):
        m.expert_grid = None
  litert.export(model, path, quant='int4_g32', embedding='int4_g32', moe='delegate',
                attention='delegate', prefill_lens=(32,), kv_len=KV_LEN, log=lambda *a: None)
  return path


def jax_reference(ckpt: str):
  """ids -> logits [len(ids), V] of the imported model on the QAT stage's grid (its
  integers, int8 dynamic activations)."""
  from flax import nnx
  from mobilemoe_jax.model import Transformer
  from mobilemoe_jax.train.loading import load_checkpoint
  from tests.support.models import jax_next_logits
  model = load_checkpoint(ckpt, need_tokenizer=False).model
  cfg = model.cfg.copy_and_resolve_references()
  cfg.dtype = 'float32'
  cfg.quant.activations = 'int8_dynamic'
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
  return jax_next_logits(nnx.merge(graphdef, nnx.state(model)), length=KV_LEN)


def torch_reference(ckpt: str):
  """ids -> logits [len(ids), V] of PyTorch computing what the file's kernels compute: the
  released integers, FC inputs on the int8 grid, the FCs' block scales as XNNPACK rounds them."""
  import torch
  from export import checkpoint, litert
  from export.__main__ import quantize_fc_inputs
  ref = quantize_fc_inputs(litert.fake_quant(checkpoint.load_any(ckpt), 'int4_g32', 'int4_g32',
                                             moe='delegate', xnnpack=True))

  def logits(ids):
    with torch.no_grad():
      return ref(torch.tensor([ids]).long())[0].numpy()
  return logits


def open_file(path: str, runtime: str):
  """(LiteRTLM, delegate) of `path` on `runtime` (RUNTIMES)."""
  from ai_edge_litert.interpreter import OpResolverType
  from export import delegate
  from export.runner import LiteRTLM
  dlg = delegate.load(activations='int8', fully_connected=runtime == 'delegate_fc')
  resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if runtime == 'builtin'
              else OpResolverType.AUTO)
  return LiteRTLM(path, delegate=dlg, op_resolver_type=resolver), dlg


def compare(lm, logits, prompt_ids: list) -> dict:
  """The file's greedy continuation of each prompt next to `logits` (ids -> [len(ids), V]),
  then teacher-forced over the reference's tokens: per prompt, the steps that agree (and
  both margins where they part) and the median and max |dlogit| over its positions."""
  from export.runner import greedy_agreement
  rows = []
  for p in prompt_ids:
    r = greedy_agreement(lm, lambda ids: logits(ids)[-1], p, N_STEPS)
    seq = p + r['reference']
    lm.reset()
    d = np.abs(lm.prefill(seq) - logits(seq)).max(-1)     # per position
    row = {'agree': r['agree'], 'median_dlogit': float(np.median(d)), 'max_dlogit': float(d.max())}
    if r['agree'] < N_STEPS:
      row.update(ref_margin=r['ref_margin'], file_margin=r['tflite_margin'])
    rows.append(row)
  return {'prompts_equal': sum(r['agree'] == N_STEPS for r in rows), 'prompts': len(rows),
          'steps': N_STEPS, 'per_prompt': rows}


def scale_rounding(ckpt: str) -> dict:
  """How far bf16 rounding moves the fp16 block scales of the FCs XNNPACK runs (every
  block-wise Linear outside the MoE op, the tied lm_head on the embedding's grid)."""
  from export import checkpoint, litert, torch_model
  model = checkpoint.load_any(ckpt)
  in_moe = {f'{n}.{c}' for n, m in model.named_modules() if isinstance(m, torch_model.MoE)
            for c, _ in m.named_modules()}
  scales = [np.asarray(m.grid.scales, np.float32).ravel() for n, m in model.named_modules()
            if getattr(m, 'grid', None) is not None and n not in in_moe and 'router' not in n]
  s = np.concatenate(scales)
  rel = np.abs(litert.xnnpack_block_scales(s) - s) / np.abs(s)
  return {'scales': int(s.size), 'moved_fraction': float((rel > 0).mean()),
          'median_relative_change': float(np.median(rel[rel > 0])) if (rel > 0).any() else 0.0,
          'max_relative_change': float(rel.max())}


def measure(root: str) -> dict:
  from export import delegate
  ckpt = import_snapshot(root)
  refs = {'jax': jax_reference(ckpt), 'torch_bf16': torch_reference(ckpt)}
  res = {'model': dict(S_LIKE, nope=list(S_LIKE['nope'])), 'kv_len': KV_LEN,
         'prompt_len': PROMPT_LEN, 'fc_scale_rounding_to_bf16': scale_rounding(ckpt), 'rows': []}
  for experts in FILES:
    path = export_file(ckpt, os.path.join(root, f'{experts}.tflite'), experts)
    for runtime in RUNTIMES:
      for ref in REFERENCES:
        lm, dlg = open_file(path, runtime)
        row = dict(experts=experts, runtime=runtime, reference=ref, **compare(lm, refs[ref], prompts()))
        st = delegate.stats(dlg)
        row['delegate'] = {k: st[k] for k in ('claimed', 'refused', 'isa', 'messages')}
        print(experts, runtime, ref, row['prompts_equal'], 'of', row['prompts'],
              'median', [round(r['median_dlogit'], 4) for r in row['per_prompt']], flush=True)
        res['rows'].append(row)
  return res


EXPERTS = {'released': 'released integers (`expert_group_axis` out)',
           'regridded': 're-gridded (input-axis groups of 32, the former export)'}
FCS_RUN_BY = {'delegate_fc': 'the delegate', 'xnnpack': 'XNNPACK'}
RUN_BY = {'xnnpack': 'default interpreter (XNNPACK)',
          'builtin': 'builtin kernels (`OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`)',
          'delegate_fc': 'default interpreter, FCs offered to our delegate (`fully_connected=True`)'}
REFERENCE = {'jax': 'JAX',
             'torch_bf16': 'PyTorch with the scales rounded to bf16 (`fake_quant(..., xnnpack=True)`, FC inputs int8)'}


def markdown_tables(res: dict) -> str:
  """export/README.md's two tables: each file next to JAX with its block-wise FCs on the
  delegate or on XNNPACK; the released file on each runtime against each reference (with the
  nodes the delegate claimed); then how far bf16 rounding moves the FCs' scales."""
  def rng(vals):
    lo, hi = f'{min(vals):.2g}', f'{max(vals):.2g}'
    return lo if lo == hi else f'{lo}-{hi}'
  rows = {(r['experts'], r['runtime'], r['reference']): r for r in res['rows']}
  first = res['rows'][0]
  m = res['machine']
  out = [f"{m['cpu']}, commit {res['commit']}, {res['date'][:10]}; {first['prompts']} random-token "
         f"prompts of {res['prompt_len']}, {first['steps']} greedy steps", '',
         f"| experts in the file | FCs run by | prompts equal for {first['steps']} steps "
         '| parted prompts (step, JAX / file margin) | median per prompt | max per prompt |',
         '|---|---|---|---|---|---|']
  for experts, label in EXPERTS.items():
    for runtime, fcs in FCS_RUN_BY.items():
      r = rows[experts, runtime, 'jax']
      if runtime == 'delegate_fc' and r['delegate']['claimed'] <= rows[experts, 'xnnpack', 'jax']['delegate']['claimed']:
        fcs = 'XNNPACK (offered to the delegate, not claimed)'
      pp = r['per_prompt']
      parted = ', '.join(f"step {p['agree']} ({p['ref_margin']:.2g} / {p['file_margin']:.2g})"
                         for p in pp if 'ref_margin' in p) or 'none'
      out.append(f"| {label} | {fcs} | {r['prompts_equal']} of {r['prompts']} | {parted} "
                 f"| {rng([p['median_dlogit'] for p in pp])} | {rng([p['max_dlogit'] for p in pp])} |")
  out += ['', '| the file run by | reference | prompts equal | median abs dlogit per prompt | max '
          '| delegate claimed |', '|---|---|---|---|---|---|']
  for runtime, run_by in RUN_BY.items():
    for ref, label in REFERENCE.items():
      r = rows['released', runtime, ref]
      pp = r['per_prompt']
      out.append(f"| {run_by} | {label} | {r['prompts_equal']} of {r['prompts']} "
                 f"| {rng([p['median_dlogit'] for p in pp])} | {max(p['max_dlogit'] for p in pp):.2g} "
                 f"| {r['delegate']['claimed']} nodes |")
  s = res['fc_scale_rounding_to_bf16']
  out += ['', f"FC block scales moved by bf16 rounding: {s['moved_fraction']:.0%} of {s['scales']}, "
          f"median {s['median_relative_change']:.2%}, max {s['max_relative_change']:.2%}"]
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--out', default=OUT)
  ap.add_argument('--table', action='store_true', help='print the README tables of --out')
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_tables(runinfo.read_results(a.out)))
  res = runinfo.run_record('bench/release_agreement.py', gpu=False)
  with tempfile.TemporaryDirectory() as root:
    res.update(measure(root))
  runinfo.write_results(a.out, res)
  print(markdown_tables(res))
  print(f'wrote {a.out}')


if __name__ == '__main__':
  main()
