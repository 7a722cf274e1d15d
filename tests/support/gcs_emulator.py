"""gcp-storage-emulator as tests/test_gcs.py runs it: `python tests/support/gcs_emulator.py start
--port=...` takes the emulator's own arguments, with the fixes that make it answer the real
clients (gcsfs and tensorstore) as real GCS does. Each fix was a failure or a wait of the
emulator (2026.7.19):

- Generation headers. GCS answers every download with x-goog-generation and x-goog-metageneration;
  the emulator sends neither, and tensorstore then fails every read of an OCDBT manifest it has just
  written ("Malformed StorageGeneration"), i.e. every orbax checkpoint. Added from the object's
  metadata.
- Preconditions (ifGenerationMatch / ifGenerationNotMatch on reads and writes), which the emulator
  ignores: tensorstore revalidates a cached manifest with ifGenerationNotMatch and, served the whole
  object instead of 304 Not Modified, failed the next checkpoint (seen once requests ran
  concurrently). Answered as GCS does: 304 for an unchanged read, 412 for a failed condition.
- objects.move (`POST .../o/SRC/moveTo/o/DST`), which gcsfs tries first for every rename
  (etils.epath's `rename`: each of our atomic file writes). The emulator answered 501, which gcsfs
  retried five times with exponential backoff (about 33 s) before it fell back to copy + delete:
  more than half of test_gcs.py's time went to those sleeps. Served as GCS documents it: the object
  under its new name, the old name gone, the new object's resource in the answer.
- Concurrency. The emulator served one connection at a time with a listen backlog of 5:
  tensorstore's parallel requests queued, or were refused under load (the test had capped them at
  2). Connections are served on threads here, with one lock around the emulator's storage (not
  thread-safe) and a deep backlog.
- In memory, the emulator rewrote its whole metadata table as indented JSON after every write (for a
  restart an in-memory server never has): quadratic in the number of objects. Skipped in memory.
"""

import functools
from http import HTTPStatus
from http import server as http_server
import re
import sys
import threading
import urllib.parse

from gcp_storage_emulator import server
from gcp_storage_emulator import storage
from gcp_storage_emulator.exceptions import NotFound
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


def move(request, response, storage, *args, **kwargs):
  """objects.move within one bucket:
  https://cloud.google.com/storage/docs/json_api/v1/objects/move"""
  p = request.params
  try:
    obj = objects._copy(
      request.base_url,
      storage,
      p["bucket_name"],
      p["object_id"],
      p["bucket_name"],
      p["dest_object_id"],
    )
    storage.delete_file(p["bucket_name"], p["object_id"])
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  response.json(obj)


_MOVE = (
  r"^{api}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
  r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
)
# The routing table holds the emulator's own download: swap ours in, and put move first (the
# generic object route would take `.../moveTo/...` as an object name).
server.HANDLERS = (
  (_MOVE.format(api=server.settings.API_ENDPOINT), {server.POST: move}),
  *(
    (regex, {m: download if h is _download else h for m, h in handlers.items()})
    for regex, handlers in server.HANDLERS
  ),
)

_lock = threading.Lock()
_handle = server.Router.handle


_OBJECT = re.compile(r"^(?:/download)?/storage/v1/b/(?P<bucket>[-.\w]+)/o/(?P<name>.*[^/]+)$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/(?P<bucket>[-.\w]+)/o$")


def _failed_precondition(handler, method, storage):
  """The status real GCS answers for a request whose ifGeneration(Not)Match fails, or None.
  https://cloud.google.com/storage/docs/request-preconditions"""
  url = urllib.parse.urlparse(handler.path)
  query = urllib.parse.parse_qs(url.query)
  match, not_match = query.get("ifGenerationMatch"), query.get("ifGenerationNotMatch")
  if not (match or not_match):
    return None
  if m := _OBJECT.match(url.path):
    bucket, name = m["bucket"], urllib.parse.unquote(m["name"])
  elif (m := _UPLOAD.match(url.path)) and query.get("name"):
    bucket, name = m["bucket"], query["name"][0]
  else:
    return None
  obj = storage.objects.get(bucket, {}).get(name)
  if obj is None and method != "POST":
    return None  # The emulator's own 404.
  generation = int(obj["generation"]) if obj else 0  # 0: "no live object", for writes.
  reads = method == "GET"
  if match and generation != int(match[0]):
    return HTTPStatus.PRECONDITION_FAILED
  if not_match and generation == int(not_match[0]):
    return HTTPStatus.NOT_MODIFIED if reads else HTTPStatus.PRECONDITION_FAILED
  return None


@functools.wraps(_handle)
def handle(self, method):
  with _lock:
    status = _failed_precondition(self._request_handler, method, self._request_handler.storage)
    if status is None:
      return _handle(self, method)
    # Read the body the answer refuses: closing a socket with unread data resets the connection, and
    # the client would see a reset instead of the status.
    self._request_handler.rfile.read(int(self._request_handler.headers.get("Content-Length") or 0))
    response = server.Response(self._request_handler)
    response.status = status
    response.close()


server.Router.handle = handle


class _ThreadingServer(http_server.ThreadingHTTPServer):
  request_queue_size = 256
  daemon_threads = True

  def handle_error(self, request, client_address):
    # gcsfs asks for an object and for its name as a folder at once and hangs up on the loser: a
    # broken pipe there is the client's choice, not an error worth a traceback in the log.
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      super().handle_error(request, client_address)


server.server.HTTPServer = _ThreadingServer  # The name APIThread.run builds its server from.

_write_config = storage.Storage._write_config_to_file


def _write_config_unless_in_memory(self):
  if not self._store._use_memory:
    _write_config(self)


storage.Storage._write_config_to_file = _write_config_unless_in_memory

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
