"""The file layer of every user path (workdir, data sets, checkpoints, samples, shards, reports):
etils.epath,
so `gs://...` (and any scheme epath knows) works wherever a local path does. Plus the resumable
jobs' files (sampling, extraction, demo): atomic writes and the settings a folder was made with.

Never `os.path` / `open()` on a user path: `os.path.abspath("gs://b/run")` is `<cwd>/gs:/b/run`.
"""

import json

from etils import epath


def absolute(path) -> epath.Path:
  """The path as an absolute epath.Path; a path with a scheme (gs://) is absolute already and
  reaches epath untouched (orbax wants absolute paths)."""
  p = epath.Path(path)
  return p if "://" in str(path) else p.absolute()


def atomic_write(path, write) -> None:
  """write(file) into path.tmp, then rename: a killed run never leaves a partial file under
  `path`."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("wb") as f:
    write(f)
  tmp.replace(path)


def check_same_settings(path, settings: dict, folder, holds: str, expected: str) -> None:
  """Refuse to resume into a folder whose JSON record at `path` has other settings (no file: a fresh
  one).

  The error names the first differing key: '{folder} holds {holds} of other settings (key: old
  there, new now); {expected}'.
  """
  path = epath.Path(path)
  if not path.exists():
    return
  old = json.loads(path.read_text())
  diff = sorted(k for k in settings if old.get(k) != settings[k])
  if diff:
    raise ValueError(
      f"{folder} holds {holds} of other settings ({diff[0]}: {old.get(diff[0])!r} there, "
      f"{settings[diff[0]]!r} now); {expected}"
    )


def read_json(path):
  """The JSON value at `path`, or None when there is no file."""
  path = epath.Path(path)
  return json.loads(path.read_text()) if path.exists() else None


def write_json(path, value) -> None:
  """value as indented JSON, written atomically (job settings, timings, reports)."""
  atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))
