"""Stage 4, quantization-aware training: the SFT model fine-tuned with INT4 fake quantization.

  python -m mobilemoe_jax.train --config=configs/stages/qat.py:tiny --workdir=runs/demo/qat \
      --config.train.init_from=runs/demo/sft/checkpoints

Every linear layer (attention, dense FFN, each routed and shared expert, the untied head) and
the embedding compute with their weights on the exporter's grid (quant/grid.py: symmetric
INT4, groups of 32 inputs, fp16 scales) and learn through straight-through gradients; the
router stays float (model.quant.router). Each of those linears also sees its input on the
int8 grid the .tflite quantizes it to at run time (model.quant.activations='int8_dynamic':
XNNPACK's per-token asymmetric int8), so this stage's forward is the exported model's: its
greedy tokens agree with the INT4 .tflite (tests/test_export_agreement.py). The loss adds
self-distillation from the float SFT model (KL on logits, train.distill_weight). The saved
checkpoint's integers and scales are exactly what its forward used:
`mobilemoe_jax.quant.extract.integer_weights`.
"""
from configs.stages import common


def get_config(arg: str = 'tiny'):
  small = common.is_small(common.parse_arg(arg)[0])
  config = common.stage_config(
      'qat', arg,
      steps=150 if small else 2_000,
      lr=3e-4 if small else 2e-5,
      schedule='cosine',
      warmup_steps=10 if small else 100,
      weight_decay=0.0,
      min_lr_ratio=0.1,
      distill_weight=1.0)
  config.model.quant.weights = 'int4_g32'
  config.model.quant.embedding = 'int4_g32'
  config.model.quant.activations = 'int8_dynamic'
  return config
