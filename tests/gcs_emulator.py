"""gcp-storage-emulator as tests/test_gcs.py runs it: `python tests/gcs_emulator.py start --port=...` takes
the emulator's own arguments, with one fix. Real GCS answers every object download with x-goog-generation
(and x-goog-metageneration); the emulator (2026.7.19) sends neither, and tensorstore then fails every read
of an OCDBT manifest it has just written ("Malformed StorageGeneration"), i.e. every orbax checkpoint. The
headers are added from the object's own metadata; nothing else changes."""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # Not found: the emulator's own 404 stands.
    return
  if obj.get("generation"):
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")


objects.download = download  # Before the server module builds its routing tables from it.

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
