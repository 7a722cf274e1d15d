"""What the demo shows a person: labelled PNG grids of digits, the console's progress bars and its
table.

Kept apart from npp_jax/jobs/demo.py (the pipeline) so that the pipeline reads as its five stages.
"""

import os
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

# The three rows of the comparison, in table order: (report key, label).
ROWS = (
  ("npp", "NPP"),
  ("ntp", "next-token, same epochs"),
  ("ntp_equal_compute", "next-token, NPP's wall time"),
)
_CHAR_W = 6  # Pixels per character of PIL's default bitmap font, for the label column's width.
_TITLE_H = 16


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] (or uint8 already) -> uint8 [N, H, W, C]."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  return np.clip(np.round(127.5 * (x.astype(np.float32) + 1.0)), 0, 255).astype(np.uint8)


def labelled_grid(
  rows: Sequence[tuple[str, np.ndarray]], scale: int, title: str = ""
) -> np.ndarray:
  """One uint8 RGB image [H, W, 3]: each (label, images [n, h, w, 3]) a row, upscaled `scale` x
  (nearest, so the pixels a model drew stay visible), its label on the left and an optional title on
  top."""
  if scale < 1 or not rows:
    raise ValueError(
      f"labelled_grid: scale={scale}, {len(rows)} rows; expected scale >= 1 and some rows"
    )
  h, w = rows[0][1].shape[1:3]
  cols = max(len(images) for _, images in rows)
  cell_h, cell_w = h * scale, w * scale
  top = _TITLE_H if title else 0
  label_w = _CHAR_W * (max(len(label) for label, _ in rows) + 1)
  canvas = Image.new("RGB", (label_w + cols * cell_w, top + len(rows) * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  if title:
    draw.text((2, 2), title, fill=(0, 0, 0), font=font)
  for r, (label, images) in enumerate(rows):
    y = top + r * cell_h
    draw.text((2, y + cell_h // 2 - 6), label, fill=(0, 0, 0), font=font)
    for c, img in enumerate(to_uint8(images)):
      tile = Image.fromarray(img[..., :3] if img.shape[-1] >= 3 else img[..., 0]).convert("RGB")
      canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_w + c * cell_w, y))
  return np.asarray(canvas)


def class_rows(
  images: np.ndarray,
  labels: np.ndarray,
  real: np.ndarray,
  real_labels: np.ndarray,
  num_classes: int,
  cols: int,
) -> list[tuple[str, np.ndarray]]:
  """A first row of real digits (one per class), then one row of up to `cols` samples per class."""
  real_row = np.stack([real[np.flatnonzero(real_labels == c)[0]] for c in range(num_classes)])
  rows = [("real", to_uint8(real_row))]
  for c in range(num_classes):
    rows.append((str(c), to_uint8(images[np.flatnonzero(labels == c)[:cols]])))
  return rows


def save_png(path: str, image: np.ndarray) -> None:
  tmp = f"{path}.tmp{os.getpid()}.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


class Progress:
  """One console bar per training stage: steps done / total, the latest loss, steps/s and the ETA.

  Fed by the trainers' on_log(step, scalars) at every log step; the library's own log lines go to
  the log file, so this is all a person sees while a stage trains.
  """

  def __init__(self, title: str, total: int, stream=None, min_interval: float = 1.0):
    from tqdm import tqdm

    self._bar = tqdm(
      total=total,
      desc=title,
      unit="step",
      file=stream or sys.stderr,
      mininterval=min_interval,
      dynamic_ncols=False,
      ncols=100,
      leave=True,
    )
    self._step = 0

  def on_log(self, step: int, scalars: Mapping[str, float]) -> None:
    if step > self._step:
      self._bar.update(step - self._step)
      self._step = step
    loss = scalars.get("loss")
    if loss is not None:
      self._bar.set_postfix_str(f"loss {loss:.3f}", refresh=True)

  def start_at(self, step: int) -> None:
    """A resumed run: count the steps already done without showing them as fast progress."""
    self._bar.n = self._step = step
    self._bar.last_print_n = step
    self._bar.refresh()

  def close(self) -> None:
    self._bar.close()


def _mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  vals = [v for v in values if v is not None]
  if not vals:
    return None, None
  return float(np.mean(vals)), (float(np.max(vals) - np.min(vals)) / 2 if len(vals) > 1 else None)


METRICS = ("wall_s", "eval_nll", "class_info", "accuracy", "frechet", "epochs")


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict:
  """Per-seed results of one row -> their means (the row's values) and half-ranges under
  `spread`."""
  out = dict(per_seed[0])
  spread = {}
  for m in METRICS:
    mean, half = _mean_spread([r.get(m) for r in per_seed])
    if mean is not None:
      out[m] = round(mean, 4)
    if half is not None:
      spread[m] = round(half, 4)
  if len(per_seed) > 1:
    out["per_seed"] = list(per_seed)
    out["spread"] = spread
  return out


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
  v = row.get(key)
  if v is None:
    return "-"
  text = format(v, fmt)
  half = row.get("spread", {}).get(key)
  return f"{text}±{format(half, fmt)}" if half is not None else text


def table(report: Mapping[str, Any], write: Callable[[str], None] = print) -> None:
  """The final table, then its calibration lines: what chance, real digits and the VQ allow."""
  seeds = report.get("seeds", 1)
  write(
    f"\nResults ({seeds} seed{'s' if seeds > 1 else ''}"
    + (", mean±half-range" if seeds > 1 else "")
    + "):"
  )
  head = (
    f"{'row':29s} {'epochs':>9s} {'GPT wall s':>11s} {'held-out NLL':>13s} {'class info':>11s} "
    f"{'accuracy':>12s} {'Frechet':>12s}"
  )
  write(head)
  write("-" * len(head))
  for key, label in ROWS:
    if key not in report:
      continue
    r = report[key]
    write(
      f"{label:29s} {_cell(r, 'epochs', '.1f'):>9s} {_cell(r, 'wall_s', '.0f'):>11s} "
      f"{_cell(r, 'eval_nll', '.3f'):>13s} {_cell(r, 'class_info', '.2f'):>11s} "
      f"{_cell(r, 'accuracy', '.3f'):>12s} {_cell(r, 'frechet', '.1f'):>12s}"
    )
  cal = report["calibration"]
  write(
    "  held-out NLL: nats per token at k = 1 on the test digits; class info: NLL with the null "
    "class minus "
    "NLL with the true one, nats per image"
  )
  write(
    f"  accuracy: chance {cal['chance_accuracy']:.2f} | real test digits "
    f"{cal['real_test_accuracy']:.3f} | "
    f"VQ reconstructions of them (ceiling) {cal['vq_reconstruction_accuracy']:.3f}"
  )
  write(
    "  Frechet (lower is better): real train vs real test digits (floor) "
    f"{cal['real_frechet']:.1f} | "
    f"VQ reconstructions vs real test {cal['vq_reconstruction_frechet']:.1f}"
  )
