"""Orbax checkpoints of the train state, the Grain iterator and the stage metadata.

One step directory holds three items:
  state/  the train state pytree (params, non-trained model state, optimizer state, step,
          RNG key, skipped-step count), sharded arrays written by every process
  data/   the Grain iterator position (one JSON file per process), so a resumed run reads
          exactly the batches it would have read
  meta/   JSON: stage name, lineage (the stages and checkpoints this one descends from)
          and the config that produced it

and one file of our own:
  integrity.json  size and sha256 of every other file of the step (arrays, iterator state,
          metadata). Orbax's zarr3 arrays carry a crc32c only on their shard index, and its
          API offers no chunk checksums, so a flipped byte in an array would load silently.
          The manifest is written after all data (on the primary process, after every process
          has committed) and, with async saves, before Orbax renames the step into place (with
          synchronous ones right after), so a step directory without it never finished.

Restoring verifies the manifest first, then compares the saved tree with the one the config
builds (a mismatch names the parameter path and both shapes instead of failing deep inside
Orbax), then the saved config with the current one (`check_same_config`). `restore_latest`
falls back to the newest checkpoint that verifies and moves the bad ones aside.
"""
import hashlib
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.data import pipeline
from mobilemoe_jax.train import paths


MANIFEST = 'integrity.json'
# Orbax rewrites this one after the commit (timestamps), so it cannot be hashed; it is
# checked to exist and parse instead.
STEP_METADATA = '_CHECKPOINT_METADATA'
QUARANTINE = 'corrupt_checkpoints'   # beside checkpoints/: where failed steps are moved


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names the path and what differs."""


class CheckpointCorrupt(CheckpointError):
  """A checkpoint whose files fail verification or cannot be read (not a config mismatch)."""


# --------------------------------------------------------------------------- integrity


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open('rb') as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


def _files(directory: epath.Path) -> list[epath.Path]:
  """Every file below `directory` but the manifest (epath has no recursive glob for gs://)."""
  out = []
  for p in directory.iterdir():
    if p.is_dir():
      out += _files(p)
    elif p.name != MANIFEST:
      out.append(p)
  return sorted(out)


def write_manifest(step_dir, step: int):
  """Records size and sha256 of every file under `step_dir`; the manifest goes in last,
  by rename, so a reader sees all of it or none."""
  step_dir = epath.Path(step_dir)
  files = {str(p.relative_to(step_dir)): {'size': p.stat().length, 'sha256': _sha256(p)}
           for p in _files(step_dir) if p != step_dir / STEP_METADATA}
  tmp = step_dir / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps({'step': step, 'files': files}, indent=1))
  tmp.rename(step_dir / MANIFEST)


def verify(step_dir, step: int):
  """Checks every file a step's manifest lists; raises CheckpointCorrupt naming the step,
  the file and what failed."""
  step_dir = epath.Path(step_dir)
  where = f'checkpoint step {step} ({step_dir})'
  manifest = step_dir / MANIFEST
  if not step_dir.is_dir():
    raise CheckpointCorrupt(f'{where} is missing')
  if not manifest.exists():
    what = 'the directory is empty' if not any(step_dir.iterdir()) else \
        'the save never finished, or the file was deleted'
    raise CheckpointCorrupt(f'{where} is incomplete/corrupt: {MANIFEST} missing ({what})')
  try:
    files = json.loads(manifest.read_text())['files']
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CheckpointCorrupt(f'{where} is corrupt: {MANIFEST} unreadable ({e})') from None
  problems = []
  try:
    json.loads((step_dir / STEP_METADATA).read_text())
  except FileNotFoundError:
    problems.append(f'{STEP_METADATA} missing')
  except (ValueError, UnicodeDecodeError):
    problems.append(f'{STEP_METADATA} is not valid JSON')
  for rel, want in files.items():
    path = step_dir / rel
    if not path.exists():
      problems.append(f'{path} missing')
    elif (size := path.stat().length) != want['size']:
      problems.append(f'{path} has {size} bytes, {want["size"]} were written'
                      + (' (truncated)' if size < want['size'] else ''))
    elif _sha256(path) != want['sha256']:
      problems.append(f'{path} fails its sha256 check (contents changed)')
  if problems:
    more = f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''
    raise CheckpointCorrupt(f'{where} is incomplete/corrupt: {"; ".join(problems[:3])}{more}')


# -------------------------------------------------------------------------------- config

# Fields a resumed run may change without train.allow_config_change: how long to run, how
# often to log, evaluate and save, where the stage started from (read only at step 0), the
# mesh (Orbax reshards on restore) and how expert-parallel all-to-alls are sliced (absent
# from checkpoints written before the field); none changes what a step computes.
RUN_CONTROL = ('train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
               'train.checkpoint_every', 'train.keep_checkpoints', 'train.async_checkpoints',
               'train.progress', 'train.allow_config_change', 'train.checkpoint_fallback',
               'train.init_from', 'train.restore_optimizer', 'mesh.',
               'model.moe.ep_overlap_chunks')


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """'field: saved -> current' for every field that differs, run-control fields excepted."""
  # Through JSON, as the checkpoint stored it (tuples become lists).
  saved, current = _flatten(saved), _flatten(json.loads(json.dumps(current)))
  return [f'  {k}: {saved.get(k, "<absent>")!r} -> {current.get(k, "<absent>")!r}'
          for k in sorted(set(saved) | set(current))
          if not k.startswith(RUN_CONTROL) and saved.get(k, '<absent>') != current.get(k, '<absent>')]


def check_same_config(saved: dict, current: dict, where: str, allow: bool) -> list[str]:
  """Raises CheckpointError listing the differences unless `allow`; returns them. Retired
  model fields in `saved` count as today's behaviour (config.upgrade_saved_model)."""
  if 'model' in saved:
    saved = dict(saved, model=config_lib.upgrade_saved_model(saved['model'], f'checkpoint {where}'))
  diffs = config_differences(saved, current)
  if diffs and not allow:
    raise CheckpointError(
        f'checkpoint {where} was written with another config ({len(diffs)} differences); '
        'resume with the same config, or pass --config.train.allow_config_change=True:\n'
        + '\n'.join(diffs[:30]))
  return diffs


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
  """A CheckpointManager for one stage's `<workdir>/checkpoints`: async saves, keep-last-K,
  an integrity manifest per step, and resume from the newest step that verifies."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = paths.as_path(directory)   # local or gs://
    self._async = async_save
    self._saving = None   # the step being written, for _seal
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal)
            if async_save else None),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': pipeline.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return str(self.directory / str(step))

  def save(self, step: int, state, data_iter, meta: dict):
    """Starts an async save; the arrays are copied off the device before it returns.
    data_iter None writes no data item: a checkpoint to start a stage from, evaluate or
    export (e.g. an imported one, mobilemoe_jax/convert), never to resume."""
    self.manager.wait_until_finished()   # _saving belongs to one save at a time
    self._saving = step
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items['data'] = pipeline.CheckpointSave(data_iter)
    self.manager.save(step, force=True, args=ocp.args.Composite(**items))
    if not self._async and jax.process_index() == 0:
      write_manifest(self.directory / str(step), step)   # the step is already in place

  def _seal(self):
    """Orbax's post-finalization callback (primary process, every process has committed,
    the step not yet renamed into place): writes the manifest into the step directory."""
    step = self._saving
    # Locally Orbax writes into `<step>.orbax-checkpoint-tmp...` and renames it last; on
    # object stores it writes the final directory directly.
    tmp = [d for d in self.directory.iterdir()
           if d.name.startswith(f'{step}{ocp.utils.TMP_DIR_SUFFIX}')]
    newest = max(tmp, key=lambda d: d.stat().mtime) if tmp else self.directory / str(step)
    write_manifest(newest, step)

  def restore(self, step: int, abstract_state, shardings, data_iter, *, config: dict,
              allow_config_change: bool):
    """Full resume from one step: (state, meta, config differences); `data_iter` is moved
    to the saved position in place. Raises CheckpointCorrupt if the step fails verification
    or cannot be read, CheckpointError if it does not fit the config."""
    where = self.path(step)
    verify(where, step)
    check_compatible(_read_metadata(self.manager, step, where), abstract_state, where)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:
      raise _unreadable(where, e) from e
    diffs = check_same_config(meta['config'], config, where, allow_config_change)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_with_shardings(abstract_state, shardings)),
          data=pipeline.CheckpointRestore(data_iter)))
    except Exception as e:  # Orbax/TensorStore/JSON errors: say which checkpoint is broken
      raise _unreadable(where, e) from e
    return restored['state'], meta, diffs

  def restore_latest(self, *args, fallback: bool, log, **kw):
    """Restores the newest step that verifies: (step, state, meta, diffs), or None when
    there is no checkpoint. A step that fails is reported through `log`, moved to
    `<workdir>/corrupt_checkpoints/` and the next older one tried; with fallback=False the
    first failure is raised instead."""
    on_disk = {int(d.name) for d in self.directory.iterdir() if d.name.isdigit() and d.is_dir()}
    steps = sorted(set(self.manager.all_steps()) | on_disk, reverse=True)
    for step in steps:
      try:
        return (step, *self.restore(step, *args, **kw))
      except CheckpointCorrupt as e:
        if not fallback:
          raise CheckpointCorrupt(f'{e}\nNot falling back to an older checkpoint '
                                  '(train.checkpoint_fallback=False).') from e
        moved = self._quarantine(step)
        older = [s for s in steps if s < step]
        log(f'WARNING: {e}\n  moved it to {moved}; '
            + (f'falling back to checkpoint step {older[0]}' if older else 'no older checkpoint'))
    if steps:
      raise CheckpointCorrupt(
          f'no checkpoint in {self.directory} verifies (steps {steps}, moved to '
          f'{self.directory.parent / QUARANTINE}); rerun to start this stage from step 0')
    return None

  def _quarantine(self, step: int) -> epath.Path:
    """Moves a failed step out of Orbax's sight (keep-last-K would otherwise count it and
    delete good ones); kept for inspection."""
    target = self.directory.parent / QUARANTINE / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      n = 0
      while target.exists():
        n += 1
        target = target.parent / f'{step}.{n}'
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
    self.manager.reload()
    return target

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _unreadable(where: str, e: Exception) -> CheckpointCorrupt:
  return CheckpointCorrupt(f'checkpoint {where} is unreadable (corrupt or incomplete): '
                           f'{type(e).__name__}: {_short(e)}')


def _read_metadata(manager, step, where):
  try:
    return manager.item_metadata(step)['state']
  except Exception as e:
    raise CheckpointCorrupt(f'checkpoint {where}: cannot read its metadata (corrupt or incomplete): '
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
  verify(where, step)
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
      raise _unreadable(where, e) from e
  finally:
    manager.close()
  return restored['state'], restored['meta'], where
