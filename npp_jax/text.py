"""Caption text -> T5 encoder input: the caption cleaning LlamaGen applies, then sentencepiece token
ids.

Cleaning (NPP.md, "Text to image"): LlamaGen passes every caption twice through DeepFloyd IF's
caption cleaning before tokenizing, for its features and its prompts alike; features of a converted
checkpoint were made so. `clean` does the same with our own rule tables (`_RULES_*`), written from
the description: URL-decode, lowercase, drop URLs, HTML tags, @handles, CJK, IP addresses, file
names, long digit runs and ids, unify dashes and quotes, split words joined by many -/_, collapse
whitespace, strip quotes and stray punctuation at the ends. For plain prompts that is lowercasing
and whitespace normalisation. DeepFloyd's code leans on BeautifulSoup (tags) and ftfy (text repair);
here the standard library's HTML parser strips tags and `_repair` does ftfy's character-level fixes
(NFC, curly quotes, control characters, ligatures, full-width forms). Not ftfy's mojibake repair
(re-decoding text that was decoded with the wrong codec): a heuristic that needs ftfy's tables, and
machine-written captions (BLIP, LLaVA) have no mojibake to repair.

Tokenizing: the T5 folder's `spiece.model` through the `sentencepiece` package, EOS (id 1) appended,
truncated to max_length including EOS (120 in LlamaGen), padded with 0, with a mask; the truncated
captions are counted, not refused, as LlamaGen's tokenizer call truncates them silently.
"""

import dataclasses
import html
import html.parser
import re
from typing import Sequence
import unicodedata
import urllib.parse

from etils import epath
import numpy as np

MAX_LENGTH = 120  # Tokens per caption including EOS: LlamaGen's t5_feature_max_len / cls_token_num.
PAD_ID, EOS_ID = 0, 1  # T5's sentencepiece ids.


# --------------------------------------------------------------------------------------------------
# Cleaning.


class _TextOnly(html.parser.HTMLParser):
  """Keeps the text between tags; character references decoded (what an HTML parser's text is)."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts = []

  def handle_data(self, data):
    self.parts.append(data)


def _strip_tags(text: str) -> str:
  parser = _TextOnly()
  parser.feed(text)
  parser.close()
  return "".join(parser.parts)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\ufeff]")
_TERMINAL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WIDE_OR_LIGATURE = re.compile(r"[\ufb00-\ufb06\uff01-\uff5e]")


def _repair(text: str) -> str:
  """ftfy's character-level fixes: terminal escapes and control characters out, curly quotes
  straightened, ligatures and full-width letters to their plain forms, NFC."""
  text = _CONTROL.sub("", _TERMINAL.sub("", text))
  text = re.sub(r"[\u02bc\u2018-\u201b]", "'", text)
  text = re.sub(r"[\u201c-\u201f]", '"', text)
  text = _WIDE_OR_LIGATURE.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
  return unicodedata.normalize("NFC", text)


_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_DOMAINS = "com|co|ru|net|org|edu|gov|it"
_DASHES = (
  "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
  "\ufe31\ufe32\ufe58\ufe63\uff0d"
)
_STRAY = r"#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*"  # Punctuation that only decorates (***SALE***, #tag).


def _url(prefix: str) -> str:
  # A scheme (or www:) with its slashes, or a bare domain of a common top-level domain with its
  # path; not when an @ follows (an e-mail address is dropped as a handle instead).
  return (
    rf"\b((?:{prefix}(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:{_DOMAINS})[\w/-]*\b\/?(?!@)))"
  )


# (pattern, replacement) in order; each a rule of the description. Applied to the lowercased
# caption.
_RULES_BEFORE_TAGS = [
  (r"<person>", "person"),  # A placeholder some caption sets use, before tags are stripped.
  (_url("https?:"), ""),
  (_url("www:"), ""),
]
_RULES_AFTER_TAGS = [
  (r"@[\w\d]+\b", ""),  # @handles.
  (r"[\u31c0-\u9fff]+", ""),  # CJK strokes, enclosed letters, compatibility, ideographs (+ ext. A).
  (rf"[{_DASHES}]+", "-"),
  (r"[`´«»“”¨]", '"'),
  (r"[‘’]", "'"),
  (r"&quot;?", ""),
  (r"&amp", ""),
  (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses.
  (r"\d:\d\d\s+$", ""),  # A trailing article time stamp.
  (r"\\n", " "),  # A literal backslash-n left by an export.
  (r"#\d{1,3}\b", ""),
  (r"#\d{5,}\b", ""),
  (r"\b\d{6,}\b", ""),  # Long digit runs: ids, phone numbers.
  (rf"[\S]+\.(?:{_FILE_TYPES})", ""),  # File names.
  (r"[\"']{2,}", '"'),
  (r"[\.]{2,}", " "),
  (rf"[{_STRAY}]+", " "),
  (r"\s+\.\s+", " "),
]
_RULES_AFTER_REPAIR = [
  (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # Product codes: jc6640,
  (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc,
  (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231.
  (r"(worldwide\s+)?(free\s+)?shipping", ""),  # Shop boilerplate.
  (r"(free\s)?download(\sfree)?", ""),
  (r"\bclick\b\s(?:for|on)\s\w+", ""),
  (rf"\b(?:{_FILE_TYPES})(\s+cover)?\b", ""),
  (r"\bpage\s+\d+\b", ""),
  (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # Mixed ids: j2d1a2a.
  (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # Sizes: 1920x1080 (Latin x, Cyrillic х, ×).
  (r"\b\s+\:\s+", ": "),
  (r"(\D[,\./])\b", r"\1 "),  # A space after punctuation glued to the next word.
  (r"\s+", " "),
  # The ends. No strip before these, as in the description's source: a leading space protects a
  # quote.
  (r"^[\"']([\w\W]+)[\"']$", r"\1"),
  (r"^['_,\-:;]", ""),
  (r"['_,\-:\-+]$", ""),
  (r"^\.\S+$", ""),
]
_compile = lambda rules: [(re.compile(p), r) for p, r in rules]
_BEFORE_TAGS, _AFTER_TAGS, _AFTER_REPAIR = map(
  _compile, (_RULES_BEFORE_TAGS, _RULES_AFTER_TAGS, _RULES_AFTER_REPAIR)
)
_JOINED = re.compile(r"[-_]")


def _apply(rules, text: str) -> str:
  for pattern, replacement in rules:
    text = pattern.sub(replacement, text)
  return text


def clean_once(caption: str) -> str:
  """One pass of the caption cleaning (LlamaGen applies two: `clean`)."""
  text = urllib.parse.unquote_plus(str(caption)).strip().lower()
  text = _strip_tags(_apply(_BEFORE_TAGS, text))
  text = _apply(_AFTER_TAGS, text)
  if len(_JOINED.findall(text)) > 3:  # this-is-my-cute-cat, this_is_my_cute_cat.
    text = _JOINED.sub(" ", text)
  text = html.unescape(html.unescape(_repair(text))).strip()
  return _apply(_AFTER_REPAIR, text).strip()


def clean(caption: str) -> str:
  """The caption as LlamaGen tokenizes it: two passes of the cleaning (the second catches what the
  first uncovered, e.g. an entity that decoded into a tag)."""
  return clean_once(clean_once(caption))


def read_prompts(path) -> list[str]:
  """A prompts file: UTF-8 text, one prompt a line, blank lines skipped. One-line ValueError when it
  is missing, not UTF-8, or holds no prompt."""
  try:
    raw = epath.Path(path).read_bytes()
  except (FileNotFoundError, IsADirectoryError):
    raise ValueError(
      f"prompts file {path} does not exist; expected a text file, one prompt a line"
    ) from None
  try:
    lines = raw.decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise ValueError(
      f"prompts file {path} is not UTF-8 (byte {e.start}); expected UTF-8 text, one prompt a line"
    ) from None
  prompts = [line.strip() for line in lines if line.strip()]
  if not prompts:
    raise ValueError(f"prompts file {path} holds no prompt; expected one prompt a line")
  return prompts


# --------------------------------------------------------------------------------------------------
# Tokenizing.


@dataclasses.dataclass(frozen=True)
class Tokens:
  ids: np.ndarray  # int32 [N, max_length]: tokens, EOS, then PAD_ID.
  mask: np.ndarray  # bool [N, max_length]: True on tokens and EOS.
  truncated: int  # Captions cut to fit max_length (their EOS kept).

  @property
  def lengths(self) -> np.ndarray:
    return self.mask.sum(axis=1).astype(np.int32)


class Tokenizer:
  """A T5 `spiece.model` (read through epath) -> `__call__(captions) -> Tokens`, ids as HF's
  T5Tokenizer gives them with padding="max_length", truncation=True."""

  def __init__(self, spiece_path, max_length: int = MAX_LENGTH):
    import sentencepiece  # Only text paths need it.

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f"max_length={max_length!r}; expected an integer >= 2 (tokens and EOS)")
    self.path, self.max_length = str(spiece_path), max_length
    try:
      proto = epath.Path(spiece_path).read_bytes()
    except FileNotFoundError:
      raise ValueError(f"{spiece_path} does not exist; expected a sentencepiece model") from None
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{spiece_path} is not a sentencepiece model ({e})") from None
    if (self._sp.pad_id(), self._sp.eos_id()) != (PAD_ID, EOS_ID):
      raise ValueError(
        f"{spiece_path} has pad id {self._sp.pad_id()} and EOS id {self._sp.eos_id()}; expected "
        f"T5's {PAD_ID} and {EOS_ID}"
      )

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def __call__(self, captions: Sequence[str]) -> Tokens:
    n = len(captions)
    ids = np.full((n, self.max_length), PAD_ID, np.int32)
    lengths, truncated = np.zeros((n,), np.int32), 0
    for i, pieces in enumerate(self._sp.encode(list(captions))):
      truncated += len(pieces) + 1 > self.max_length
      pieces = pieces[: self.max_length - 1] + [EOS_ID]
      ids[i, : len(pieces)], lengths[i] = pieces, len(pieces)
    mask = np.arange(self.max_length)[None, :] < lengths[:, None]
    return Tokens(ids=ids, mask=mask, truncated=truncated)
