"""Caption extraction (npp_jax.caption_codes): index lines -> VQ codes and T5 features on an
8-device mesh, unreadable and too-small images kept as invalid examples and counted."""

import json

import ml_dtypes
import numpy as np
from PIL import Image
from support import t5_files
from support.configs import tiny_vq_config
from support.weights import random_vq_params

from npp_jax import caption_codes
from npp_jax import sharding
from npp_jax import text_encoder
from npp_jax.data import caption_index
from npp_jax.data import captions
from npp_jax.data import images as images_lib
from npp_jax.jobs import extract
from npp_jax.models import vq


def _index(tmp_path, rng):
  """8 lines: 5 good images (two sizes), one too small, one not an image, one missing file."""
  lines, good = [], {}
  for i in range(8):
    path = tmp_path / "img" / f"{i}.png"
    path.parent.mkdir(exist_ok=True)
    if i in (0, 1, 3, 5, 7):
      pixels = rng.integers(0, 256, (40, 48 if i % 2 else 36, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(path)
      good[i] = pixels
    elif i == 2:
      Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(path)
    elif i == 4:
      path.write_bytes(b"not an image")
    captions_i = [f"A photo of a CAT number {i}", f"two dogs {i}"]
    lines.append(json.dumps({"image_path": str(path), "text": captions_i}))
  (tmp_path / "index.jsonl").write_text("\n".join(lines))
  return caption_index.read_index(tmp_path / "index.jsonl"), good


def test_extract_captions(tmp_path):
  rng = np.random.default_rng(0)
  entries, good = _index(tmp_path, rng)
  config = tiny_vq_config()
  config.mesh.shape = (8, 1, 1)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
  cfg = vq.VQConfig.from_config(config.vq)
  params = random_vq_params(cfg, 0)
  folder = t5_files.write_folder(
    tmp_path / "t5", t5_files.random_encoder(), t5_files.train_spiece()
  )
  encoder = text_encoder.TextEncoder(folder, mesh, rules, dtype="float32", param_dtype="float32")
  views = caption_codes.Views(aug="none", image_size=cfg.image_size, threads=2)
  with captions.CaptionDatasetWriter(
    tmp_path / "out", cfg.grid, 1, cfg.codebook_size, 32
  ) as writer:
    counts = caption_codes.extract_captions(
      entries,
      writer,
      batch_size=3,  # Three batches, the last short; each padded to the 8 devices.
      encode_views=lambda v: extract.encode_views(params, v, cfg, mesh),
      encoder=encoder,
      views=views,
    )
  assert counts == {"examples": 8, "skipped": 3, "truncated": 0}
  meta = captions.load_metadata(str(tmp_path / "out"))
  assert (meta.num_examples, meta.num_valid) == (8, 5)
  got = next(iter(captions.make_eval_iterator(str(tmp_path / "out"), batch_size=8, split="train")))
  np.testing.assert_array_equal(got["valid"], [i in good for i in range(8)])
  # References: the VQ on one device per image, the encoder on all captions at once.
  want = encoder([e.caption for e in entries])
  for i, pixels in good.items():
    crop = images_lib.center_crop_arr(pixels, cfg.image_size)
    np.testing.assert_array_equal(
      got["codes"][i], np.asarray(vq.encode_fn(params, crop[None], cfg))[0]
    )
    n = want.lengths[i]
    assert got["caption_len"][i] == n
    stored = got["caption"][i, 120 - n :].astype(np.float32)
    ref = want.features[i, :n].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_allclose(stored, ref, rtol=1e-2, atol=1e-2)  # One bf16 step either way.
  assert captions.read_texts(str(tmp_path / "out"), [2, 4]) == [
    entries[2].caption,
    entries[4].caption,
  ]
