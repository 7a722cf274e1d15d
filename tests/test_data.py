"""The code data set: write/read round trips, epoch order, augmentation draw, sharding, state, bad
input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from npp_jax import npy_codes
from npp_jax.data import code_dataset

N, N_AUG, GRID, VOCAB = 10, 3, (2, 4), 50
GLOBAL_BATCH = 4  # 10 examples -> 2 steps per epoch, 2 examples dropped every epoch.


def _random_codes(rng, shape, vocab=VOCAB):
  return rng.integers(1, vocab, size=shape)  # Never 0: a zero-filled read cannot pass for data.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Labels 1..N in a shuffled order identify the examples; every augmentation's codes are
  distinct."""
  rng = np.random.default_rng(0)
  codes = _random_codes(rng, (N, N_AUG, *GRID))
  labels = rng.permutation(N) + 1
  path = str(tmp_path_factory.mktemp("codes") / "ds")
  code_dataset.write_code_dataset(path, codes, labels, vocab_size=VOCAB, num_classes=N + 1)
  code_dataset.write_code_dataset(
    path, codes[:5], labels[:5], vocab_size=VOCAB, num_classes=N + 1, split="test"
  )
  return path, codes, labels


def _identify(batch, codes, labels):
  """(example, augmentation) of every row, checking that the row is exactly that stored grid."""
  out = []
  for c, l in zip(batch["codes"], batch["labels"]):
    ex = int(np.flatnonzero(labels == l)[0])
    aug = [a for a in range(codes.shape[1]) if np.array_equal(codes[ex, a], c)]
    assert len(aug) == 1, f"row with label {l} matches no stored augmentation"
    out.append((ex, aug[0]))
  return out


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
  return len(batches_a) == len(batches_b) and all(
    a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(batches_a, batches_b)
  )


def test_metadata(dataset):
  path, codes, labels = dataset
  meta = code_dataset.load_metadata(path)
  assert meta == code_dataset.CodeDatasetMetadata(
    num_examples=N,
    grid=GRID,
    n_aug=N_AUG,
    vocab_size=VOCAB,
    num_classes=N + 1,
    max_code=int(codes.max()),
    max_label=N,
  )
  assert code_dataset.load_metadata(path, "test").num_examples == 5
  assert code_dataset.steps_per_epoch(N, GLOBAL_BATCH) == 2


def test_round_trip_eval_order(dataset):
  path, codes, labels = dataset
  batches = list(code_dataset.make_eval_iterator(path, batch_size=4, split="train"))
  assert len(batches) == 3  # 4 + 4 + 2 real rows.
  got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert got["codes"].dtype == np.int32 and got["labels"].dtype == np.int32
  np.testing.assert_array_equal(got["mask"], np.arange(12) < N)
  np.testing.assert_array_equal(got["codes"][:N], codes[:, 0])
  np.testing.assert_array_equal(got["labels"][:N], labels)
  np.testing.assert_array_equal(got["codes"][N:], 0)


def test_eval_split_across_processes(dataset):
  path, _, _ = dataset
  whole = list(code_dataset.make_eval_iterator(path, batch_size=4, split="test"))
  parts = [
    list(
      code_dataset.make_eval_iterator(
        path, batch_size=4, split="test", process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  assert (
    len(whole) == len(parts[0]) == len(parts[1]) == 2
  )  # Same count everywhere, even all-padding ones.
  for w, a, b in zip(whole, *parts):
    for k in w:
      np.testing.assert_array_equal(w[k], np.concatenate([a[k], b[k]]))


def test_round_trip_every_augmentation_reachable(dataset):
  path, codes, labels = dataset
  it = code_dataset.make_train_iterator(path, global_batch_size=GLOBAL_BATCH, seed=0)
  batch = next(it)
  assert batch["codes"].shape == (GLOBAL_BATCH, *GRID) and batch["codes"].dtype == np.int32
  assert batch["labels"].shape == (GLOBAL_BATCH,) and batch["labels"].dtype == np.int32
  seen = set()
  for b in _take(it, 2 * 30):
    seen.update(_identify(b, codes, labels))
  assert seen == {(ex, a) for ex in range(N) for a in range(N_AUG)}


def test_data_source_holds_every_augmentation(dataset):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  path, codes, labels = dataset
  source = tfds.builder_from_directory(path).as_data_source("train")
  for i in range(N):
    np.testing.assert_array_equal(source[i]["codes"], codes[i])
    assert source[i]["label"] == labels[i]


def test_reading_does_not_import_tensorflow(dataset):
  path, _, _ = dataset
  script = (
    "import sys; from npp_jax.data import code_dataset; "
    f"it = code_dataset.make_train_iterator({path!r}, global_batch_size=2, seed=0); next(it); "
    f"next(code_dataset.make_eval_iterator({path!r}, batch_size=2, split='test')); "
    "print('tensorflow' in sys.modules)"
  )
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == "False"


def _epochs(path, codes, labels, seed, epochs, process_count=1):
  it = code_dataset.make_train_iterator(path, global_batch_size=GLOBAL_BATCH, seed=seed)
  steps = code_dataset.steps_per_epoch(N, GLOBAL_BATCH)
  return [sum((_identify(b, codes, labels) for b in _take(it, steps)), []) for _ in range(epochs)]


def test_epochs_are_fresh_shuffles_and_deterministic(dataset):
  path, codes, labels = dataset
  epochs = _epochs(path, codes, labels, seed=3, epochs=6)
  orders = [tuple(ex for ex, _ in e) for e in epochs]
  for order in orders:
    assert (
      len(order) == 8 and len(set(order)) == 8
    )  # A permutation cut to full batches: no repeats.
  assert len(set(orders)) > 1
  assert epochs == _epochs(path, codes, labels, seed=3, epochs=6)
  assert epochs != _epochs(path, codes, labels, seed=4, epochs=6)


def test_augmentation_drawn_per_example_and_epoch(dataset):
  path, codes, labels = dataset
  epochs = _epochs(path, codes, labels, seed=5, epochs=12)
  augs_of = {}
  for e in epochs:
    for ex, aug in e:
      augs_of.setdefault(ex, []).append(aug)
  assert all(len(set(a)) > 1 for a in augs_of.values())  # Changes between epochs.
  counts = np.bincount([a for e in epochs for _, a in e], minlength=N_AUG)
  assert counts.min() > 0.15 * counts.sum()  # Roughly uniform over the augmentations (1/3 each).
  # The draw is a function of (seed, epoch, example) only.
  np.testing.assert_array_equal(
    code_dataset.augmentation_index(5, 2, np.arange(100), N_AUG),
    code_dataset.augmentation_index(5, 2, np.arange(100), N_AUG),
  )
  assert not np.array_equal(
    code_dataset.augmentation_index(5, 2, np.arange(100), N_AUG),
    code_dataset.augmentation_index(6, 2, np.arange(100), N_AUG),
  )


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_get_disjoint_slices_of_the_global_batch(dataset, process_count):
  path, _, _ = dataset
  steps = 5  # Crosses two epoch boundaries.
  whole = _take(
    code_dataset.make_train_iterator(path, global_batch_size=GLOBAL_BATCH, seed=7), steps
  )
  parts = [
    _take(
      code_dataset.make_train_iterator(
        path, global_batch_size=GLOBAL_BATCH, seed=7, process_index=p, process_count=process_count
      ),
      steps,
    )
    for p in range(process_count)
  ]
  for s in range(steps):
    assert parts[0][s]["codes"].shape[0] == GLOBAL_BATCH // process_count
    for k in ("codes", "labels"):
      np.testing.assert_array_equal(np.concatenate([p[s][k] for p in parts]), whole[s][k])
    labels = np.concatenate([p[s]["labels"] for p in parts])
    assert (
      len(set(labels.tolist())) == GLOBAL_BATCH
    )  # Disjoint: the labels are distinct per example.


def test_state_restores_exactly(dataset):
  path, _, _ = dataset
  it = code_dataset.make_train_iterator(path, global_batch_size=GLOBAL_BATCH, seed=1)
  _take(it, 3)
  state = code_dataset.iterator_state(it)
  assert json.loads(json.dumps(state)) == state
  assert state == {"next_index": 3}
  expected = _take(it, 5)
  fresh = code_dataset.restore_iterator(
    code_dataset.make_train_iterator(path, global_batch_size=GLOBAL_BATCH, seed=1), state
  )
  assert _same(_take(fresh, 5), expected)
  assert _same(
    _take(code_dataset.restore_iterator(it, state), 5), expected
  )  # Rewinding a used iterator.
  with pytest.raises(ValueError, match="does not fit this iterator"):
    code_dataset.restore_iterator(it, {"bogus": 1})


# Run in a child interpreter: grain's worker processes leave a thread pool (shared-memory cleanup)
# in the process that started them for good, which must not share a pytest worker with the rest of
# the suite.
_WORKER_SCRIPT = """
import json, sys
import numpy as np
from npp_jax.data import code_dataset
path, batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
it = code_dataset.make_train_iterator(path, global_batch_size=batch, seed=2, worker_count=2)
try:
  first = [next(it) for _ in range(3)]
  state = code_dataset.iterator_state(it)
finally:
  it.close()
it = code_dataset.make_train_iterator(path, global_batch_size=batch, seed=2, worker_count=2)
try:
  it = code_dataset.restore_iterator(it, state)
  rest = [next(it) for _ in range(3)]
finally:
  it.close()
arrays = {f"{k}_{i}": b[k] for i, b in enumerate(first + rest) for k in b}
np.savez(out, state=json.dumps(state), **arrays)
"""


def test_worker_processes_same_order_and_state(dataset, tmp_path):
  path, _, _ = dataset
  reference = _take(
    code_dataset.make_train_iterator(path, global_batch_size=GLOBAL_BATCH, seed=2), 6
  )
  out = str(tmp_path / "batches.npz")
  proc = subprocess.run(
    [sys.executable, "-c", _WORKER_SCRIPT, path, str(GLOBAL_BATCH), out],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as z:
    got = [{k: z[f"{k}_{i}"] for k in reference[0]} for i in range(6)]
    state = json.loads(str(z["state"]))
  assert isinstance(state, dict) and state  # Worker iterators carry their own (non-step) state.
  assert _same(got[:3], reference[:3])
  assert _same(got[3:], reference[3:])  # Restored after 3 batches: continues exactly.


def test_incremental_writer_and_shards(tmp_path):
  rng = np.random.default_rng(1)
  codes, labels = _random_codes(rng, (7, 2, 3, 3)), rng.integers(1, 5, size=7)
  path = str(tmp_path / "ds")
  with code_dataset.CodeDatasetWriter(path, (3, 3), 2, VOCAB, 5, examples_per_shard=3) as w:
    w.add(codes[:4], labels[:4])
    w.add(codes[4:], labels[4:])
  assert sorted(f for f in os.listdir(path) if "array_record" in f) == [
    f"npp_codes-train.array_record-0000{i}" for i in range(3)
  ]
  got = list(code_dataset.make_eval_iterator(path, batch_size=7, split="train"))[0]
  np.testing.assert_array_equal(got["codes"], codes[:, 0])
  np.testing.assert_array_equal(got["labels"], labels)
  assert code_dataset.load_metadata(path).max_label == labels.max()


def test_writer_failure_removes_partial_split(tmp_path, dataset):
  rng = np.random.default_rng(2)
  fresh = str(tmp_path / "fresh")
  with pytest.raises(RuntimeError):
    with code_dataset.CodeDatasetWriter(
      fresh, GRID, N_AUG, VOCAB, N + 1, examples_per_shard=2
    ) as w:
      w.add(_random_codes(rng, (5, N_AUG, *GRID)), np.ones(5, int))
      raise RuntimeError("extraction crashed")
  assert not os.path.exists(fresh)
  # Beside an existing split: the new one goes, the old one stays readable.
  path, _, _ = dataset
  before = sorted(os.listdir(path))
  with pytest.raises(RuntimeError):
    with code_dataset.CodeDatasetWriter(path, GRID, N_AUG, VOCAB, N + 1, split="val") as w:
      w.add(_random_codes(rng, (5, N_AUG, *GRID)), np.ones(5, int))
      raise RuntimeError("extraction crashed")
  assert sorted(os.listdir(path)) == before
  assert code_dataset.load_metadata(path).num_examples == N
  with pytest.raises(ValueError, match="no finished split 'val'"):
    code_dataset.load_metadata(path, "val")


def _good(rng):
  return _random_codes(rng, (3, 2, 2, 2)), np.array([1, 2, 3])


@pytest.mark.parametrize(
  "change, message",
  [
    (
      lambda c, l: (np.where(np.arange(c.size).reshape(c.shape) == 13, 16400, c), l),
      "code 16400 at example 1 is >= vocab_size 50",
    ),
    (
      lambda c, l: (np.where(np.arange(c.size).reshape(c.shape) == 20, -1, c), l),
      "code -1 at example 2 is < 0",
    ),
    (lambda c, l: (c, np.array([1, 9, 3])), "label 9 at example 1 is >= num_classes 5"),
    (lambda c, l: (c, np.array([1, 2, -3])), "label -3 at example 2 is < 0"),
    (lambda c, l: (c[:0], l[:0]), "no examples"),
    (lambda c, l: (c, l[:2]), r"labels must have shape \(3,\)"),
    (lambda c, l: (c.astype(np.float32), l), "codes must be integers, got dtype float32"),
    (lambda c, l: (c[:, 0, 0], l), r"codes must be \[N, n_aug, h, w\] or \[N, h, w\]"),
  ],
)
def test_bad_input_writes_nothing(tmp_path, change, message):
  codes, labels = change(*_good(np.random.default_rng(3)))
  path = str(tmp_path / "ds")
  with pytest.raises(ValueError, match=message):
    code_dataset.write_code_dataset(path, codes, labels, vocab_size=VOCAB, num_classes=5)
  assert not os.path.exists(path)


def test_bad_sizes_write_nothing(tmp_path):
  codes, labels = _good(np.random.default_rng(4))
  path = str(tmp_path / "ds")
  with pytest.raises(ValueError, match="vocab_size=0; expected a positive integer"):
    code_dataset.write_code_dataset(path, codes, labels, vocab_size=0, num_classes=5)
  with pytest.raises(ValueError, match=r"split='train\[:5\]'; expected a plain split name"):
    code_dataset.write_code_dataset(
      path, codes, labels, vocab_size=VOCAB, num_classes=5, split="train[:5]"
    )
  assert not os.path.exists(path)
  os.makedirs(path)
  open(os.path.join(path, "notes.txt"), "w").close()
  with pytest.raises(ValueError, match="is not a code data set"):
    code_dataset.write_code_dataset(path, codes, labels, vocab_size=VOCAB, num_classes=5)
  assert os.listdir(path) == ["notes.txt"]


def test_existing_split_needs_overwrite(tmp_path):
  rng = np.random.default_rng(5)
  codes, labels = _good(rng)
  path = str(tmp_path / "ds")
  code_dataset.write_code_dataset(path, codes, labels, vocab_size=VOCAB, num_classes=5)
  before = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
  with pytest.raises(ValueError, match="split 'train' already exists .* pass overwrite=True"):
    code_dataset.write_code_dataset(path, codes, labels, vocab_size=VOCAB, num_classes=5)
  with pytest.raises(ValueError, match=r"has grid=\[2, 2\], the writer was given \[4, 4\]"):
    code_dataset.write_code_dataset(
      path, _random_codes(rng, (3, 2, 4, 4)), labels, vocab_size=VOCAB, num_classes=5, split="test"
    )
  assert {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)} == before
  new_codes = _random_codes(rng, (4, 2, 2, 2))
  code_dataset.write_code_dataset(
    path, new_codes, [4, 4, 4, 4], vocab_size=VOCAB, num_classes=5, overwrite=True
  )
  got = list(code_dataset.make_eval_iterator(path, batch_size=4, split="train"))
  assert len(got) == 1
  np.testing.assert_array_equal(got[0]["codes"], new_codes[:, 0])
  assert code_dataset.load_metadata(path).max_label == 4


def test_load_metadata_errors(tmp_path, dataset):
  missing = str(tmp_path / "nope")
  with pytest.raises(ValueError, match=f"no code data set at {missing}"):
    code_dataset.load_metadata(missing)
  path, _, _ = dataset
  with pytest.raises(ValueError, match=f"{path} has no finished split 'val'"):
    code_dataset.load_metadata(path, "val")
  with pytest.raises(ValueError, match="is not a code data set"):
    code_dataset.load_metadata(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  meta = json.load(open(os.path.join(path, "code_dataset.json")))
  meta["splits"]["train"]["num_examples"] = 0
  json.dump(meta, open(empty / "code_dataset.json", "w"))
  with pytest.raises(ValueError, match=f"split 'train' of code data set {empty} has 0 examples"):
    code_dataset.load_metadata(str(empty))
  with pytest.raises(ValueError, match="global_batch_size 16 is larger than split 'train'"):
    code_dataset.make_train_iterator(path, global_batch_size=16, seed=0)
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    code_dataset.make_train_iterator(path, global_batch_size=4, seed=0, process_count=3)


def _llamagen_folder(root, codes, labels, code_shape, label_shape):
  os.makedirs(root / "imagenet256_codes")
  os.makedirs(root / "imagenet256_labels")
  for i, (c, l) in enumerate(zip(codes, labels)):
    np.save(root / "imagenet256_codes" / f"{i}.npy", c.reshape(code_shape))
    np.save(root / "imagenet256_labels" / f"{i}.npy", np.array(l).reshape(label_shape))


@pytest.mark.parametrize(
  "code_shape, label_shape, n_aug",
  [
    ((1, 2, 16), (1,), 2),  # What LlamaGen's extraction writes.
    ((2, 16), (), 2),
    ((16,), (1,), 1),
  ],
)
def test_from_npy_folder(tmp_path, code_shape, label_shape, n_aug):
  rng = np.random.default_rng(6)
  # 12 images, so that "10.npy" sorts before "2.npy" as text but not as an index.
  codes, labels = _random_codes(rng, (12, n_aug, 4, 4)), rng.integers(1, 7, size=12)
  _llamagen_folder(tmp_path / "src", codes, labels, code_shape, label_shape)
  out = str(tmp_path / "out")
  meta = npy_codes.from_npy_folder(str(tmp_path / "src"), out, vocab_size=VOCAB, num_classes=7)
  assert (meta.num_examples, meta.grid, meta.n_aug) == (12, (4, 4), n_aug)
  got = list(code_dataset.make_eval_iterator(out, batch_size=12, split="train"))[0]
  np.testing.assert_array_equal(got["codes"], codes[:, 0])
  np.testing.assert_array_equal(got["labels"], labels)


def test_from_npy_folder_cli_and_errors(tmp_path):
  rng = np.random.default_rng(7)
  codes, labels = _random_codes(rng, (3, 1, 2, 4)), np.array([1, 2, 3])
  src = tmp_path / "src"
  _llamagen_folder(src, codes, labels, (1, 1, 8), (1,))
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="8 codes per grid, not a square; pass grid"):
    npy_codes.from_npy_folder(str(src), out, vocab_size=VOCAB, num_classes=4)
  npy_codes.main(
    [f"--from_npy={src}", f"--out={out}", f"--vocab_size={VOCAB}", "--num_classes=4", "--grid=2,4"]
  )
  got = list(code_dataset.make_eval_iterator(out, batch_size=3, split="train"))[0]
  np.testing.assert_array_equal(got["codes"], codes[:, 0])
  os.remove(src / "imagenet256_labels" / "1.npy")
  with pytest.raises(ValueError, match="image 1 has no labels file"):
    npy_codes.from_npy_folder(
      str(src), str(tmp_path / "out2"), vocab_size=VOCAB, num_classes=4, grid=(2, 4)
    )
  np.save(src / "imagenet256_labels" / "1.npy", np.array([9]))
  with pytest.raises(ValueError, match=r"label 9 in \S+1.npy / \S+1.npy is >= num_classes 4"):
    npy_codes.from_npy_folder(
      str(src), str(tmp_path / "out3"), vocab_size=VOCAB, num_classes=4, grid=(2, 4)
    )
  assert not os.path.exists(tmp_path / "out3")


def test_writer_add_checks_each_batch(tmp_path):
  rng = np.random.default_rng(8)
  path = str(tmp_path / "ds")
  with pytest.raises(ValueError, match="no examples were added"):
    code_dataset.CodeDatasetWriter(path, (2, 2), 1, VOCAB, 5).finalize()
  assert not os.path.exists(path)
  w = code_dataset.CodeDatasetWriter(path, (2, 2), 1, VOCAB, 5)
  w.add(_random_codes(rng, (4, 2, 2)), [1, 2, 3, 4])  # [B, h, w] is n_aug = 1.
  bad = _random_codes(rng, (3, 1, 2, 2))
  bad[2, 0, 1, 1] = VOCAB
  with pytest.raises(ValueError, match=f"code {VOCAB} at example 6 is >= vocab_size {VOCAB}"):
    w.add(
      bad, [1, 1, 1]
    )  # Counted from the start of the split: what the extraction job can look up.
  with pytest.raises(ValueError, match=r"the writer expects \[B, 1, 2, 2\]"):
    w.add(_random_codes(rng, (3, 1, 2, 3)), [1, 1, 1])
  assert w.finalize().num_examples == 4
  with pytest.raises(ValueError, match="already finalized"):
    w.add(_random_codes(rng, (1, 2, 2)), [1])
