"""Image sets to score: an ADM npz read a slice at a time, or a data set's first images
centre-cropped."""

import dataclasses
import zipfile

from etils import epath
import numpy as np


def npz_members(path: epath.Path, field: str) -> list[str]:
  try:
    with path.open("rb") as f, zipfile.ZipFile(f) as zf:
      return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(
      f"{field}={str(path)!r} is not a readable .npz ({type(e).__name__}); expected an "
      "npz written by np.savez"
    ) from None


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  read = (
    np.lib.format.read_array_header_1_0
    if version == (1, 0)
    else np.lib.format.read_array_header_2_0
  )
  shape, fortran, dtype = read(f)
  if fortran:
    raise ValueError("Fortran-ordered arrays are not supported")
  return shape, dtype


@dataclasses.dataclass(frozen=True)
class NpzImages:
  """`arr_0` of an npz, uint8 [N, H, W, 3], read a slice at a time (50,000 images are 10 GB)."""

  path: epath.Path
  shape: tuple[int, ...]

  @property
  def num(self) -> int:
    return self.shape[0]

  def read(self, start: int, stop: int) -> np.ndarray:
    row = int(np.prod(self.shape[1:]))
    with self.path.open("rb") as f, zipfile.ZipFile(f) as zf, zf.open("arr_0.npy") as member:
      _npy_header(member)
      member.seek(
        member.tell() + start * row
      )  # Cheap for np.savez's stored (uncompressed) members.
      data = member.read((stop - start) * row)
    return np.frombuffer(data, np.uint8).reshape(stop - start, *self.shape[1:])


def open_npz_images(path: epath.Path, field: str) -> NpzImages:
  """The checked `arr_0` of an ADM npz: one-line errors for anything but uint8 [N, H, W, 3]."""
  with path.open("rb") as f, zipfile.ZipFile(f) as zf, zf.open("arr_0.npy") as member:
    shape, dtype = _npy_header(member)
  if dtype != np.uint8:
    raise ValueError(
      f"{field}={str(path)!r}: arr_0 holds {dtype} pixels; expected uint8 [N, H, W, 3] "
      "(the ADM sample format)"
    )
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(
      f"{field}={str(path)!r}: arr_0 has shape {list(shape)}; expected uint8 [N, H, W, 3] "
      "(RGB images, the ADM sample format)"
    )
  return NpzImages(path, tuple(int(s) for s in shape))


class DatasetImages:
  """The first `num` images of a data set split, centre-cropped (ADM's centre_crop_arr) to
  `size`."""

  def __init__(self, source, num: int, size: int):
    self.source, self.num, self.size = source, num, size
    self.shape = (num, size, size, 3)

  def read(self, start: int, stop: int) -> np.ndarray:
    from npp_jax.data import images as images_lib  # ADM's crop; imported only for data sets.

    images, _ = self.source.read(start, stop)
    return np.stack([images_lib.center_crop_arr(images_lib.to_rgb(im), self.size) for im in images])
