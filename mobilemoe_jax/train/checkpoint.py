"""Orbax checkpoints of the train state, the Grain iterator and the stage metadata.

One step directory holds three items:
  state/  the train state pytree (params, non-trained model state, optimizer state, step,
          RNG key, skipped-step count), sharded arrays written by every process
  data/   the Grain iterator position (one JSON file per process), so a resumed run reads
          exactly the batches it would have read
  meta/   JSON: stage name, lineage (the stages and checkpoints this one descends from)
          and the config that produced it

Before any array is read the saved tree is compared with the one the config builds, so a
mismatch names the parameter path and both shapes instead of failing deep inside Orbax.
"""
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mobilemoe_jax.data import pipeline
from mobilemoe_jax.train import paths


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names the path and what differs."""


def _key_name(k) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree) -> dict[str, tuple]:
  """{'params/blocks/0/attn/q': (shape, dtype)} for every array leaf (Variable '.value' dropped)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in leaves:
    names = [_key_name(k) for k in path]
    if names and names[-1] == 'value':
      names = names[:-1]
    out['/'.join(names)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
  return out


def check_compatible(saved, expected, where: str, prefixes=('',)):
  """Raises CheckpointError listing every path under `prefixes` whose shape or dtype differs,
  or that exists on only one side. `saved`: Orbax tree metadata; `expected`: abstract tree."""
  saved, expected = _flat(saved), _flat(expected)
  keep = lambda k: any(k.startswith(p) for p in prefixes)
  problems = []
  for key in sorted(set(saved) | set(expected)):
    if not keep(key):
      continue
    if key not in saved:
      problems.append(f'  {key}: missing from the checkpoint (expected {expected[key][0]} {expected[key][1]})')
    elif key not in expected:
      problems.append(f'  {key}: in the checkpoint {saved[key][0]} {saved[key][1]} but not in the model')
    elif saved[key] != expected[key]:
      problems.append(f'  {key}: checkpoint has shape {saved[key][0]} {saved[key][1]}, '
                      f'the config expects {expected[key][0]} {expected[key][1]}')
  if problems:
    raise CheckpointError(f'checkpoint {where} does not match the config ({len(problems)} '
                          'differences):\n' + '\n'.join(problems[:20]))


def _with_shardings(abstract, shardings):
  """ShapeDtypeStructs that carry the target sharding, so Orbax restores straight onto the mesh."""
  # `shardings` stops at each nnx.Variable (a prefix of `abstract`): broadcast it down first.
  full = jax.tree.map(lambda s, a: jax.tree.map(lambda _: s, a), shardings, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, full)


class Checkpointer:
  """A CheckpointManager for one stage's `<workdir>/checkpoints`: async saves, keep-last-K."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = paths.as_path(directory)   # local or gs://
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': pipeline.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return str(self.directory / str(step))

  def save(self, step: int, state, data_iter, meta: dict):
    """Starts an async save; the arrays are copied off the device before it returns."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=pipeline.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state, shardings, data_iter):
    """Full resume: (state, meta); `data_iter` is moved to the saved position in place."""
    where = self.path(step)
    check_compatible(_read_metadata(self.manager, step, where), abstract_state, where)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_with_shardings(abstract_state, shardings)),
          data=pipeline.CheckpointRestore(data_iter),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax/TensorStore/JSON errors: say which checkpoint is broken
      raise CheckpointError(f'checkpoint {where} is unreadable (corrupt or incomplete): '
                            f'{type(e).__name__}: {_short(e)}') from e
    return restored['state'], restored['meta']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _read_metadata(manager, step, where):
  try:
    return manager.item_metadata(step)['state']
  except Exception as e:
    raise CheckpointError(f'checkpoint {where}: cannot read its metadata (corrupt or incomplete): '
                          f'{type(e).__name__}: {_short(e)}') from e


def _short(e: Exception, limit: int = 1500) -> str:
  msg = str(e)  # Orbax can print whole trees; the head names the file and the problem
  return msg if len(msg) <= limit else msg[:limit] + ' ...'


def resolve(path: str) -> tuple[epath.Path, int]:
  """`<dir>/checkpoints` (its latest step) or `<dir>/checkpoints/<step>` -> (checkpoints dir, step)."""
  path = paths.as_path(path)
  if path.name.isdigit() and path.is_dir():
    return path.parent, int(path.name)
  if not path.is_dir():
    raise CheckpointError(f'train.init_from: no checkpoint directory at {path}')
  steps = [int(d.name) for d in path.iterdir() if d.name.isdigit() and d.is_dir()]
  if not steps:
    raise CheckpointError(f'train.init_from: {path} holds no finished checkpoint')
  return path, max(steps)


def load_for_init(path: str, abstract_state, shardings, parts: tuple[str, ...]):
  """Reads only `parts` of the state (e.g. params for the next stage) from a checkpoint.

  Returns ({part: tree}, meta, checkpoint step dir). Used by `train.init_from`: the stage
  starts at step 0 with a fresh optimizer and data iterator unless parts include 'opt'.
  """
  directory, step = resolve(path)
  where = str(directory / str(step))
  # The PyTree handler (what the Standard one wraps, same format) can restore a subtree. The
  # data item is not read, but Orbax warns about any saved item it has no handler for.
  manager = ocp.CheckpointManager(directory, item_handlers={
      'state': ocp.PyTreeCheckpointHandler(), 'data': pipeline.CheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler()})
  try:
    saved = _read_metadata(manager, step, where)
    check_compatible(saved, {p: abstract_state[p] for p in parts}, where, prefixes=parts)
    # Partial restore: read the wanted subtrees, leave the rest on disk.
    target = {p: _with_shardings(abstract_state[p], shardings[p]) for p in parts}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True),
          meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f'checkpoint {where} is unreadable (corrupt or incomplete): '
                            f'{type(e).__name__}: {_short(e)}') from e
  finally:
    manager.close()
  return restored['state'], restored['meta'], where
