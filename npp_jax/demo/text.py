"""The text demo: digits drawn from captions, trained with NPP, sampled from phrasings it never saw.

  python -m npp_jax.main --mode=demo --config=configs/demo.py:text --workdir=workdir/demo_text

Stages (each a real use of the project's jobs; the VQ and the scorer are the class demo's):
  1. train_vq   the class demo's VQ on 32x32 digits
  2. captions   every digit gets a caption naming its class in one of several phrasings
                ("a handwritten 7", "the digit seven", ...), encoded by the project's T5 encoder
                (models/t5.py) built from a small config with seeded random weights: no pretrained
                text encoder can be downloaded here. Words are tokens (a word vocabulary of the
                phrasings: no sentencepiece model to download either). Written as a caption code
                data set.
  3. train      a text-conditioned GPT with the NPP schedule on those captions
  4. sample     from held-out phrasings ("draw the number 7", "an image showing seven"), through
                --mode=sample's caption_features path, guided against the null caption
  5. score      the digit classifier's accuracy against the class each held-out caption names
Writes WORKDIR/report.json and WORKDIR/samples_text/samples/ (the npz, the PNG grid with each
held-out caption under its row).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from npp_jax import checkpoints
from npp_jax import files
from npp_jax import jobs
from npp_jax.data import captions as caption_data
from npp_jax.data import digits
from npp_jax.demo import classifier
from npp_jax.demo import report as demo_report
from npp_jax.jobs import demo as class_demo
from npp_jax.models import t5
from npp_jax.models import vq

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training phrasings, and held-out ones for sampling: the class word (numeral or word) is the only
# thing the two share; their other words and order are new to the model.
TRAIN_TEMPLATES = ("{}", "the digit {}", "a handwritten {}", "a picture of a {}")
HELD_OUT_TEMPLATES = ("draw the number {}", "an image showing {}")
EOS = "</s>"

NOTICE = (
  "No pretrained text encoder can be downloaded here: captions are encoded by the project's T5 "
  "encoder (models/t5.py) with seeded random weights and a word vocabulary."
)


def phrasings(templates, label: int) -> list[str]:
  return [t.format(w) for t in templates for w in (str(label), WORDS[label])]


def all_captions(templates) -> tuple[list[str], np.ndarray]:
  """(captions, the class each names), class by class."""
  texts, labels = [], []
  for c in range(digits.NUM_CLASSES):
    p = phrasings(templates, c)
    texts += p
    labels += [c] * len(p)
  return texts, np.asarray(labels)


class WordTokenizer:
  """Each word of the phrasings one token, EOS last as T5 ends a caption; 0 is padding."""

  def __init__(self, texts):
    words = sorted({w for t in texts for w in t.split()})
    self.ids = {w: i + 2 for i, w in enumerate(words)}
    self.ids[EOS] = 1
    self.vocab_size = len(words) + 2

  def __call__(self, texts, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
      row = [self.ids[w] for w in t.split()] + [self.ids[EOS]]
      if len(row) > length:
        raise ValueError(f"caption {t!r} has {len(row)} tokens; expected at most {length}")
      ids[i, : len(row)] = row
    return ids, ids > 0


def encoder_config(caption_dim: int, vocab_size: int) -> t5.T5Config:
  """A small FLAN-T5-shaped encoder (gated GELU, relative position buckets) as wide as the model's
  captions.

  One layer: random attention mixes every word into every other, so (most likely: the attention
  weights were not inspected) the class leaks into the context words' features and the GPT learns
  to read it there, which fails on held-out phrasings whose context words are new. Measured
  (docs/performance.md, "The text demo"): held-out sample accuracy 0.29 with two layers, 0.43 with
  one, at 6 epochs."""
  return t5.T5Config(
    d_model=caption_dim,
    d_kv=caption_dim // 4,
    num_heads=4,
    num_layers=1,
    d_ff=2 * caption_dim,
    vocab_size=vocab_size,
    dtype=jnp.float32,
  )


def encode(texts, config) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, T, caption_dim] float32, zero past each caption, lengths [N]) of `texts` by the
  seeded random T5; the tokenizer knows every phrasing, trained and held out."""
  m = config.model
  tok = WordTokenizer(
    all_captions(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES)[0],
  )
  ids, mask = tok(texts, m.cls_token_num)
  model = t5.T5Encoder(encoder_config(m.caption_dim, tok.vocab_size))
  params = model.init(jax.random.key(config.seed), ids[:1], mask[:1])
  feats = np.asarray(jax.jit(model.apply)(params, ids, mask))
  return feats * mask[..., None], mask.sum(1)


def encode_digits(config, vq_dir: str, images: np.ndarray, chunk: int = 250) -> np.ndarray:
  """VQ codes [N, h, w] of digits (through uint8, as extract sees them)."""
  cfg = vq.VQConfig.from_config(config.vq)
  params = checkpoints.load_vq_params(vq_dir, config.vq)
  fn = jax.jit(lambda p, x: vq.encode_fn(p, x, cfg))
  x = demo_report.to_uint8(images)
  return np.concatenate([np.asarray(fn(params, x[i : i + chunk])) for i in range(0, len(x), chunk)])


def write_captions(config, vq_dir: str, out: str) -> None:
  """The caption code data set: every digit with one training phrasing of its class (seeded)."""
  texts, text_labels = all_captions(TRAIN_TEMPLATES)
  feats, lengths = encode(texts, config)
  rng = np.random.default_rng(config.seed)
  m = config.model
  for split in ("train", "test"):
    images, labels = digits.load_digits(split)
    codes = encode_digits(config, vq_dir, images)
    pick = np.array([rng.choice(np.flatnonzero(text_labels == y)) for y in labels])
    with caption_data.CaptionDatasetWriter(
      out,
      m.grid,
      1,
      m.vocab_size,
      m.caption_dim,
      max_length=m.cls_token_num,
      split=split,
      overwrite=True,
    ) as w:
      w.add(codes, feats[pick], lengths[pick], [texts[i] for i in pick], np.ones(len(pick), bool))


def write_held_out(config, out: str) -> np.ndarray:
  """Held-out captions as LlamaGen's feature files 0.npy .. N-1.npy; returns the class of each."""
  texts, labels = all_captions(HELD_OUT_TEMPLATES)
  feats, lengths = encode(texts, config)
  os.makedirs(out, exist_ok=True)
  for i, (f, n) in enumerate(zip(feats, lengths)):
    np.save(os.path.join(out, f"{i}.npy"), f[None, :n].astype(np.float32))
  files.write_json(os.path.join(out, "captions.json"), {"texts": texts, "labels": labels.tolist()})
  return labels


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  print(NOTICE, flush=True)
  os.makedirs(workdir, exist_ok=True)
  timings = class_demo.Timings(os.path.join(workdir, "timings.json"))
  class_demo.stage(1, "train the VQ tokenizer on the digits")
  vq_dir = class_demo.vq_stage(config, workdir)
  if vq_dir is None:
    print("Stopped during VQ training (SIGTERM); run the same command again to resume.")
    return None  # Stopped early: the demo job exits 75.

  class_demo.stage(2, "caption the digits and encode the captions (random-weight T5)")
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.path = os.path.join(workdir, "captions")
  if "captions" not in timings.values:
    write_captions(config, vq_dir, c.data.path)
    timings.record("captions", True)
  held_dir = os.path.join(workdir, "held_out_captions")
  labels = write_held_out(config, held_dir)

  class_demo.stage(3, "train the text-conditioned GPT with NPP")
  e = config.train.epochs
  from npp_jax import npp

  stages = tuple(npp.release_stages(config.npp.patch_level, config.npp.epoch_rate, e))
  r = class_demo.gpt_stage(c, workdir, "npp_text", 0, stages, timings)

  class_demo.stage(4, "sample from the held-out phrasings")
  s = ml_collections.ConfigDict(c.to_dict())
  s.sample.checkpoint = os.path.join(workdir, r["run"])
  s.sample.vq_checkpoint = vq_dir
  s.sample.caption_features = held_dir
  s.sample.grid_rows = len(labels)
  s.sample.grid_cols = min(config.demo.grid_cols, config.sample.images_per_caption)
  path = jobs.get("sample").run(s, os.path.join(workdir, "samples_text")).outputs["samples"]

  class_demo.stage(5, "score the samples with the digit classifier")
  clf, clf_acc = classifier.load_or_train_classifier(
    os.path.join(workdir, "classifier.msgpack"),
    seed=config.seed,
    epochs=config.demo.classifier_epochs,
    log=lambda msg: None,
  )
  with np.load(path) as f:
    images = f["arr_0"].astype(np.float32) / 127.5 - 1.0
    want = labels[f["caption_index"]]
  test_x, _ = digits.load_digits("test")
  score = classifier.score_samples(clf, images, want, test_x)
  report = {
    "text_encoder": "models/t5.py, seeded random weights (no pretrained encoder downloadable here)",
    "train_phrasings": list(TRAIN_TEMPLATES),
    "held_out_phrasings": list(HELD_OUT_TEMPLATES),
    "classifier_test_accuracy": round(clf_acc, 4),
    "held_out_sample_accuracy": round(float(score["accuracy"]), 4),
    "frechet": round(float(score["frechet"]), 3),
    "num_samples": int(len(want)),
    "train": r,
    "device": jax.devices()[0].device_kind,
  }
  files.write_json(os.path.join(workdir, "report.json"), report)
  print(
    f"\nheld-out phrasings: sample accuracy {report['held_out_sample_accuracy']:.3f} over "
    f"{len(want)} samples (classifier on real digits: {clf_acc:.3f}); samples: {path}",
    flush=True,
  )
  return report
