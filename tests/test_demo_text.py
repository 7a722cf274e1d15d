"""The text demo (npp_jax/demo/text.py) end to end on its smoke config, through the real CLI: the
notice that no pretrained text encoder exists here, captions from training phrasings only,
samples from held-out phrasings scored against the class each names; and its caption pieces."""

import json
import os

import numpy as np
from support.cli import run_main
from support.paths import ROOT

from npp_jax import config_lib
from npp_jax.data import captions
from npp_jax.demo import text


def test_held_out_phrasings_share_only_the_class_word_with_training():
  train, train_labels = text.all_captions(text.TRAIN_TEMPLATES)
  held, held_labels = text.all_captions(text.HELD_OUT_TEMPLATES)
  assert not set(train) & set(held) and len(held) == 40
  np.testing.assert_array_equal(np.bincount(held_labels), [4] * 10)
  for t, y in zip(held, held_labels):
    assert t.split()[-1] in (str(y), text.WORDS[y])


def test_encoded_captions_are_zero_past_their_length_and_differ_by_phrasing():
  config = config_lib.load(os.path.join(ROOT, "configs/demo.py:text_smoke"))
  texts = ["7", "the digit seven", "draw the number 7"]
  feats, lengths = text.encode(texts, config)
  m = config.model
  assert feats.shape == (3, m.cls_token_num, m.caption_dim)
  np.testing.assert_array_equal(lengths, [2, 4, 5])  # Words and EOS.
  for f, n in zip(feats, lengths):
    assert np.all(f[n:] == 0) and np.all(np.abs(f[:n]).sum(-1) > 0)
  again, _ = text.encode(texts, config)  # Seeded: the same weights every run.
  np.testing.assert_array_equal(again, feats)


def test_text_demo_smoke_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = ["--mode=demo", "--config=configs/demo.py:text_smoke"]
  # One CPU device, as test_demo runs the class demo (a laptop's; sharding has its own tests).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = run_main(*cmd, f"--workdir={workdir}", env=env, timeout=1200)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  stdout = out.stdout
  assert "No pretrained text encoder can be downloaded here" in stdout
  for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
    assert f"=== {stage}" in stdout
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert [k for k, _ in report["train"]["stages"]] == [2, 1]  # NPP: k = 2, then 1.
  assert 0.0 <= report["held_out_sample_accuracy"] <= 1.0 and report["num_samples"] == 80
  assert report["classifier_test_accuracy"] > 0.5
  # Trained on training phrasings only.
  meta = captions.load_metadata(os.path.join(workdir, "captions"))
  seen = set(captions.read_texts(os.path.join(workdir, "captions"), range(meta.num_examples)))
  held = json.load(open(os.path.join(workdir, "held_out_captions", "captions.json")))
  assert seen <= set(text.all_captions(text.TRAIN_TEMPLATES)[0]) and not seen & set(held["texts"])
  with np.load(os.path.join(workdir, "samples_text", "samples", "samples_80.npz")) as f:
    np.testing.assert_array_equal(f["caption_index"], np.repeat(np.arange(40), 2))
    assert f["arr_0"].shape == (80, 32, 32, 3)
