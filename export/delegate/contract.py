"""The delegate's op contracts: each op's input slots (in order) and its options, in one table.

Everything else follows this file:
- the C++ side reads `ops/contract.h`, generated from it:
  `python -m export.delegate.contract > export/delegate/ops/contract.h`;
- the packers take their slot orders from it (export/moe_op.py WEIGHT_SLOTS,
  export/delegate WEIGHT_NAMES, tflite_builder);
- tests/test_delegate_contract.py checks the header, the packers (export/moe_op.py,
  export/attention_op.py) and README.md's tables against it.
Plain Python (no numpy), so generating the header needs nothing installed.
"""

from __future__ import annotations

from typing import NamedTuple


class Slot(NamedTuple):
  name: str
  shape: str             # type / shape as README.md's table writes it
  optional: bool = False  # may be absent (tensor index -1)


class Option(NamedTuple):
  key: str
  type: str              # int | float | bool | string
  required: bool = False


class OpContract(NamedTuple):
  name: str      # custom_code (custom ops) or the builtin's name
  cpp: str       # prefix of the C++ names: k<cpp><Slot>, k<cpp>Opt<Key>
  inputs: tuple[Slot, ...]
  options: tuple[Option, ...] = ()
  max_tokens: int = 0    # the most tokens one call takes (0: no limit)

  @property
  def input_names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.inputs)

  def slot(self, name: str) -> int:
    return self.input_names.index(name)


MOE = OpContract(
    "MobileMoeBlock", "Moe",
    inputs=(
        Slot("x", "float32 `[..., D]`; all leading dims are tokens, T = their product"),
        Slot("router_w", "float32 `[E, D]`"),
        Slot("router_bias", "float32 `[E]` (may be absent = zeros)", optional=True),
        Slot("gate_up_q", "packed INT4 `[E, 2F, D/2]` uint8 (or int8) bytes; rows 0..F-1 gate, "
             "F..2F-1 up (`expert_group_axis` 'out': `[E, D, 2F/2]`, columns gate then up)"),
        Slot("gate_up_s", "float32 `[E, 2F, D/G]` ('out': `[E, D, 2F/G]`)"),
        Slot("down_q", "packed INT4 `[E, D, F/2]` ('out': `[E, F, D/2]`)"),
        Slot("down_s", "float32 `[E, D, F/G]` ('out': `[E, F, D/G]`)"),
        # The shared expert: all four present (d_shared > 0) or all four absent.
        Slot("shared_gate_up_q", "`[2Fs, D/2]` (optional; all shared experts fused into one "
             "SwiGLU of width Fs)", optional=True),
        Slot("shared_gate_up_s", "float32 `[2Fs, D/G]`", optional=True),
        Slot("shared_down_q", "`[D, Fs/2]`", optional=True),
        Slot("shared_down_s", "float32 `[D, Fs/G]`", optional=True),
    ),
    options=(
        Option("num_experts", "int", True), Option("top_k", "int", True),
        Option("d_model", "int", True), Option("d_expert", "int", True),
        Option("group_size", "int", True), Option("d_shared", "int"),
        Option("score_func", "string"), Option("norm_topk_prob", "bool"),
        Option("routed_scale", "float"), Option("act", "string"),
        Option("weight_tiles", "int"), Option("expert_group_axis", "string"),
    ))

ATTENTION = OpContract(
    "MobileKvAttention", "Attn",
    inputs=(
        Slot("q", "float32 `[1, T, H, Dh]` (after RoPE)"),
        Slot("k_new", "float32 `[1, T, K, Dh]` (the new tokens' rows)"),
        Slot("v_new", "float32 `[1, T, K, Dh]`"),
        Slot("k_cache", "float32 `[1, K, P, Dh]`"),
        Slot("v_cache", "float32 `[1, K, Dh, P]`"),
        Slot("input_pos", "int32 `[T]`, contiguous"),
    ),
    options=(
        Option("num_heads", "int", True), Option("num_kv_heads", "int", True),
        Option("head_dim", "int", True), Option("window", "int", True),
        Option("scale", "float", True),
    ),
    # A prefill chunk costs ~T^2 / 2 dot products per head: bounded at the released models'
    # max_seq_len, so a file (or an app's resize) cannot ask for an unbounded amount of work.
    # Longer chunks keep the portable matmuls (export/torch_model.py).
    max_tokens=8192)

# The builtin FULLY_CONNECTED nodes the `fully_connected` option claims (no options of ours).
FC = OpContract(
    "FULLY_CONNECTED", "Fc",
    inputs=(
        Slot("x", "float32 `[..., K]`"),
        Slot("weights", "constant INT4 `[M, K]`: one f32 scale per row, zero points 0, or block-wise "
                         "fp16 scales `[M, K/G]`"),
        Slot("bias", "absent", optional=True),
    ))

OPS = (MOE, ATTENTION, FC)


def _camel(name: str) -> str:
  return "".join(p[:1].upper() + p[1:] for p in name.split("_"))


def render_header() -> str:
  """ops/contract.h: the slot enums and option keys of every op."""
  out = ["// Generated from export/delegate/contract.py (the op contracts): do not edit.",
         "// Regenerate: python -m export.delegate.contract > export/delegate/ops/contract.h",
         "#pragma once", "", "namespace mm::contract {", ""]
  for op in OPS:
    out.append(f'constexpr const char* k{op.cpp}Name = "{op.name}";')
    slots = ", ".join(f"k{op.cpp}{_camel(s.name)} = {i}" for i, s in enumerate(op.inputs))
    out.append(f"enum {op.cpp}Slot {{ {slots}, k{op.cpp}Slots = {len(op.inputs)} }};")
    for o in op.options:
      req = "required" if o.required else "optional"
      out.append(f'constexpr const char* k{op.cpp}Opt{_camel(o.key)} = "{o.key}";  '
                 f"// {o.type}, {req}")
    if op.max_tokens:
      out.append(f"constexpr int k{op.cpp}MaxTokens = {op.max_tokens};")
    out.append("")
  out += ["}  // namespace mm::contract", ""]
  return "\n".join(out)


if __name__ == "__main__":
  print(render_header(), end="")
