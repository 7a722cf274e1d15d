"""Extraction on 8 fake CPU devices: codes equal to the encoder's, resume after a crash and after
lost shards, image folders (without TensorFlow, and equal to TFDS's reader), bad inputs refused
before anything is written."""

import glob
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
from support.codes import read_split
from support.configs import tiny_vq_config
from support.fake_gcs import fake_gcs
from support.images import NO_TENSORFLOW
from support.images import make_split_folder
from support.images import write_image
from support.paths import ROOT
from support.paths import TESTS

from npp_jax import checkpoints
from npp_jax import sharding
from npp_jax.data import code_dataset
from npp_jax.data import digits
from npp_jax.data import images as images_lib
from npp_jax.jobs import extract
from npp_jax.jobs import train_vq
from npp_jax.models import vq

N_TEST = 500  # Digits in the "test" split: the extraction tests encode all of them.


@pytest.fixture(scope="module")
def vq_params(tmp_path_factory):
  """Random VQ parameters saved as a converted checkpoint: codes of random weights vary a lot."""
  c = tiny_vq_config()
  cfg = vq.VQConfig.from_config(c.vq)
  # train_vq's compiled init (cached per process), so the module compiles the VQ init once.
  init, _ = train_vq._vq_functions(
    cfg, train_vq.VQHparams.from_config(c), sharding.make_mesh(c.mesh)
  )
  params = jax.device_get(init(jax.random.key(3)).params)
  path = str(tmp_path_factory.mktemp("vq") / "vq")
  checkpoints.save_params(path, params)
  return cfg, params, path


# ------------------------------------------------------------------------------------------ extract


def expected_digit_codes(params, cfg):
  images, labels = digits.load_digits("test")
  plain = np.asarray(vq.encode_fn(params, images, cfg))
  mirror = np.asarray(vq.encode_fn(params, np.ascontiguousarray(images[:, :, ::-1]), cfg))
  return np.stack([plain, mirror], axis=1), labels


def test_extract_digits_flip_gives_the_encoders_codes(tmp_path, vq_params):
  cfg, params, path = vq_params
  workdir = str(tmp_path / "w")
  c = tiny_vq_config(**{"extract.vq_checkpoint": path})
  out = extract.run(c, workdir).outputs
  assert out["num_examples"] == N_TEST and out["shards_encoded"] == 4 and out["images_per_s"] > 0
  meta = code_dataset.load_metadata(os.path.join(workdir, "codes"), "test")
  assert (meta.grid, meta.n_aug, meta.vocab_size, meta.num_classes) == ((16, 16), 2, 64, 10)
  codes, labels = read_split(os.path.join(workdir, "codes"), "test")
  want_codes, want_labels = expected_digit_codes(params, cfg)
  assert len(np.unique(want_codes)) > 8  # Random weights: a meaningful comparison.
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(codes, want_codes)
  it = code_dataset.make_train_iterator(
    os.path.join(workdir, "codes"), global_batch_size=50, seed=0, split="test"
  )
  batch = next(it)
  assert batch["codes"].shape == (50, 16, 16) and batch["labels"].shape == (50,)
  assert not os.path.exists(os.path.join(workdir, "extract_tmp", "test"))  # keep_shards=False.
  # A finished split is left alone.
  again = extract.run(c, workdir).outputs
  assert again["skipped"] and again["shards_encoded"] == 0


def test_extract_resumes_after_a_crash_and_after_lost_shards(tmp_path, vq_params, monkeypatch):
  cfg, params, path = vq_params
  workdir = str(tmp_path / "w")
  c = tiny_vq_config(
    **{"extract.vq_checkpoint": path, "extract.keep_shards": True, "extract.batch_size": 64}
  )
  real = extract.encode_views
  calls = []

  def crash_on_third(*args, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("killed")
    return real(*args, **kw)

  monkeypatch.setattr(extract, "encode_views", crash_on_third)
  with pytest.raises(RuntimeError, match="killed"):
    extract.run(c, workdir)
  tmp = os.path.join(workdir, "extract_tmp", "test")
  assert len(glob.glob(os.path.join(tmp, "shard_*.npz"))) == 2
  assert not os.path.exists(os.path.join(workdir, "codes"))
  monkeypatch.setattr(extract, "encode_views", real)
  out = extract.run(c, workdir).outputs
  assert (out["shards_encoded"], out["shards_reused"]) == (6, 2)  # 500 images in 8 shards of 64.
  first, labels = read_split(os.path.join(workdir, "codes"), "test")

  # Lose the data set and one shard: only that shard is encoded again, and the result is the same.
  shutil.rmtree(os.path.join(workdir, "codes"))
  os.remove(sorted(glob.glob(os.path.join(tmp, "shard_*.npz")))[5])
  out = extract.run(c, workdir).outputs
  assert (out["shards_encoded"], out["shards_reused"]) == (1, 7)
  codes, labels2 = read_split(os.path.join(workdir, "codes"), "test")
  np.testing.assert_array_equal(codes, first)
  np.testing.assert_array_equal(labels2, labels)
  np.testing.assert_array_equal(codes, expected_digit_codes(params, cfg)[0])
  # Shards of other settings are refused instead of mixed in.
  shutil.rmtree(os.path.join(workdir, "codes"))
  with pytest.raises(ValueError, match="other settings"):
    extract.run(
      tiny_vq_config(**{"extract.vq_checkpoint": path, "extract.batch_size": 128}), workdir
    )


def test_extract_with_its_workdir_on_gs(tmp_path, vq_params, monkeypatch):
  """The shards and their settings go through the file layer: a gs:// workdir works as a local one
  (served from a folder, support/fake_gcs.py) and nothing lands under a mangled <cwd>/gs:/ path."""
  cfg, params, path = vq_params
  monkeypatch.chdir(tmp_path)
  out_dir = str(tmp_path / "codes")
  c = tiny_vq_config(
    **{"extract.vq_checkpoint": path, "extract.keep_shards": True, "extract.output": out_dir}
  )
  with fake_gcs(tmp_path / "gcs"):
    out = extract.run(c, "gs://bucket/w").outputs
    again = extract.run(c, "gs://bucket/w").outputs
  assert out["shards_encoded"] == 4 and again["skipped"]
  assert sorted(os.listdir(tmp_path / "gcs" / "bucket" / "w" / "extract_tmp" / "test")) == [
    "settings.json",
    *[f"shard_{i:06d}.npz" for i in range(4)],
  ]
  codes, labels = read_split(out_dir, "test")
  want_codes, want_labels = expected_digit_codes(params, cfg)
  np.testing.assert_array_equal(codes, want_codes)
  np.testing.assert_array_equal(labels, want_labels)
  assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.parametrize(
  "num_examples,batch_size,processes,per_process_devices",
  [(500, 64, 2, 4), (9, 5, 1, 8), (13, 8, 4, 2), (7, 8, 4, 2), (30, 12, 2, 4)],
)
def test_processes_share_each_shard_and_the_gather_comes_back_in_order(
  num_examples, batch_size, processes, per_process_devices
):
  """Several processes without starting them: every example of a shard is read by exactly one
  process, and rows gathered from the devices in any device order (padding rows among them) come
  back in example order, as one process writes them."""
  local = batch_size // processes
  device_rows = -(-local // per_process_devices) * per_process_devices
  rng = np.random.default_rng(num_examples)
  for shard in range(-(-num_examples // batch_size)):
    count = min((shard + 1) * batch_size, num_examples) - shard * batch_size
    ids = np.full((processes, device_rows), -1)
    for p in range(processes):
      start, stop = extract.process_share(shard, batch_size, num_examples, p, local)
      assert stop - start <= local
      ids[p, : stop - start] = np.arange(start, stop)
    assert sorted(ids[ids >= 0].tolist()) == list(
      range(shard * batch_size, shard * batch_size + count)
    )
    # The mesh may order the devices (and so the processes' blocks) any way: shuffle the device
    # rows.
    per_device = ids.reshape(processes * per_process_devices, -1)
    gathered = per_device[rng.permutation(len(per_device))].reshape(-1)
    codes = np.stack(
      [gathered * 3 + 1, gathered * 5 + 2], axis=1
    )  # Stand-ins that name their example.
    got_codes, got_labels = extract.merge_rows(
      gathered, codes, gathered % 7, shard * batch_size, count
    )
    want = np.arange(shard * batch_size, shard * batch_size + count)
    np.testing.assert_array_equal(got_codes, np.stack([want * 3 + 1, want * 5 + 2], axis=1))
    np.testing.assert_array_equal(got_labels, want % 7)
  with pytest.raises(RuntimeError, match="did not share"):  # An example lost between the processes.
    extract.merge_rows(np.array([0, 2, -1, 3]), np.zeros((4, 2)), np.zeros(4), 0, 4)


def test_extract_refuses_bad_input_before_writing(tmp_path, vq_params):
  _, _, path = vq_params
  workdir = str(tmp_path / "w")
  cases = (
    ({"model.grid": (8, 8)}, "model.grid"),
    ({"model.vocab_size": 128}, "model.vocab_size"),
    ({"extract.vq_checkpoint": ""}, "vq_checkpoint is empty"),
    ({"extract.vq_checkpoint": str(tmp_path / "missing")}, "does not exist"),
    ({"extract.dataset": "no_such_dataset_xyz"}, "not a TFDS data set"),
    ({"extract.aug": "fivecrop"}, "extract.aug"),
    ({"extract.aug": "tencrop", "extract.crop_range": 0.9}, "crop_range"),
    # Once accepted by the command line's check (>= 1) and refused later, after loading: [1, 2].
    ({"extract.crop_range": 3.0}, "extract.crop_range=3.0; expected a number >= 1 and at most 2"),
    ({"extract.batch_size": 0}, "extract.batch_size"),
    ({"extract.split": "train[:10]"}, "plain split name"),
    ({"model.num_classes": 5}, "at most model.num_classes"),
  )
  for overrides, match in cases:
    c = tiny_vq_config(**{"extract.vq_checkpoint": path, **overrides})
    with pytest.raises(ValueError, match=match) as e:
      extract.run(c, workdir)
    assert "\n" not in str(e.value)
    assert not os.path.exists(workdir), overrides
  # A checkpoint of another architecture.
  c = tiny_vq_config(**{"extract.vq_checkpoint": path, "vq.codebook_embed_dim": 4})
  with pytest.raises(ValueError, match="do not fit config.vq"):
    extract.run(c, workdir)
  assert not os.path.exists(workdir)


def test_extract_of_an_image_folder_equals_the_tfds_path(tmp_path, vq_params):
  """root/<split>/<class>/ read by our folder reader gives the code data set that TFDS's ImageFolder
  (extraction's reader before, through TensorFlow) gives, row for row; the codes are the encoder's
  of the release's ten crops of each file decoded by PIL."""
  pytest.importorskip("tensorflow")  # TFDS reads image folders through it.
  import tensorflow_datasets as tfds

  cfg, params, path = vq_params
  root = tmp_path / "images"
  sizes = [(40, 48), (35, 35), (80, 72), (36, 60)]
  modes = [("RGB", "png"), ("L", "png"), ("CMYK", "jpg"), ("RGB", "jpg")]
  for k in range(11):
    mode, ext = modes[k % len(modes)]
    write_image(str(root / "train" / f"c{k % 3}" / f"{k}.{ext}"), mode, sizes[k % 4], seed=k)
  c = tiny_vq_config(
    **{
      "extract.vq_checkpoint": path,
      "extract.dataset": str(root),
      "extract.split": "train",
      "extract.aug": "tencrop",
      "extract.batch_size": 5,
      "extract.keep_shards": True,
    }
  )
  out = extract.run(c, str(tmp_path / "ours")).outputs
  # Batches of 5 on 8 devices: padded to 8 rows on the way in, trimmed on the way out.
  assert out["num_examples"] == 11 and out["n_aug"] == 10 and out["shards_encoded"] == 3
  codes, labels = read_split(str(tmp_path / "ours" / "codes"), "train")
  # Resume as from any source: a lost shard of the folder's is encoded again, the rest reused.
  shutil.rmtree(tmp_path / "ours" / "codes")
  os.remove(sorted(glob.glob(str(tmp_path / "ours" / "extract_tmp" / "train" / "shard_*.npz")))[1])
  out = extract.run(c, str(tmp_path / "ours")).outputs
  assert (out["shards_encoded"], out["shards_reused"]) == (1, 2)
  again, again_labels = read_split(str(tmp_path / "ours" / "codes"), "train")
  np.testing.assert_array_equal(again, codes)
  np.testing.assert_array_equal(again_labels, labels)

  # Today's TFDS path: ImageFolder's records, their bytes undecoded (TfdsSource's SkipDecoding)
  # and decoded by PIL, as extraction read them through TensorFlow.
  builder = tfds.folder_dataset.ImageFolder(str(root))
  skip = {"image": tfds.decode.SkipDecoding()}
  records = list(tfds.as_numpy(builder.as_dataset("train", decoders=skip)))
  tfds_path = images_lib.ArraySource(
    str(root),
    np.array([r["image"] for r in records], dtype=object),  # Encoded bytes, as TFDS gave them.
    np.array([r["label"] for r in records]),
    3,
  )
  extract.run(c, str(tmp_path / "tfds"), source=tfds_path)
  tfds_codes, tfds_labels = read_split(str(tmp_path / "tfds" / "codes"), "train")
  np.testing.assert_array_equal(codes, tfds_codes)
  np.testing.assert_array_equal(labels, tfds_labels)
  assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
  for r, got in zip(records, codes):
    with Image.open(r["image/filename"].decode()) as im:
      image = np.asarray(im.convert("RGB"))
    views = images_lib.augment(image, "tencrop", 32, 1.1)
    want = np.asarray(vq.encode_fn(params, vq.PIXEL_VALUES[views], cfg))
    np.testing.assert_array_equal(got, want)


def test_extract_an_image_folder_from_the_cli_without_tensorflow(tmp_path, vq_params):
  """`--mode=extract` on one split's class folders (JPEG, PNG, WebP, CMYK, junk) in a process where
  TensorFlow cannot be imported: the encoder's codes of every readable file, the junk counted."""
  cfg, params, path = vq_params
  folder = str(tmp_path / "imagenet" / "train")
  good, bad = make_split_folder(folder)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
    f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom support.configs import tiny_vq_config\n\n\n"
    "def get_config():\n  return tiny_vq_config()\n"
  )
  workdir = str(tmp_path / "w")
  argv = [
    "--mode=extract",
    f"--config={config_file}",
    f"--workdir={workdir}",
    f"--config.extract.vq_checkpoint={path}",
    f"--config.extract.dataset={folder}",
    "--config.extract.split=train",
    "--config.extract.aug=tencrop",
    "--config.extract.batch_size=4",
  ]
  code = NO_TENSORFLOW + (
    f"sys.argv = ['npp_jax.main', *{argv!r}]\n"
    "import runpy\n"
    "runpy.run_module('npp_jax.main', run_name='__main__')\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"3 of {len(good) + len(bad)} image files are unreadable" in run.stderr
  codes, labels = read_split(os.path.join(workdir, "codes"), "train")
  source = images_lib.open_images(folder, "train")  # The reader's order: TFDS's (test_images).
  paths, _ = source.get(range(source.num_examples))
  assert sorted(str(p) for p in paths) == sorted(good) and len(codes) == len(good)
  for p, label, got in zip(paths, labels, codes):
    assert source.classes[label] == os.path.relpath(str(p), folder).split(os.sep)[0]
    with Image.open(str(p)) as im:
      views = images_lib.augment(np.asarray(im.convert("RGB")), "tencrop", 32, 1.1)
    np.testing.assert_array_equal(
      got, np.asarray(vq.encode_fn(params, vq.PIXEL_VALUES[views], cfg))
    )
