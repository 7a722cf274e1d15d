"""The embedded demo: the whole pipeline on 5000 real MNIST digits, and the paper's claim checked in
minutes.

Each stage is a real use of the project's own jobs, and each one resumes when run again:
  1. train_vq   a small VQ on 32x32 digits (configs/demo.py sets the code grid)
  2. extract    codes for the train and test splits
  3. train      three GPTs per seed: NPP (coarse to fine) for E epochs, next-token for E epochs, and
                next-token for the wall time NPP took (equal compute: what a fixed budget buys)
  4. sample     class-conditional samples from each (one PNG row per digit, a row of real digits on
  top)
  5. score      class accuracy and a Frechet distance to held-out digits, in the features of a small
                classifier trained on the digits, beside calibration lines (chance, real digits, the
                VQ)
The console shows stage headers, a progress bar per training stage and the table; the libraries'
INFO lines go to WORKDIR/log.txt. It writes WORKDIR/report.json and WORKDIR/samples_<row>.png.
"""

import contextlib
import dataclasses
import json
import logging as py_logging
import os
import time
import warnings

from absl import logging
import jax
import ml_collections
import numpy as np

from npp_jax import costs
from npp_jax import files
from npp_jax import jobs
from npp_jax import npp
from npp_jax import preflight
from npp_jax import rules
from npp_jax import summaries
from npp_jax.data import digits
from npp_jax.demo import classifier
from npp_jax.demo import report as demo_report
from npp_jax.models import gpt
from npp_jax.models import vq


def stage(n: int, title: str) -> None:
  print(f"\n=== {n}/5 {title} ===", flush=True)
  logging.info("Demo stage %d/5: %s", n, title)


@contextlib.contextmanager
def library_log(path: str):
  """Sends absl / Python logging (orbax, tfds, jax, our own INFO lines) and warnings to `path` for
  the duration, so the console keeps to what the demo prints; put back afterwards."""
  handler = logging.get_absl_handler().python_handler
  old_stream, old_verbosity = handler.stream, logging.get_verbosity()
  with open(path, "a") as f:
    handler.stream = f
    logging.set_verbosity(logging.INFO)
    py_logging.captureWarnings(True)
    try:
      yield
    finally:
      py_logging.captureWarnings(False)
      handler.stream = old_stream
      logging.set_verbosity(old_verbosity)


class Timings:
  """Results of finished stages, kept on disk so that a resumed demo reports the first run's
  times."""

  def __init__(self, path: str):
    self.path = path
    self.values = json.load(open(path)) if os.path.exists(path) else {}

  def record(self, name: str, value) -> None:
    self.values[name] = value
    files.write_json(self.path, self.values)


SECTIONS = ("demo", "vq", "vq_train", "extract", "model", "npp", "optim", "train", "data", "sample")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """config.demo (configs/demo.py)."""

  seeds: int  # Each row trained with this many seeds: the table shows their spread.
  classifier_epochs: int
  grid_cols: int  # Samples per class row in the PNG grids.
  png_scale: int

  def __post_init__(self):
    for name in ("seeds", "classifier_epochs", "grid_cols", "png_scale"):
      rules.check(f"demo.{name}", getattr(self, name), rules.POSITIVE_INT)

  @classmethod
  def from_config(cls, config) -> "DemoSettings":
    if "demo" not in config:
      raise ValueError(
        "the config has no `demo` section; expected configs/demo.py (or configs/demo.py:smoke)"
      )
    return cls(**rules.section(config, "demo", cls))


# The demo's stages, in order: it makes its own data set and weights, so each is checked without
# them.
STAGES = ("train_vq", "extract", "train", "sample")


def check_settings(config, topology: jobs.Topology) -> DemoSettings:
  """config.demo, then every setting of each stage's job."""
  s = DemoSettings.from_config(config)
  staged = config
  if rules.get(config, "model.condition") == "text":
    # The text demo samples from the held-out captions it writes itself (demo/text.py, stage 4).
    staged = ml_collections.ConfigDict(config.to_dict())
    staged.sample.caption_features = "WORKDIR/held_out_captions"
  for mode in STAGES:
    jobs.get(mode).check_settings(staged, topology)
  return s


def check(config, workdir, topology: jobs.Topology) -> DemoSettings:
  """Every setting of every stage and the workdir: one-line ValueErrors, nothing written."""
  work = preflight.check_workdir(workdir)
  s = check_settings(config, topology)
  preflight.check_keep(config, "vq_train.keep_checkpoints", work / "vq" / "vq_checkpoints")
  return s


def run(config: ml_collections.ConfigDict, workdir: str) -> jobs.Result:
  """Every stage (each resumes when run again); outputs: the report (also WORKDIR/report.json)."""
  check(config, workdir, jobs.Topology.current())
  os.makedirs(workdir, exist_ok=True)
  print(f"Demo in {workdir} (library log: {os.path.join(workdir, 'log.txt')})", flush=True)
  with library_log(os.path.join(workdir, "log.txt")), warnings.catch_warnings():
    warnings.simplefilter("default")
    report = _run(config, workdir)
  return jobs.Result(stopped_early=report is None, outputs=report or {})


def _run(config, workdir: str) -> dict | None:
  logging.info("Demo on %d %s device(s).", jax.device_count(), jax.devices()[0].device_kind)
  if config.model.condition == "text":
    from npp_jax.demo import text  # It builds on this module's stages.

    return text.run(config, workdir)
  prepared = prepare(config, workdir)
  if prepared is None:
    print("Stopped during VQ training (SIGTERM); run the same command again to resume.")
    return None
  report = compare(*prepared, workdir)
  demo_report.table(report)
  print(
    f"\nreport: {os.path.join(workdir, 'report.json')}; samples: "
    + ", ".join(f"samples_{k}.png" for k, _ in demo_report.ROWS if k in report),
    flush=True,
  )
  return report


def prepare(config, workdir: str):
  """Stages 1-2: the VQ and the code data set; (config reading those codes, VQ params directory), or
  None when a SIGTERM stopped the VQ training."""
  stage(1, "train the VQ tokenizer on the digits")
  vq_dir = vq_stage(config, workdir)
  if vq_dir is None:
    return None
  stage(2, "extract codes (train and test splits)")
  codes_dir = os.path.join(workdir, "codes")
  for split in ("train", "test"):
    c = ml_collections.ConfigDict(config.to_dict())
    c.extract.vq_checkpoint, c.extract.output, c.extract.split = vq_dir, codes_dir, split
    jobs.get("extract").run(c, os.path.join(workdir, "extract"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.path = codes_dir
  return config, vq_dir


def compare(config, vq_dir: str, workdir: str, shared: str | None = None) -> dict:
  """Stages 3-5: the three rows per seed trained, sampled and scored in `workdir`; the report (also
  written to workdir/report.json). `shared` (default: workdir) holds the scorer, reused across calls
  (benchmarks/npp_vs_ntp.py runs many comparisons on one VQ)."""
  os.makedirs(workdir, exist_ok=True)
  timings = Timings(os.path.join(workdir, "timings.json"))
  seeds = config.demo.seeds
  stage(
    3,
    f"train the GPTs: NPP, next-token for the same epochs, next-token for NPP's wall time"
    f"{f' ({seeds} seeds)' if seeds > 1 else ''}",
  )
  runs = [_train_rows(config, workdir, s, timings) for s in range(seeds)]

  stage(4, "sample a class-conditional set from each GPT")
  for s, rows in enumerate(runs):
    for r in rows.values():
      r["samples"] = _sample(config, workdir, r, vq_dir, seed=config.sample.seed + s)

  stage(5, "score the samples with a digit classifier")
  report = _score(config, workdir, runs, vq_dir, shared or workdir)
  files.write_json(os.path.join(workdir, "report.json"), report)
  return report


def vq_stage(config, workdir: str):
  vq_workdir = os.path.join(workdir, "vq")
  train_vq = jobs.get("train_vq")
  if os.path.isdir(os.path.join(vq_workdir, "vq")):
    print("VQ: already trained; reusing it", flush=True)
    return train_vq.run(config, vq_workdir).outputs["vq"]
  bar = demo_report.Progress("VQ", config.vq_train.steps)
  try:
    return train_vq.run(config, vq_workdir, on_log=bar.on_log).outputs.get("vq")
  finally:
    bar.close()


def _run_name(row: str, seed_index: int) -> str:
  return row if seed_index == 0 else f"{row}_seed{seed_index}"


def _train_rows(config, workdir: str, seed_index: int, timings: Timings) -> dict:
  """NPP, then next-token for as many epochs, then next-token for NPP's measured wall time."""
  e = config.train.epochs
  release = npp.release_stages(config.npp.patch_level, config.npp.epoch_rate, e)
  rows = {"npp": gpt_stage(config, workdir, "npp", seed_index, tuple(release), timings)}
  rows["ntp"] = gpt_stage(config, workdir, "ntp", seed_index, ((1, float(e)),), timings)
  # Equal compute: the next-token epochs that NPP's measured wall time buys at the next-token run's
  # speed.
  equal = e * rows["npp"]["wall_s"] / rows["ntp"]["wall_s"]
  rows["ntp_equal_compute"] = gpt_stage(
    config, workdir, "ntp_equal_compute", seed_index, ((1, round(equal, 2)),), timings
  )
  return rows


def gpt_stage(config, workdir: str, row: str, seed_index: int, stages, timings: Timings) -> dict:
  name = _run_name(row, seed_index)
  c = ml_collections.ConfigDict(config.to_dict())
  c.npp.stages = stages
  c.seed = config.seed + seed_index
  c.data.shuffle_seed = config.data.shuffle_seed + seed_index
  run_dir = os.path.join(workdir, name)
  done = timings.values.get(f"{name}_train")
  if done is not None:
    print(f"{name}: already trained ({done['wall_s']:.0f} s); reusing {run_dir}", flush=True)
    return dict(done)
  train = jobs.get("train")
  p = train.check(c, run_dir, jobs.Topology.current())
  ks = "+".join(f"k={k}:{ep:g}ep" for k, ep in stages)
  bar = demo_report.Progress(f"{name} ({ks})", p.total_steps)
  t0 = time.perf_counter()
  try:
    result = train.run(c, run_dir, on_log=bar.on_log)
  finally:
    bar.close()
  out = result.outputs
  if result.stopped_early:
    raise SystemExit(
      f"{name}: stopped at step {out['step']} (SIGTERM); run the same command to resume."
    )
  cfg = gpt.GPTConfig.from_config(c.model)
  result = {
    "run": name,
    "seed": c.seed,
    "stages": [list(s) for s in stages],
    "epochs": round(sum(ep for _, ep in stages), 2),
    "wall_s": time.perf_counter() - t0,
    "train_s": out.get("train_s"),
    "compile_s": out.get("compile_s"),
    "final_loss": out.get("loss"),
    "eval_nll": out.get("eval/nll"),
    "class_info": out.get("eval/class_info"),
    "relative_cost": costs.schedule_flop_ratio(npp.Schedule(stages, 1, cfg.grid), cfg)
    * sum(ep for _, ep in stages)
    / config.train.epochs,
  }
  timings.record(f"{name}_train", result)
  return result


def _sample(config, workdir: str, r: dict, vq_dir: str, seed: int) -> str:
  c = ml_collections.ConfigDict(config.to_dict())
  c.sample.checkpoint = os.path.join(workdir, r["run"])
  c.sample.vq_checkpoint = vq_dir
  c.sample.seed = seed
  c.sample.grid_rows, c.sample.grid_cols = config.model.num_classes, config.demo.grid_cols
  return jobs.get("sample").run(c, os.path.join(workdir, f"samples_{r['run']}")).outputs["samples"]


def _load_samples(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path) as f:
    return f["arr_0"].astype(np.float32) / 127.5 - 1.0, f["labels"]


def _reconstruct(config, vq_dir: str, images: np.ndarray, chunk: int = 100) -> np.ndarray:
  """VQ round trip of real digits (through uint8, as extract sees them): what the GPT can draw at
  best."""
  from npp_jax import checkpoints

  cfg = vq.VQConfig.from_config(config.vq)
  params = checkpoints.load_vq_params(vq_dir, config.vq)
  x = demo_report.to_uint8(images)
  out = []
  for i in range(0, len(x), chunk):
    codes = vq.encode_fn(params, x[i : i + chunk], cfg)
    out.append(np.clip(np.asarray(vq.decode_fn(params, codes, cfg)), -1.0, 1.0))
  return np.concatenate(out)


def _calibration(config, clf, clf_acc, vq_recon, test_x, test_y) -> dict:
  """The numbers that say what the table's scores mean: chance, real digits and the VQ's ceiling."""
  train_x, train_y = digits.load_digits("train")
  # As many real training digits (the same count per class) as the test split, so the Frechet floor
  # is measured at the same sample size as the models' samples.
  per_class = len(test_y) // digits.NUM_CLASSES
  idx = np.concatenate(
    [np.flatnonzero(train_y == c)[:per_class] for c in range(digits.NUM_CLASSES)]
  )
  rec = classifier.score_samples(clf, vq_recon, test_y, test_x)
  floor = classifier.frechet_distance(
    classifier.features(clf, train_x[idx]), classifier.features(clf, test_x)
  )
  return {
    "chance_accuracy": 1.0 / digits.NUM_CLASSES,
    "real_test_accuracy": round(clf_acc, 4),
    "vq_reconstruction_accuracy": round(rec["accuracy"], 4),
    "vq_reconstruction_frechet": round(rec["frechet"], 3),
    "real_frechet": round(floor, 3),
  }


def _score(config, workdir: str, runs: list[dict], vq_dir: str, shared: str) -> dict:
  d = config.demo
  clf, clf_acc = classifier.load_or_train_classifier(
    os.path.join(shared, "classifier.msgpack"),
    seed=config.seed,
    epochs=d.classifier_epochs,
    log=lambda m: logging.info("%s", m),
  )
  test_x, test_y = digits.load_digits("test")
  recon = _reconstruct(config, vq_dir, test_x)
  report = {
    "seeds": d.seeds,
    "epochs": config.train.epochs,
    "patch_level": config.npp.patch_level,
    "device": jax.devices()[0].device_kind,
    "classifier_test_accuracy": round(clf_acc, 4),
    "calibration": _calibration(config, clf, clf_acc, recon, test_x, test_y),
  }
  for row, label in demo_report.ROWS:
    per_seed = []
    for rows in runs:
      r = dict(rows[row])
      images, labels = _load_samples(r["samples"])
      score = classifier.score_samples(clf, images, labels, test_x)
      r.update(
        accuracy=round(float(score["accuracy"]), 4),
        frechet=round(float(score["frechet"]), 3),
        samples=os.path.relpath(r["samples"], workdir),
      )
      for k in ("wall_s", "train_s", "compile_s", "relative_cost", "eval_nll", "class_info"):
        if r.get(k) is not None:
          r[k] = round(float(r[k]), 4)
      per_seed.append(r)
    report[row] = demo_report.aggregate(per_seed)
    _write_grid(config, workdir, row, label, report[row], runs[0][row], test_x, test_y)
  _write_vq_grid(config, workdir, os.path.dirname(vq_dir), test_x, test_y, recon)
  return report


def _write_grid(
  config, workdir: str, row: str, label: str, result: dict, first: dict, test_x, test_y
) -> None:
  """samples_<row>.png (the first seed's samples, a row of real digits on top) and the same in
  TensorBoard."""
  images, labels = _load_samples(first["samples"])
  rows = demo_report.class_rows(
    images, labels, test_x, test_y, config.model.num_classes, config.demo.grid_cols
  )
  title = f"{label}, {result['epochs']:g} epochs: accuracy {result['accuracy']:.2f}"
  grid = demo_report.labelled_grid(rows, config.demo.png_scale, title)
  demo_report.save_png(os.path.join(workdir, f"samples_{row}.png"), grid)
  _tensorboard_image(os.path.join(workdir, first["run"]), "samples", grid)


def _write_vq_grid(config, workdir: str, vq_run: str, test_x, test_y, recon) -> None:
  """Real test digits and their VQ reconstructions, row by row, under the VQ run in TensorBoard."""
  cols = config.demo.grid_cols
  rows = []
  for c in range(digits.NUM_CLASSES):
    idx = np.flatnonzero(test_y == c)[:cols]
    rows += [(f"{c}", test_x[idx]), (f"{c} VQ", recon[idx])]
  grid = demo_report.labelled_grid(
    rows, config.demo.png_scale, "real test digits and VQ reconstructions"
  )
  demo_report.save_png(os.path.join(workdir, "vq_reconstructions.png"), grid)
  _tensorboard_image(vq_run, "reconstructions", grid)


def _tensorboard_image(logdir: str, tag: str, image: np.ndarray) -> None:
  writer = summaries.create_default_writer(logdir)
  try:
    writer.write_images(0, {tag: image[None]})
  finally:
    writer.close()
