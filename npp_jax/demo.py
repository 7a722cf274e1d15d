"""The embedded demo: the whole pipeline on 5000 real MNIST digits, and the paper's claim checked in minutes.

Each stage is a real use of the project's own jobs, and each one resumes when run again:
  1. train_vq   a small VQ on 32x32 digits (16x16 code grid, so k = 4, 2, 1 apply as on ImageNet 256)
  2. extract    codes for the train and test splits
  3. train      the GPT with NPP (coarse to fine), and the next-token baseline with equal epochs
  4. sample     a class-conditional grid for each model (one row per digit)
  5. score      class accuracy of the samples and a Frechet distance to held-out digits, in the
                features of a small classifier trained on the digits
It prints a table and writes DIR/report.json.
"""
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from npp_jax import costs
from npp_jax import digits
from npp_jax import extract
from npp_jax import files
from npp_jax import npp
from npp_jax import sample
from npp_jax import scoring
from npp_jax import train
from npp_jax import train_vq
from npp_jax.models import gpt


def _stage(title: str) -> None:
  print(f"\n=== {title} ===", flush=True)
  logging.info("Demo stage: %s", title)


class _Timings:
  """Wall time of each finished stage, kept on disk so that a resumed demo still reports the first run's."""

  def __init__(self, path: str):
    self.path = path
    self.values = json.load(open(path)) if os.path.exists(path) else {}

  def record(self, name: str, seconds: float) -> None:
    self.values[name] = seconds
    files.write_json(self.path, self.values)


def _train_gpt(config, workdir: str, name: str, stages, timings: _Timings) -> dict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.npp.stages = stages
  run_dir = os.path.join(workdir, name)
  done = timings.values.get(f"{name}_train")
  if done is not None:
    print(f"{name}: already trained ({done['wall_s']:.0f} s); reusing {run_dir}", flush=True)
    return done
  t0 = time.perf_counter()
  out = train.train_and_evaluate(c, run_dir)
  if out.get("stopped_early"):
    raise SystemExit(f"{name}: stopped at step {out['step']} (SIGTERM); run the same command to resume.")
  result = {"wall_s": time.perf_counter() - t0, "train_s": out.get("train_s"),
            "compile_s": out.get("compile_s"), "final_loss": out.get("loss")}
  timings.record(f"{name}_train", result)
  return result


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  timings = _Timings(os.path.join(workdir, "timings.json"))
  d = config.demo

  _stage("1/5 train the VQ tokenizer on the digits")
  vq_dir = train_vq.train_vq(config, os.path.join(workdir, "vq"))
  if vq_dir is None:
    print("Stopped during VQ training (SIGTERM); run the same command again to resume.")
    return {}

  _stage("2/5 extract codes (train and test splits)")
  codes_dir = os.path.join(workdir, "codes")
  for split in ("train", "test"):
    c = ml_collections.ConfigDict(config.to_dict())
    c.extract.vq_checkpoint, c.extract.output, c.extract.split = vq_dir, codes_dir, split
    extract.extract(c, os.path.join(workdir, "extract"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.path = codes_dir

  _stage("3/5 train the GPT: NPP coarse to fine" + (", then the next-token baseline" if d.baseline else ""))
  cfg = gpt.GPTConfig.from_config(config.model)
  release = npp.release_stages(config.npp.patch_level, config.npp.epoch_rate, config.train.epochs)
  runs = {"npp": _train_gpt(config, workdir, "npp", tuple(release), timings)}
  if d.baseline:
    runs["ntp"] = _train_gpt(config, workdir, "ntp", ((1, float(config.train.epochs)),), timings)
  sched = npp.Schedule(release, steps_per_epoch=1, grid=cfg.grid)
  runs["npp"]["relative_cost"] = costs.schedule_flop_ratio(sched, cfg)
  if "ntp" in runs:
    runs["ntp"]["relative_cost"] = 1.0

  _stage("4/5 sample a class-conditional grid from each model")
  for name in runs:
    c = ml_collections.ConfigDict(config.to_dict())
    c.sample.checkpoint = os.path.join(workdir, name)
    c.sample.vq_checkpoint = vq_dir
    c.sample.grid_rows, c.sample.grid_cols = config.model.num_classes, d.grid_cols
    runs[name]["samples"] = sample.sample_and_save(c, os.path.join(workdir, f"samples_{name}"))

  _stage("5/5 score the samples with a digit classifier")
  clf, clf_acc = scoring.load_or_train_classifier(os.path.join(workdir, "classifier.msgpack"),
                                                  seed=config.seed, epochs=d.classifier_epochs)
  test_images, _ = digits.load_digits("test")
  report = {"classifier_test_accuracy": clf_acc, "epochs": config.train.epochs,
            "schedule": [list(s) for s in release], "device": jax.devices()[0].device_kind}
  for name, r in runs.items():
    with np.load(r["samples"]) as f:
      images = f["arr_0"].astype(np.float32) / 127.5 - 1.0
      labels = f["labels"]
    score = scoring.score_samples(clf, images, labels, test_images)
    report[name] = {"wall_s": round(r["wall_s"], 1),
                    "train_s": round(r["train_s"], 1) if r.get("train_s") is not None else None,
                    "relative_cost": round(r["relative_cost"], 3),
                    "accuracy": round(float(score["accuracy"]), 4),
                    "frechet": round(float(score["frechet"]), 3),
                    "final_loss": r.get("final_loss"), "samples": os.path.relpath(r["samples"], workdir)}
    # A copy of each model's PNG grid at the top of the workdir, where a newcomer looks first.
    png = r["samples"][:-len(".npz")] + ".png"
    if os.path.exists(png):
      with open(png, "rb") as src, open(os.path.join(workdir, f"samples_{name}.png"), "wb") as dst:
        dst.write(src.read())
  real = scoring.score_samples(clf, test_images, digits.load_digits("test")[1], test_images)
  report["real_test_digits"] = {"accuracy": round(float(real["accuracy"]), 4)}

  files.write_json(os.path.join(workdir, "report.json"), report)
  _print_table(report)
  return report


def _print_table(report: dict) -> None:
  rows = [n for n in ("npp", "ntp") if n in report]
  print("\nmodel  GPT wall s  relative cost  sample accuracy  Frechet (lower is better)")
  for n in rows:
    r = report[n]
    print(f"{n:5s}  {r['wall_s']:10.1f}  {r['relative_cost']:13.3f}  {r['accuracy']:15.3f}  {r['frechet']:9.3f}")
  print(f"(classifier accuracy on held-out real digits: {report['classifier_test_accuracy']:.3f})",
        flush=True)
