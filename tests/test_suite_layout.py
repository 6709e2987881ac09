"""The test suite's own rule: what several test files share lives in conftest.py (fixtures) or
tests/support/ (plain helpers), so no test module imports another."""
import pathlib
import re

TESTS = pathlib.Path(__file__).parent


def test_no_test_module_imports_another():
  imports_a_test = re.compile(r'^\s*(?:from|import)\s+(?:tests\.)?test_\w+', re.M)
  found = [f'{path.relative_to(TESTS)}: {m.group(0).strip()}'
           for path in sorted(TESTS.rglob('*.py')) for m in imports_a_test.finditer(path.read_text())]
  assert not found, found
