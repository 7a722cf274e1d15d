"""LlamaGen's T5 feature files + jsonl index + codes -> a caption code data set, through the real
CLI."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from support.cli import run_main

from npp_jax import npy_captions
from npp_jax.data import caption_index
from npp_jax.data import captions

DIM, SIDE = 16, 2


def _tree(root, rng):
  """index/ (two jsonl files out of name order, and a stray file), t5/{stem}/{line}.npy features
  (one missing, one of 125 tokens), codes/{stem}/{line}.npy (one missing). Returns what each example
  should be: (caption, codes or None, features or None)."""
  index, t5, codes = root / "index", root / "t5", root / "codes"
  index.mkdir()
  (index / "notes.txt").write_text("not an index")
  want = []
  for stem, n in (("part_a", 3), ("part_b", 4)):
    lines = []
    for i in range(n):
      caption = [f"{stem} blip {i}", f"{stem} llava {i}. More.", f"{stem} short {i}"]
      lines.append(json.dumps({"image_path": f"/img/{stem}/{i}.jpg", "text": caption}))
      feats = rng.normal(size=(1, 125 if (stem, i) == ("part_b", 2) else 3 + i, DIM))
      c = rng.integers(0, 50, (1, 1, SIDE * SIDE))
      if (stem, i) != ("part_a", 1):
        (t5 / stem).mkdir(parents=True, exist_ok=True)
        np.save(t5 / stem / f"{i}.npy", feats.astype(np.float32))
      else:
        feats = None
      if (stem, i) != ("part_b", 0):
        (codes / stem).mkdir(parents=True, exist_ok=True)
        np.save(codes / stem / f"{i}.npy", c)
      else:
        c = None
      want.append((caption[1], c, feats))
    (index / f"{stem}.jsonl").write_text("\n".join(lines) + "\n")
  return index, t5, codes, want


def _run(*args):
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  return run_main(*args, module="npp_jax.npy_captions", env=env, cwd=None, timeout=None)


def test_cli_converts(tmp_path):
  index, t5, codes, want = _tree(tmp_path, np.random.default_rng(0))
  out = tmp_path / "out"
  args = [f"--index={index}", f"--t5_features={t5}", f"--codes={codes}", f"--out={out}"]
  r = _run(*args, "--vocab_size=50", f"--caption_dim={DIM}", "--caption_index=1")
  assert r.returncode == 0, r.stderr
  assert "7 examples, 5 valid (1 without features, 1 without codes); 1 features cut" in r.stdout
  meta = captions.load_metadata(str(out))
  assert (meta.num_examples, meta.num_valid, meta.grid, meta.max_caption_length) == (
    7,
    5,
    (2, 2),
    120,
  )
  batches = list(captions.make_eval_iterator(str(out), batch_size=8, split="train"))
  got = {k: batches[0][k][:7] for k in batches[0]}
  assert captions.read_texts(str(out), range(7)) == [w[0] for w in want]
  for i, (_, c, feats) in enumerate(want):
    assert got["valid"][i] == (c is not None and feats is not None)
    if not got["valid"][i]:
      assert got["caption_len"][i] == 0 and not got["caption"][i].astype(np.float32).any()
      continue
    x = feats[0, :120].astype(ml_dtypes.bfloat16).astype(np.float32)  # 125 tokens: cut to 120.
    assert got["caption_len"][i] == len(x)
    np.testing.assert_array_equal(got["caption"][i, 120 - len(x) :].astype(np.float32), x)
    assert not got["caption"][i, : 120 - len(x)].astype(np.float32).any()
    np.testing.assert_array_equal(got["codes"][i], c.reshape(SIDE, SIDE))


def test_cli_wrong_feature_size(tmp_path):
  index, t5, codes, _ = _tree(tmp_path, np.random.default_rng(1))
  out = tmp_path / "out"
  r = _run(
    f"--index={index}", f"--t5_features={t5}", f"--codes={codes}", f"--out={out}", "--vocab_size=50"
  )
  assert r.returncode == 2
  assert r.stderr.strip().count("\n") == 0
  assert f"holds caption features of shape (3, {DIM}); expected [1, L, 2048]" in r.stderr
  assert not out.exists()


def test_short_caption_and_key(tmp_path):
  index, t5, codes, _ = _tree(tmp_path, np.random.default_rng(2))
  entries = caption_index.read_index(index, "text", 1, short=True)
  assert [e.caption for e in entries[:2]] == ["part_a llava 0", "part_a llava 1"]
  assert [(e.stem, e.line) for e in entries] == [("part_a", i) for i in range(3)] + [
    ("part_b", i) for i in range(4)
  ]


BAD_INDEX = {
  "not utf-8": (b"\xff\xfe{}", "is not UTF-8 text"),
  "not json": (b"{oops\n", "part.jsonl:1 is not a JSON object"),
  "no image": (b'{"text": ["a"]}\n', "part.jsonl:1 has no 'image_path' string"),
  "no key": (b'{"image_path": "a.jpg"}\n', "part.jsonl:1 has no 'text'"),
  "index": (b'{"image_path": "a.jpg", "text": ["a"]}\n', "holds 1 captions; caption_index 3"),
  "empty": (b"", "has no lines; expected one image a line"),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEX))
def test_bad_index(tmp_path, case):
  content, message = BAD_INDEX[case]
  (tmp_path / "part.jsonl").write_bytes(content)
  with pytest.raises(ValueError, match=message) as e:
    npy_captions.from_llamagen(
      tmp_path / "part.jsonl", tmp_path, tmp_path, tmp_path / "out", vocab_size=4, caption_index=3
    )
  assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
