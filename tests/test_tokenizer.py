"""The tokenizer jobs on 8 fake CPU devices: VQ training (learns, logs codebook usage, resumes, is not
redone), the release's crops against a NumPy reference, extraction (codes equal to the encoder's, resume
after a crash and after lost shards, TFDS ImageFolder), and bad inputs refused before anything is written."""
import glob
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from npp_jax import config_lib
from npp_jax import checkpoints
from npp_jax import data
from npp_jax import digits
from npp_jax import sharding
from npp_jax import tokenizer
from npp_jax.models import vq
from helpers import read_scalars  # noqa: E402  (tests/ is on sys.path)

N_TEST = 500  # Digits in the "test" split: the extraction tests encode all of them.


def tiny_config(workdir=None, **overrides):
  """A 2-level VQ (32 px -> 16x16 codes of 64) with matching GPT fields; digits for both jobs."""
  c = config_lib.base_config()
  c.vq.ch, c.vq.ch_mult, c.vq.num_res_blocks, c.vq.z_channels, c.vq.norm_groups = 16, (1, 2), 1, 16, 4
  c.vq.codebook_size, c.vq.codebook_embed_dim, c.vq.image_size = 64, 8, 32
  c.model.grid, c.model.vocab_size, c.model.num_classes = (16, 16), 64, 10
  t = c.vq_train
  t.dataset, t.split, t.steps, t.batch_size, t.lr = "digits", "test", 6, 16, 3e-3
  t.log_every_steps, t.checkpoint_every_steps, t.keep_checkpoints, t.num_threads = 1, 3, 2, 2
  e = c.extract
  e.dataset, e.split, e.aug, e.batch_size, e.num_threads = "digits", "test", "flip", 128, 2
  c.update_from_flattened_dict(overrides)  # {'train.max_steps': 2, ...}
  return c


@pytest.fixture(scope="module")
def vq_params(tmp_path_factory):
  """Random VQ parameters saved as a converted checkpoint: codes of random weights vary a lot."""
  c = tiny_config()
  cfg = vq.VQConfig.from_config(c.vq)
  # train_vq's compiled init (cached per process), so the module compiles the VQ init once.
  init, _ = tokenizer._vq_functions(cfg, tokenizer.VQHparams.from_config(c.vq_train),
                                    sharding.make_mesh(c.mesh))
  params = jax.device_get(init(jax.random.key(3)).params)
  path = str(tmp_path_factory.mktemp("vq") / "vq")
  checkpoints.save_params(path, params)
  return cfg, params, path


# --------------------------------------------------------------------------------------- preprocessing


def reference_views(square, size, aug):
  """NumPy reference of the release's views of an already square image (torchvision TenCrop)."""
  n = square.shape[0]
  if aug == "none":
    return square[None]
  if aug == "flip":
    return np.stack([square, np.flip(square, axis=1)])
  c = int(round((n - size) / 2.0))  # torchvision's centre offset (Python round: half to even).
  boxes = [(0, 0), (0, n - size), (n - size, 0), (n - size, n - size), (c, c)]
  out = [square[t:t + size, l:l + size] for t, l in boxes]
  mirror = np.flip(square, axis=1)
  out += [mirror[t:t + size, l:l + size] for t, l in boxes]
  return np.stack(out)


@pytest.mark.parametrize("aug,crop_range,size,side", [("tencrop", 1.1, 32, 35), ("tencrop", 1.05, 32, 33),
                                                     ("tencrop", 1.1, 256, 281), ("flip", 1.1, 32, 32),
                                                     ("none", 1.1, 32, 32)])
def test_views_match_numpy_reference(aug, crop_range, size, side):
  if aug == "tencrop":
    assert tokenizer.crop_size(size, crop_range) == side  # int(size * range), as the release.
  rng = np.random.default_rng(side)
  square = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  got = tokenizer.augment(square, aug, size, crop_range)
  want = reference_views(square, size, aug)
  assert got.shape == (tokenizer.AUGS[aug], size, size, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  if aug == "tencrop":  # Mirror views are the plain views of the mirror image: view 5 = flip of view 1.
    np.testing.assert_array_equal(got[5], np.flip(got[1], axis=1))


def test_center_crop_of_a_wide_image_and_pixel_values():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (35, 50, 3), dtype=np.uint8)  # Short side already 35: a pure crop.
  np.testing.assert_array_equal(tokenizer.center_crop_arr(wide, 35), wide[:, 7:42])
  big = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)  # Box-halved to 40x50, then bicubic to 35.
  half = Image.fromarray(big).resize((50, 40), resample=Image.BOX)
  want = np.asarray(half.resize((44, 35), resample=Image.BICUBIC))[:, 4:39]
  np.testing.assert_array_equal(tokenizer.center_crop_arr(big, 35), want)
  # uint8 -> [-1, 1] as the release's ToTensor + Normalize, and as npp_jax.digits makes its images.
  p = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(tokenizer.PIXEL_VALUES, p.astype(np.float32) / 127.5 - 1.0)
  images, _ = digits.load_digits("test")
  np.testing.assert_array_equal(tokenizer.PIXEL_VALUES[tokenizer.float_to_uint8(images[:20])], images[:20])


# --------------------------------------------------------------------------------------------- train_vq


def test_train_vq_learns_logs_usage_resumes_and_is_not_redone(tmp_path):
  workdir = str(tmp_path / "w")
  c = tiny_config()
  out = tokenizer.train_vq(c, workdir)
  assert out == os.path.join(workdir, "vq")
  params = checkpoints.read_params(out)
  tokenizer.check_vq_params(params, c.vq, out)
  scalars = read_scalars(workdir)
  losses = [v for _, v in scalars["loss"]]
  assert len(losses) == 6 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  for tag in ("usage_batch", "perplexity_running", "perplexity_batch"):
    values = [v for _, v in scalars[tag]]
    assert len(values) == 6
  assert all(0 < v <= 1 for _, v in scalars["usage_batch"])
  assert all(1 <= v <= 64 for _, v in scalars["perplexity_running"])
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "vq_checkpoints")) if s.isdigit())
  assert steps == [3, 6]

  # Finished: a re-run returns the same parameters without a step.
  events = sorted(os.listdir(workdir))
  assert tokenizer.train_vq(c, workdir) == out
  assert sorted(os.listdir(workdir)) == events
  # A longer run resumes from step 6 (final params removed, as if the run had never finished).
  shutil.rmtree(out)
  tokenizer.train_vq(tiny_config(**{"vq_train.steps": 8, "vq_train.checkpoint_every_steps": 4}), workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "vq_checkpoints")) if s.isdigit())
  assert steps == [6, 8]
  new_steps = sorted(s for s, _ in read_scalars(workdir)["loss"])
  assert new_steps[-2:] == [7, 8] and new_steps.count(7) == 1


def test_train_vq_saves_and_stops_on_sigterm_then_resumes(tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  c = tiny_config(**{"vq_train.checkpoint_every_steps": 100})
  real = tokenizer._vq_batches

  def batches_then_sigterm(*args, **kw):
    for i, batch in enumerate(real(*args, **kw)):
      if i == 2:  # As a scheduler would: the loop saves the step it is at and returns.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(tokenizer, "_vq_batches", batches_then_sigterm)
  assert tokenizer.train_vq(c, workdir) is None
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "vq_checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 6
  assert not os.path.exists(os.path.join(workdir, "vq"))
  monkeypatch.setattr(tokenizer, "_vq_batches", real)
  assert tokenizer.train_vq(c, workdir) == os.path.join(workdir, "vq")
  assert max(s for s, _ in read_scalars(workdir)["loss"]) == 6


def test_train_vq_refuses_bad_input_before_writing(tmp_path):
  workdir = str(tmp_path / "w")
  for overrides, match in (({"vq_train.dataset": "no_such_dataset_xyz"}, "not a TFDS data set"),
                           ({"vq_train.dataset": "/no/such/folder"}, "does not exist"),
                           ({"vq_train.batch_size": 12}, "data-parallel size 8"),
                           ({"vq_train.l2_weight": 0.0}, "both 0"),
                           ({"vq_train.split": "valid"}, "expected one of"),
                           ({"vq.norm_groups": 5}, "norm_groups")):
    c = tiny_config(**overrides)
    with pytest.raises(ValueError, match=match) as e:
      tokenizer.train_vq(c, workdir)
    assert "\n" not in str(e.value)
    assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------------- extract


def expected_digit_codes(params, cfg):
  images, labels = digits.load_digits("test")
  plain = np.asarray(vq.encode_fn(params, images, cfg))
  mirror = np.asarray(vq.encode_fn(params, np.ascontiguousarray(images[:, :, ::-1]), cfg))
  return np.stack([plain, mirror], axis=1), labels


def read_split(path, split):
  source = __import__("tensorflow_datasets").builder_from_directory(path).as_data_source(split)
  records = [source[i] for i in range(len(source))]
  return np.stack([r["codes"] for r in records]).astype(np.int32), np.array([r["label"] for r in records])


def test_extract_digits_flip_gives_the_encoders_codes(tmp_path, vq_params):
  cfg, params, path = vq_params
  workdir = str(tmp_path / "w")
  c = tiny_config(**{"extract.vq_checkpoint": path})
  out = tokenizer.extract(c, workdir)
  assert out["num_examples"] == N_TEST and out["shards_encoded"] == 4 and out["images_per_s"] > 0
  meta = data.load_metadata(os.path.join(workdir, "codes"), "test")
  assert (meta.grid, meta.n_aug, meta.vocab_size, meta.num_classes) == ((16, 16), 2, 64, 10)
  codes, labels = read_split(os.path.join(workdir, "codes"), "test")
  want_codes, want_labels = expected_digit_codes(params, cfg)
  assert len(np.unique(want_codes)) > 8  # Random weights: a meaningful comparison.
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(codes, want_codes)
  it = data.make_train_iterator(os.path.join(workdir, "codes"), global_batch_size=50, seed=0, split="test")
  batch = next(it)
  assert batch["codes"].shape == (50, 16, 16) and batch["labels"].shape == (50,)
  assert not os.path.exists(os.path.join(workdir, "extract_tmp", "test"))  # keep_shards=False.
  # A finished split is left alone.
  again = tokenizer.extract(c, workdir)
  assert again["skipped"] and again["shards_encoded"] == 0


def test_extract_resumes_after_a_crash_and_after_lost_shards(tmp_path, vq_params, monkeypatch):
  cfg, params, path = vq_params
  workdir = str(tmp_path / "w")
  c = tiny_config(**{"extract.vq_checkpoint": path, "extract.keep_shards": True, "extract.batch_size": 64})
  real = tokenizer.encode_views
  calls = []

  def crash_on_third(*args, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("killed")
    return real(*args, **kw)

  monkeypatch.setattr(tokenizer, "encode_views", crash_on_third)
  with pytest.raises(RuntimeError, match="killed"):
    tokenizer.extract(c, workdir)
  tmp = os.path.join(workdir, "extract_tmp", "test")
  assert len(glob.glob(os.path.join(tmp, "shard_*.npz"))) == 2
  assert not os.path.exists(os.path.join(workdir, "codes"))
  monkeypatch.setattr(tokenizer, "encode_views", real)
  out = tokenizer.extract(c, workdir)
  assert (out["shards_encoded"], out["shards_reused"]) == (6, 2)  # 500 images in 8 shards of 64.
  first, labels = read_split(os.path.join(workdir, "codes"), "test")

  # Lose the data set and one shard: only that shard is encoded again, and the result is the same.
  shutil.rmtree(os.path.join(workdir, "codes"))
  os.remove(sorted(glob.glob(os.path.join(tmp, "shard_*.npz")))[5])
  out = tokenizer.extract(c, workdir)
  assert (out["shards_encoded"], out["shards_reused"]) == (1, 7)
  codes, labels2 = read_split(os.path.join(workdir, "codes"), "test")
  np.testing.assert_array_equal(codes, first)
  np.testing.assert_array_equal(labels2, labels)
  np.testing.assert_array_equal(codes, expected_digit_codes(params, cfg)[0])
  # Shards of other settings are refused instead of mixed in.
  shutil.rmtree(os.path.join(workdir, "codes"))
  with pytest.raises(ValueError, match="other settings"):
    tokenizer.extract(tiny_config(**{"extract.vq_checkpoint": path, "extract.batch_size": 128}), workdir)


def test_extract_refuses_bad_input_before_writing(tmp_path, vq_params):
  _, _, path = vq_params
  workdir = str(tmp_path / "w")
  cases = (({"model.grid": (8, 8)}, "model.grid"),
           ({"model.vocab_size": 128}, "model.vocab_size"),
           ({"extract.vq_checkpoint": ""}, "vq_checkpoint is empty"),
           ({"extract.vq_checkpoint": str(tmp_path / "missing")}, "does not exist"),
           ({"extract.dataset": "no_such_dataset_xyz"}, "not a TFDS data set"),
           ({"extract.aug": "fivecrop"}, "extract.aug"),
           ({"extract.aug": "tencrop", "extract.crop_range": 0.9}, "crop_range"),
           ({"extract.batch_size": 0}, "extract.batch_size"),
           ({"extract.split": "train[:10]"}, "plain split name"),
           ({"model.num_classes": 5}, "at most model.num_classes"))
  for overrides, match in cases:
    c = tiny_config(**{"extract.vq_checkpoint": path, **overrides})
    with pytest.raises(ValueError, match=match) as e:
      tokenizer.extract(c, workdir)
    assert "\n" not in str(e.value)
    assert not os.path.exists(workdir), overrides
  # A checkpoint of another architecture.
  c = tiny_config(**{"extract.vq_checkpoint": path, "vq.codebook_embed_dim": 4})
  with pytest.raises(ValueError, match="do not fit config.vq"):
    tokenizer.extract(c, workdir)
  assert not os.path.exists(workdir)


def test_extract_reads_a_tfds_image_folder(tmp_path, vq_params):
  """root/<split>/<class>/*.png through TFDS's ImageFolder, ten-crop of images of several sizes."""
  import tensorflow_datasets as tfds

  cfg, params, path = vq_params
  root = tmp_path / "images"
  rng = np.random.default_rng(0)
  sizes = [(40, 48), (35, 35), (80, 72), (36, 60)]
  for k, name in enumerate(("cat", "dog", "owl")):
    os.makedirs(root / "train" / name)
    for j in range(3):
      h, w = sizes[(k + j) % len(sizes)]
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(image).save(root / "train" / name / f"{j}.png")
  workdir = str(tmp_path / "w")
  c = tiny_config(**{"extract.vq_checkpoint": path, "extract.dataset": str(root), "extract.split": "train",
                     "extract.aug": "tencrop", "extract.batch_size": 5})
  out = tokenizer.extract(c, workdir)
  # Batches of 5 on 8 devices: padded to 8 rows on the way in, trimmed on the way out.
  assert out["num_examples"] == 9 and out["n_aug"] == 10 and out["shards_encoded"] == 2
  codes, labels = read_split(os.path.join(workdir, "codes"), "train")
  # ImageFolder's own order (a fixed shuffle) and labels (sorted class names).
  records = list(tfds.as_numpy(tfds.folder_dataset.ImageFolder(str(root)).as_dataset("train")))
  np.testing.assert_array_equal(labels, [r["label"] for r in records])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  for r, got in zip(records, codes):
    name = r["image/filename"].decode()
    image = np.asarray(Image.open(name).convert("RGB"))
    views = tokenizer.augment(image, "tencrop", 32, 1.1)
    want = np.asarray(vq.encode_fn(params, tokenizer.PIXEL_VALUES[views], cfg))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_prepared_tfds_directories_read_in_order_and_stream(tmp_path, file_format):
  """A prepared TFDS data set: random access (array_record) or slices (TFRecord), JPEG/PNG bytes decoded
  by PIL; train_vq's batches from it."""
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (30 + i, 36, 3), dtype=np.uint8) for i in range(12)]
  path = str(tmp_path / "toy")
  os.makedirs(path)
  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                         "label": tfds.features.ClassLabel(num_classes=4)})
  info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(name="toy", version="1.0.0", data_dir=path, module_name=""),
      features=features, supervised_keys=("image", "label"))
  writer = tfds.core.SequentialWriter(ds_info=info, max_examples_per_shard=5, file_format=file_format)
  writer.initialize_splits(["train"])
  writer.add_examples({"train": [{"image": im, "label": i % 4} for i, im in enumerate(images)]})
  writer.close_splits(["train"])

  source = tokenizer.open_images(path, "train")
  assert (source.num_examples, source.num_classes) == (12, 4)
  assert source.random_access == (file_format == "array_record")
  got, labels = source.read(3, 9)  # Across shard files.
  for k, image in enumerate(got):
    np.testing.assert_array_equal(tokenizer.to_rgb(image), images[3 + k])
  np.testing.assert_array_equal(labels, [(3 + k) % 4 for k in range(6)])
  batches = tokenizer._vq_batches(source, 32, 4, seed=0, start_step=0, random_flip=True, threads=2)
  for _ in range(4):  # 16 images: more than one pass over the 12.
    batch = next(batches)
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
  batches.close()
  with pytest.raises(ValueError, match="has no split 'test'"):
    tokenizer.open_images(path, "test")
