"""Files of the resumable jobs (sampling, extraction, demo): atomic writes and the settings a folder was made with."""
import json
import os


def atomic_write(path: str, write) -> None:
  """write(file) into path.tmp, then rename: a killed run never leaves a partial file under `path`."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def check_same_settings(path: str, settings: dict, folder: str, holds: str, expected: str) -> None:
  """Refuse to resume into a folder whose JSON record at `path` has other settings (no file: a fresh one).

  The error names the first differing key: '{folder} holds {holds} of other settings (key: old there,
  new now); {expected}'.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  diff = sorted(k for k in settings if old.get(k) != settings[k])
  if diff:
    raise ValueError(f"{folder} holds {holds} of other settings ({diff[0]}: {old.get(diff[0])!r} there, "
                     f"{settings[diff[0]]!r} now); {expected}")


def write_json(path: str, value) -> None:
  """value as indented JSON, written atomically (job settings, timings, reports)."""
  atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))
