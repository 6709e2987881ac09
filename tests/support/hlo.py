"""The data flow of a compiled XLA program's entry computation, from its HLO text: which
instruction reads which, so a test can ask whether two operations depend on each other (could
run at the same time) without timing anything.

Operations are found by JAX's named scopes (HLO metadata). JAX's persistent compilation cache
(tests/conftest.py) keys a program without its metadata, so a program compiled before a scope
was renamed keeps the old names: clear .cache/jax after renaming one."""
import re

# `%name = shape opcode(operands), attr=..., metadata={op_name="..."}`
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NAME = re.compile(r'%([\w.\-]+)')


class Graph:
  """Instructions of the ENTRY computation: opcode, op_name (JAX's name stack) and operands."""

  def __init__(self, hlo_text: str):
    entry = re.search(r'^ENTRY .*?\{\n(.*?)^\}', hlo_text, re.S | re.M)
    if entry is None:
      raise ValueError('no ENTRY computation in the HLO text')
    self.opcode, self.op_name, self.operands = {}, {}, {}
    for line in entry.group(1).splitlines():
      m = _INSTR.match(line)
      if not m:
        continue
      name, opcode, rest = m.groups()
      op_name = _OP_NAME.search(rest)
      self.opcode[name] = opcode
      self.op_name[name] = op_name.group(1) if op_name else ''
      self.operands[name] = [n for n in _NAME.findall(rest.split('metadata=')[0]) if n != name]
    for name, ops in self.operands.items():   # computation names (calls=%...) are no operands
      self.operands[name] = [n for n in ops if n in self.opcode]
    self._ancestors = {}

  def ancestors(self, name):
    """Every instruction `name` reads, directly or through others."""
    if name not in self._ancestors:
      seen, todo = set(), list(self.operands[name])
      while todo:
        n = todo.pop()
        if n not in seen:
          seen.add(n)
          todo.extend(self.operands[n])
      self._ancestors[name] = seen
    return self._ancestors[name]

  def independent(self, a, b):
    """Neither reads the other's result: a scheduler may run them at the same time."""
    return a not in self.ancestors(b) and b not in self.ancestors(a)

  def find(self, opcode=None, scope=None):
    """Instructions (fusions included) with this opcode and/or JAX's named scope `scope` in
    their op_name: '.../shared_expert/dot_general', or its gradient's
    '.../transpose(jvp(shared_expert))/dot_general'."""
    in_scope = re.compile(rf'[/(]{re.escape(scope or "")}[)/]')
    return [n for n in self.opcode
            if (opcode is None or self.opcode[n] == opcode)
            and (scope is None or in_scope.search(self.op_name[n]))]

  def matmuls(self, scope):
    """The matmuls (dots, or fusions rooted at one) JAX named under `scope`."""
    return [n for n in self.find(scope=scope) if self.op_name[n].endswith('dot_general')]
