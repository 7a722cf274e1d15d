"""Caption features LlamaGen's extractor already wrote, + its index + VQ codes -> a caption code
data set.

LlamaGen (language/extract_t5_feature.py) writes the FLAN-T5 features of line i of `{stem}.jsonl` to
`{t5_path}/{stem}/{i}.npy`; the codes are read from the same layout under `--codes` (one image's
codes [1, n_aug, h*w], [n_aug, h*w] or [h*w] per file, as npy_codes reads them). A line whose
features or codes file is missing becomes an invalid example (LlamaGen's t2i data set marks them
so), counted; a file of the wrong shape is an error. Features longer than max_length are cut to it
and counted.

  python -m npp_jax.npy_captions --index=DIR --t5_features=DIR --codes=DIR --out=DIR \
      --vocab_size=16384 [--caption_key=text --caption_index=0] [--caption_dim=2048]
"""

import dataclasses
import sys
from typing import Optional, Sequence

from absl import flags
import numpy as np

from npp_jax import npy_codes
from npp_jax import text
from npp_jax.data import caption_index as jsonl
from npp_jax.data import captions


@dataclasses.dataclass
class Counts:
  examples: int = 0
  no_features: int = 0  # Lines without a feature file: invalid.
  no_codes: int = 0  # Lines without a codes file: invalid.
  truncated: int = 0  # Feature files longer than max_length, cut.


def _example(entry, t5_features, codes_dir, grid, dim, max_length, counts):
  """(codes [n_aug, h, w] or None, features [L, dim] or None) of one index line."""
  feats = jsonl.read_features(jsonl.entry_file(t5_features, entry), dim)
  code_file = jsonl.entry_file(codes_dir, entry)
  codes = npy_codes.read_codes(str(code_file), grid) if code_file.exists() else None
  counts.no_features += feats is None
  counts.no_codes += codes is None
  if feats is not None and len(feats) > max_length:
    counts.truncated += 1
    feats = feats[:max_length]
  return codes, feats


def _first_codes(entries, codes_dir, grid) -> np.ndarray:
  for e in entries:
    if jsonl.entry_file(codes_dir, e).exists():
      return npy_codes.read_codes(str(jsonl.entry_file(codes_dir, e)), grid)
  raise ValueError(f"no codes file {{stem}}/{{line}}.npy in {codes_dir} for any index line")


def from_llamagen(
  index,
  t5_features,
  codes_dir,
  out_dir,
  *,
  vocab_size: int,
  caption_dim: int = 2048,
  caption_key: str = "text",
  caption_index: int = 0,
  short_caption: bool = False,
  grid=None,
  max_length: int = text.MAX_LENGTH,
  split: str = "train",
  overwrite: bool = False,
  batch: int = 256,
) -> tuple[captions.CaptionDatasetMetadata, Counts]:
  """Streams the index's lines into split `split` of a caption code data set at out_dir, in index
  order (example i is the i-th line over the jsonl files in name order). The first files are checked
  before anything is written; a bad file later stops the job and removes what it wrote."""
  entries = jsonl.read_index(index, caption_key, caption_index, short_caption)
  first = _first_codes(entries, codes_dir, grid)
  n_aug, grid = first.shape[0], first.shape[1:]
  counts = Counts()
  with captions.CaptionDatasetWriter(
    out_dir,
    grid,
    n_aug,
    vocab_size,
    caption_dim,
    max_length=max_length,
    split=split,
    overwrite=overwrite,
  ) as writer:
    for start in range(0, len(entries), batch):
      part = entries[start : start + batch]
      got = [
        _example(e, t5_features, codes_dir, grid, caption_dim, max_length, counts) for e in part
      ]
      codes = np.zeros((len(part), *first.shape), np.int64)
      feats = np.zeros((len(part), max_length, caption_dim), np.float32)
      lengths = np.zeros((len(part),), np.int64)
      valid = np.zeros((len(part),), bool)
      for i, (c, x) in enumerate(got):
        if c is not None and c.shape != first.shape:
          raise ValueError(
            f"{jsonl.entry_file(codes_dir, part[i])} holds codes of shape {c.shape}, the "
            f"first image's are {first.shape}"
          )
        if c is not None and x is not None:
          codes[i], feats[i, : len(x)], lengths[i], valid[i] = c, x, len(x), True
      writer.add(codes, feats, lengths, [e.caption for e in part], valid)
      counts.examples += len(part)
  return captions.load_metadata(str(out_dir), split), counts


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line (argv without the program name); bad input ends in one `error:` line, status
  2."""
  from npp_jax import cli

  fv = flags.FlagValues()
  flags.DEFINE_string(
    "index", None, "LlamaGen's .jsonl index, or a folder of them.", flag_values=fv
  )
  flags.DEFINE_string(
    "t5_features", None, "LlamaGen's T5 feature folder (t5_path).", flag_values=fv
  )
  flags.DEFINE_string("codes", None, "Folder of {stem}/{line}.npy VQ codes.", flag_values=fv)
  flags.DEFINE_string("out", None, "Caption code data set directory to write.", flag_values=fv)
  flags.DEFINE_integer("vocab_size", None, "Codebook size.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer(
    "caption_dim", 2048, "Feature width (FLAN-T5-XL: 2048).", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_string("caption_key", "text", "Index field holding the caption.", flag_values=fv)
  flags.DEFINE_integer(
    "caption_index", 0, "Which caption when the field is a list.", flag_values=fv
  )
  flags.DEFINE_bool("short_caption", False, "Keep the text before the first '.'.", flag_values=fv)
  flags.DEFINE_list("grid", None, "h,w of the code grid; default: square.", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split to write.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace the split if it exists.", flag_values=fv)
  flags.mark_flags_as_required(
    ["index", "t5_features", "codes", "out", "vocab_size"], flag_values=fv
  )
  try:
    rest = cli.parse(["npp_jax.npy_captions", *(sys.argv[1:] if argv is None else argv)], fv)
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
    meta, counts = from_llamagen(
      fv.index,
      fv.t5_features,
      fv.codes,
      fv.out,
      vocab_size=fv.vocab_size,
      caption_dim=fv.caption_dim,
      caption_key=fv.caption_key,
      caption_index=fv.caption_index,
      short_caption=fv.short_caption,
      grid=grid,
      split=fv.split,
      overwrite=fv.overwrite,
    )
  except cli.USER_ERRORS as e:
    return cli.report(e)
  print(
    f"wrote split '{fv.split}' of {fv.out}: {meta.num_examples} examples, {meta.num_valid} valid "
    f"({counts.no_features} without features, {counts.no_codes} without codes); "
    f"{counts.truncated} features cut to {meta.max_length} tokens"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
