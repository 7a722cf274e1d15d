"""LlamaGen's image + caption index and the T5 feature files its extractor writes beside it.

The index is a .jsonl file, or a folder of them taken in name order (other files ignored), one JSON
object a line: {"image_path": ..., "text": [blip caption, llava caption, llava first sentence]} in
LAION-COCO's; `caption_key` names the field and `caption_index` the element when it holds a list.
Features of line i of `{stem}.jsonl` (stem: the name up to its first '.') are float32 [1, L, dim] at
`{t5_path}/{stem}/{i}.npy`, L <= 120 the caption's token count (NPP.md, "Text to image").
"""

import dataclasses
import json
from typing import Optional

from etils import epath
import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
  image_path: str
  caption: str
  stem: str  # The jsonl file's name up to its first '.': the feature folder's name.
  line: int  # 0-based line in that file: the feature file's name.


def jsonl_files(index) -> list[epath.Path]:
  path = epath.Path(index)
  if path.is_dir():
    found = sorted((f for f in path.iterdir() if f.name.endswith(".jsonl")), key=lambda f: f.name)
    if not found:
      raise ValueError(
        f"caption index {index} holds no .jsonl file; expected LlamaGen's jsonl files"
      )
    return found
  if not path.exists():
    raise ValueError(
      f"caption index {index} does not exist; expected a .jsonl file or a folder of them"
    )
  return [path]


def _caption(obj, key: str, index: int, where: str) -> str:
  if key not in obj:
    raise ValueError(f"{where} has no {key!r}; expected the caption under it (caption_key)")
  value = obj[key]
  if isinstance(value, list):
    if not -len(value) <= index < len(value):
      raise ValueError(
        f"{where}: {key!r} holds {len(value)} captions; caption_index {index} is out of range"
      )
    value = value[index]
  if not isinstance(value, str):
    raise ValueError(f"{where}: the caption is a {type(value).__name__}; expected a string")
  return value


def read_index(
  index, caption_key: str = "text", caption_index: int = 0, short: bool = False
) -> list[Entry]:
  """Every line of the index, in order; `short` keeps the caption's text before its first '.' (the
  release's short-caption variant). One-line ValueError naming file and line for a bad line."""
  entries = []
  for f in jsonl_files(index):
    stem = f.name.split(".")[0]
    try:
      lines = f.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
      raise ValueError(f"{f} is not UTF-8 text; expected a jsonl file") from None
    for i, line in enumerate(lines):
      where = f"{f}:{i + 1}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        raise ValueError(f"{where} is not a JSON object; expected one per line") from None
      if not isinstance(obj, dict) or not isinstance(obj.get("image_path"), str):
        raise ValueError(f"{where} has no 'image_path' string; expected LlamaGen's index lines")
      caption = _caption(obj, caption_key, caption_index, where)
      entries.append(Entry(obj["image_path"], caption.split(".")[0] if short else caption, stem, i))
  if not entries:
    raise ValueError(f"caption index {index} has no lines; expected one image a line")
  return entries


def entry_file(folder, entry: Entry) -> epath.Path:
  """{folder}/{stem}/{line}.npy: where LlamaGen's extractor put the entry's features (and where the
  converter looks for its codes)."""
  return epath.Path(folder) / entry.stem / f"{entry.line}.npy"


def read_features(path, dim: int) -> Optional[np.ndarray]:
  """One caption's features as float32 [L, dim] (stored [1, L, dim] or [L, dim]); None when there is
  no file (LlamaGen then marks the example invalid). A file of another width is an error."""
  path = epath.Path(path)
  if not path.exists():
    return None
  with path.open("rb") as f:
    try:
      x = np.load(f)
    except (ValueError, OSError, EOFError) as e:
      raise ValueError(f"{path} is not a .npy file ({e})") from None
  if x.ndim == 3 and x.shape[0] == 1:
    x = x[0]
  if x.ndim != 2 or x.shape[1] != dim or x.shape[0] < 1:
    raise ValueError(
      f"{path} holds caption features of shape {x.shape}; expected [1, L, {dim}] (caption_dim "
      f"{dim}, L >= 1)"
    )
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{path} holds {x.dtype} caption features; expected floats")
  return x.astype(np.float32)
