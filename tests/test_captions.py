"""The caption code data set (npp_jax.data.captions): what is written is read back, right-aligned,
in the class data set's order, with its iterator state; bad batches refused in one line."""

import json
import re

import chex
import ml_dtypes
import numpy as np
import pytest

from npp_jax.data import captions
from npp_jax.data import code_dataset

N, GRID, N_AUG, VOCAB, DIM, MAX_LEN = 22, (2, 3), 2, 300, 8, 6


def _examples(seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, VOCAB, (N, N_AUG, *GRID))
  codes[:, :, 0, 0] = np.arange(N)[:, None]  # Each example names itself: order checks read it back.
  lengths = rng.integers(1, MAX_LEN + 1, N)
  feats = rng.normal(size=(N, MAX_LEN, DIM)).astype(np.float32)
  valid = np.ones(N, bool)
  valid[[3, 10]] = False
  texts = [f"caption {i} \u00e9\u00e8" for i in range(N)]
  return codes, feats, lengths, texts, valid


def _write(path, examples, batch=5):
  codes, feats, lengths, texts, valid = examples
  with captions.CaptionDatasetWriter(path, GRID, N_AUG, VOCAB, DIM, max_length=MAX_LEN) as w:
    for i in range(0, N, batch):
      s = slice(i, i + batch)
      w.add(codes[s], feats[s], lengths[s], texts[s], valid[s])
  return captions.load_metadata(path)


def _expected(examples, ids, aug):
  """NumPy reference of a batch: bf16-rounded features moved to the end of a zero buffer."""
  codes, feats, lengths, _, valid = examples
  caption = np.zeros((len(ids), MAX_LEN, DIM), np.float32)
  for row, i in enumerate(ids):
    n = lengths[i] if valid[i] else 0
    if n:
      caption[row, MAX_LEN - n :] = feats[i, :n].astype(ml_dtypes.bfloat16).astype(np.float32)
  want_codes = np.where(valid[ids, None, None], codes[ids, aug], 0)
  return want_codes, caption, np.where(valid[ids], lengths[ids], 0), valid[ids]


def test_round_trip_in_class_order(tmp_path):
  examples = _examples()
  meta = _write(tmp_path / "cap", examples)
  assert (meta.num_examples, meta.num_valid, meta.caption_dim, meta.max_length) == (N, 20, DIM, 6)
  assert meta.max_caption_length == examples[2][examples[4]].max()
  # A class data set of the same size whose labels are the example ids gives the order to expect.
  code_dataset.write_code_dataset(
    tmp_path / "cls", examples[0], np.arange(N), vocab_size=VOCAB, num_classes=N
  )
  kw = dict(global_batch_size=4, seed=3)
  cap = captions.make_train_iterator(str(tmp_path / "cap"), **kw)
  cls = code_dataset.make_train_iterator(str(tmp_path / "cls"), **kw)
  for step in range(12):  # Past an epoch (5 steps): a new shuffle and new augmentations.
    got, ref = next(cap), next(cls)
    ids = ref["labels"]
    aug = code_dataset.augmentation_index(3, step // 5, ids, N_AUG)
    want_codes, want_caption, want_len, want_valid = _expected(examples, ids, aug)
    chex.assert_type(got["caption"], ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got["codes"], want_codes)
    np.testing.assert_array_equal(got["caption"].astype(np.float32), want_caption)
    np.testing.assert_array_equal(got["caption_len"], want_len)
    np.testing.assert_array_equal(got["valid"], want_valid)
    np.testing.assert_array_equal(got["codes"][want_valid], ref["codes"][want_valid])
  assert captions.read_texts(str(tmp_path / "cap"), [0, 21]) == ["caption 0 éè", "caption 21 éè"]


def test_processes_and_state(tmp_path):
  _write(tmp_path / "cap", _examples())
  path = str(tmp_path / "cap")
  whole = captions.make_train_iterator(path, global_batch_size=4, seed=1)
  halves = [
    captions.make_train_iterator(
      path, global_batch_size=4, seed=1, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  for _ in range(3):
    want, parts = next(whole), [next(h) for h in halves]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
  state = code_dataset.iterator_state(whole)
  later = [next(whole)["codes"] for _ in range(4)]
  fresh = captions.make_train_iterator(path, global_batch_size=4, seed=1)
  code_dataset.restore_iterator(fresh, json.loads(json.dumps(state)))
  for want in later:
    np.testing.assert_array_equal(next(fresh)["codes"], want)


def test_eval_pass(tmp_path):
  examples = _examples()
  _write(tmp_path / "cap", examples)
  batches = list(captions.make_eval_iterator(str(tmp_path / "cap"), batch_size=8, split="train"))
  assert len(batches) == 3
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == N and not mask[N:].any()
  ids = np.arange(N)
  want_codes, want_caption, want_len, want_valid = _expected(examples, ids, np.zeros(N, int))
  got = {k: np.concatenate([b[k] for b in batches])[:N] for k in batches[0]}
  np.testing.assert_array_equal(got["codes"], want_codes)
  np.testing.assert_array_equal(got["caption"].astype(np.float32), want_caption)
  np.testing.assert_array_equal(got["caption_len"], want_len)
  np.testing.assert_array_equal(got["valid"], want_valid)
  assert not batches[-1]["caption"][~batches[-1]["mask"]].astype(np.float32).any()


def _bad(examples, **change):
  codes, feats, lengths, texts, valid = (x[:4] for x in examples)
  args = dict(codes=codes, captions=feats, lengths=lengths, texts=texts, valid=valid)
  args.update(change)
  return args


BAD = {
  "caption_dim": (
    lambda e: _bad(e, captions=e[1][:4, :, :5]),
    "expected [4, T, 8] (caption_dim 8)",
  ),
  "too long": (
    lambda e: _bad(e, captions=np.zeros((4, 7, DIM))),
    "have 7 positions; expected at most max_length 6",
  ),
  "length": (
    lambda e: _bad(e, lengths=np.array([1, 0, 2, 2])),
    "caption length 0 at example 1 is outside [1, 6]",
  ),
  "code": (
    lambda e: _bad(e, codes=np.full((4, N_AUG, *GRID), VOCAB)),
    "code 300 at example 0 is outside [0, vocab_size 300)",
  ),
  "nan": (
    lambda e: _bad(e, captions=np.full((4, MAX_LEN, DIM), np.nan)),
    "caption features at example 0 are not finite",
  ),
  "text": (lambda e: _bad(e, texts=[b"x"] * 4), "caption text at example 0 is a bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_batch(tmp_path, case):
  make, message = BAD[case]
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    with captions.CaptionDatasetWriter(
      tmp_path / "cap", GRID, N_AUG, VOCAB, DIM, max_length=6
    ) as w:
      w.add(**make(_examples()))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "cap").exists()  # The failed writer left the directory as it found it.


def test_kinds_do_not_mix(tmp_path):
  _write(tmp_path / "cap", _examples())
  code_dataset.write_code_dataset(
    tmp_path / "cls", np.zeros((2, 2, 2), int), [0, 1], vocab_size=4, num_classes=2
  )
  with pytest.raises(
    ValueError, match="is a caption code data set; expected a class code data set"
  ):
    code_dataset.load_metadata(str(tmp_path / "cap"))
  with pytest.raises(
    ValueError, match="is a class code data set; expected a caption code data set"
  ):
    captions.make_train_iterator(str(tmp_path / "cls"), global_batch_size=1, seed=0)
  with pytest.raises(
    ValueError, match="is a class code data set; this writer adds caption examples"
  ):
    captions.CaptionDatasetWriter(tmp_path / "cls", (2, 2), 1, 4, DIM, split="test")
