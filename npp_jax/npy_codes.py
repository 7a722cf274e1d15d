"""LlamaGen's code extraction output -> a code data set (npp_jax.data.code_dataset).

The PyTorch release writes one file per image: <src>/<name>_codes/{i}.npy and
<src>/<name>_labels/{i}.npy. `from_npy_folder` streams such a folder into a split of a code data
set; the command line does the same:

  python -m npp_jax.npy_codes --from_npy=DIR --out=DIR --vocab_size=16384 --num_classes=1000
"""

import math
import re
import sys
from typing import Optional, Sequence

from absl import flags
from etils import epath
import numpy as np

from npp_jax.data import code_dataset


def _npy_index(folder: str) -> dict[int, str]:
  files = {}
  for f in epath.Path(folder).iterdir():
    m = re.fullmatch(r"(\d+)\.npy", f.name)
    if m:
      files[int(m.group(1))] = str(f)
  return files


def _one_subfolder(src: str, suffix: str) -> str:
  found = sorted(
    d.name for d in epath.Path(src).iterdir() if d.name.endswith(suffix) and d.is_dir()
  )
  if len(found) != 1:
    raise ValueError(f"expected exactly one '*{suffix}' folder in {src}, found {found or 'none'}")
  return str(epath.Path(src) / found[0])


def read_codes(path: str, grid) -> np.ndarray:
  """One image's codes, stored as [1, n_aug, h*w], [n_aug, h*w] or [h*w] -> [n_aug, h, w]."""
  with epath.Path(path).open("rb") as f:
    x = np.load(f)
  if x.ndim == 3 and x.shape[0] == 1:
    x = x[0]
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2:
    raise ValueError(
      f"{path} holds codes of shape {x.shape}; expected [1, n_aug, h*w], [n_aug, h*w] or [h*w]"
    )
  if grid is None:
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
      raise ValueError(f"{path} has {x.shape[1]} codes per grid, not a square; pass grid=(h, w)")
    grid = (side, side)
  if grid[0] * grid[1] != x.shape[1]:
    raise ValueError(f"{path} has {x.shape[1]} codes per grid, expected h*w = {grid[0] * grid[1]}")
  return x.reshape(x.shape[0], *grid)


def _npy_label(path: str) -> np.ndarray:
  with epath.Path(path).open("rb") as f:
    y = np.load(f)
  if y.size != 1:
    raise ValueError(f"{path} holds a label of shape {y.shape}; expected [1] or a scalar")
  return y.reshape(())


def from_npy_folder(
  src: str,
  out_dir: str,
  *,
  vocab_size: int,
  num_classes: int,
  grid=None,
  split: str = "train",
  overwrite: bool = False,
  batch: int = 1024,
) -> code_dataset.CodeDatasetMetadata:
  """Converts a LlamaGen code folder (`*_codes/{i}.npy`, `*_labels/{i}.npy`) into split `split` of
  out_dir.

  Images are taken in the order of i. The files are streamed (ImageNet does not fit in memory), so a
  bad file part-way stops the job and removes what was written of the split.
  """
  if not epath.Path(src).is_dir():
    raise ValueError(f"{src} is not a directory")
  grid = None if grid is None else code_dataset.check_grid(grid)
  code_dir = _one_subfolder(src, "_codes")
  code_files, label_files = _npy_index(code_dir), _npy_index(_one_subfolder(src, "_labels"))
  if not code_files:
    raise ValueError(f"no {{i}}.npy files in {code_dir}")
  if code_files.keys() != label_files.keys():
    missing = sorted(code_files.keys() ^ label_files.keys())[0]
    side = "labels" if missing in code_files else "codes"
    raise ValueError(
      f"image {missing} has no {side} file in {src}; expected matching {{i}}.npy in both"
    )
  order = sorted(code_files)
  first = read_codes(code_files[order[0]], grid)
  n_aug, grid = first.shape[0], first.shape[1:]
  with code_dataset.CodeDatasetWriter(
    out_dir, grid, n_aug, vocab_size, num_classes, split=split, overwrite=overwrite
  ) as writer:
    for start in range(0, len(order), batch):
      ids = order[start : start + batch]
      codes = [read_codes(code_files[i], grid) for i in ids]
      for i, c in zip(ids, codes):
        if c.shape != first.shape:
          raise ValueError(
            f"{code_files[i]} holds codes of shape {c.shape}, the first image's are {first.shape}"
          )
      codes, labels = code_dataset.as_examples(  # Checked here too, to name the offending file.
        np.stack(codes),
        np.stack([_npy_label(label_files[i]) for i in ids]),
        vocab_size=vocab_size,
        num_classes=num_classes,
        where=lambda j: f"in {code_files[ids[j]]} / {label_files[ids[j]]}",
      )
      writer.add(codes, labels)
  return code_dataset.load_metadata(out_dir, split)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line (argv without the program name); bad input ends in one `error:` line, status
  2."""
  from npp_jax import cli  # The shared absl conventions of the three entry points.

  fv = flags.FlagValues()
  flags.DEFINE_string(
    "from_npy", None, "Folder with *_codes/ and *_labels/ subfolders.", flag_values=fv
  )
  flags.DEFINE_string("out", None, "Code data set directory to write.", flag_values=fv)
  flags.DEFINE_integer("vocab_size", None, "Codebook size.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("num_classes", None, "Number of classes.", lower_bound=1, flag_values=fv)
  flags.DEFINE_list("grid", None, "h,w of the code grid; default: square.", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split to write.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace the split if it exists.", flag_values=fv)
  flags.mark_flags_as_required(["from_npy", "out", "vocab_size", "num_classes"], flag_values=fv)
  try:
    rest = cli.parse(["npp_jax.npy_codes", *(sys.argv[1:] if argv is None else argv)], fv)
    if rest[1:]:
      raise ValueError(
        f"unexpected argument {rest[1]!r}; expected only --flags (--helpfull lists them)"
      )
    try:
      grid = None if fv.grid is None else tuple(int(g) for g in fv.grid)
    except ValueError:
      raise ValueError(
        f"--grid={','.join(fv.grid)}; expected two integers h,w (e.g. 16,16)"
      ) from None
    meta = from_npy_folder(
      fv.from_npy,
      fv.out,
      vocab_size=fv.vocab_size,
      num_classes=fv.num_classes,
      grid=grid,
      split=fv.split,
      overwrite=fv.overwrite,
    )
  except cli.USER_ERRORS as e:
    return cli.report(e)
  print(f"wrote split '{fv.split}' of {fv.out}: {meta}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
