"""Dependencies point one way: the library (mobilemoe_jax/) sits below configs/, export/ and
bench/. Only the apps inside the package (the pipeline, `__main__` modules and `main()`
functions of CLIs) may import from above; config files are read by path
(mobilemoe_jax.config.load_file), never imported."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ABOVE = ('configs', 'export', 'bench')
APPS = ('pipeline.py', '__main__.py')


def upward_imports(path: pathlib.Path):
  """(line, module) of every import of an upper package outside a `main` function."""
  found = []

  def walk(node, in_main):
    for child in ast.iter_child_nodes(node):
      inside = in_main or (isinstance(child, ast.FunctionDef) and child.name == 'main')
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        names = [child.module or ''] if not child.level else []
      else:
        names = []
      found.extend((child.lineno, n) for n in names if n.split('.')[0] in ABOVE and not inside)
      walk(child, inside)

  walk(ast.parse(path.read_text()), False)
  return found


def test_the_library_imports_nothing_from_above():
  bad = [f'{p.relative_to(ROOT)}:{line} imports {mod}'
         for p in sorted((ROOT / 'mobilemoe_jax').rglob('*.py')) if p.name not in APPS
         for line, mod in upward_imports(p)]
  assert not bad, '\n'.join(bad)


def test_the_check_sees_function_level_imports(tmp_path):
  src = tmp_path / 'm.py'
  src.write_text('def f():\n  from export import runner\n\ndef main():\n  import configs\n')
  assert upward_imports(src) == [(2, 'export')]
