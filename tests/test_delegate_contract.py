"""export/delegate/contract.py is the one table of each op's input slots and options: the C++
header is generated from it and README.md's tables must say the same. (The packers read
their slot orders from it; test_moe_op.py / test_attention_op.py check what they write.)"""

import os
import re

import pytest

from export.delegate import contract

_DLG = os.path.dirname(contract.__file__)


def test_cpp_header_is_generated_from_the_contract():
  with open(os.path.join(_DLG, "ops", "contract.h")) as f:
    assert f.read() == contract.render_header(), (
        "ops/contract.h is stale: python -m export.delegate.contract > export/delegate/ops/contract.h")


def _readme_section(title):
  text = open(os.path.join(_DLG, "README.md")).read()
  start = text.index(title)
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else None]


@pytest.mark.parametrize("op, title", [(contract.MOE, "## The op contract"),
                                       (contract.ATTENTION, "## The attention op")])
def test_readme_tables_follow_the_contract(op, title):
  section = _readme_section(title)
  rows = re.findall(r"^\| (\d+) \| (\w+) \| (.*) \|$", section, flags=re.M)
  assert rows == [(str(i), s.name, s.shape) for i, s in enumerate(op.inputs)]
  for o in op.options:
    assert f"`{o.key}`" in section, f"README's {title!r} does not name option {o.key!r}"


def test_slot_names_are_unique_and_options_typed():
  for op in contract.OPS:
    assert len(set(op.input_names)) == len(op.inputs)
    assert {o.type for o in op.options} <= {"int", "float", "bool", "string"}
