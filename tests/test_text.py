"""Caption cleaning (npp_jax.text.clean): each rule of NPP.md's description on an example, and the
tokenizer's checks."""

import io
import re

import pytest
from support import t5_files

from npp_jax import text

# (caption, cleaned): one or two rules each; the expected strings are what the rules say, worked by
# hand.
EXAMPLES = [
  ("A Photo of a CAT", "a photo of a cat"),  # Plain prompts: lowercase,
  ("  two   dogs\trunning  ", "two dogs running"),  # whitespace collapsed and stripped.
  ("Hello%20World+again", "hello world again"),  # URL-decoded (+ is a space).
  ("buy at https://shop.example.com/item now", "buy at now"),  # URLs,
  ("see www.site.org today", "see today"),  # bare domains.
  ("<p>A <b>red</b> car</p>", "a red car"),  # HTML tags,
  ("salt &amp; pepper", "salt pepper"),  # entities (&amp is dropped, as in the source).
  ("photo by @john_doe on the beach", "photo by on the beach"),  # @handles.
  ("a cat 猫 sitting", "a cat sitting"),  # CJK.
  ("server at 192.168.0.1 is down", "server at is down"),  # IP addresses.
  ("IMG_1234.jpg a sunset", "a sunset"),  # File names.
  ("item 12345678 ref", "item ref"),  # Long digit runs,
  ("caption #12 end", "caption end"),  # short and long #numbers,
  ("model jc6640 in stock", "model in stock"),  # ids.
  ("this-is-my-cute-cat", "this is my cute cat"),  # More than three -/_ become spaces,
  ("a well-known painter", "a well-known painter"),  # fewer stay.
  ("an em dash\u2014and en \u2013 dash", "an em dash-and en - dash"),  # Dashes unified.
  (
    "\u201cCurly\u201d \u2018quotes\u2019",
    "curly\" 'quotes",
  ),  # Quotes unified; outer pair stripped.
  ('"A quoted caption"', "a quoted caption"),
  ("***SALE*** now", "sale now"),  # Decorating punctuation.
  ("free shipping on all orders", "on all orders"),  # Shop boilerplate.
  ("page 3 of the book", "of the book"),
  ("size 1920x1080 wallpaper", "size wallpaper"),  # Sizes.
  ("a cat,sitting.on a mat", "a cat, sitting. on a mat"),  # Space after glued punctuation.
  ("\ufb01ne \uff46\uff55\uff4c\uff4c width", "fine full width"),  # Ligatures, full width.
  ("-leading dash", "leading dash"),  # Stray punctuation at the ends.
  ("trailing+", "trailing"),
  ("bell\x07 char", "bell char"),  # Control characters.
  ("", ""),
]


@pytest.mark.parametrize("caption, cleaned", EXAMPLES)
def test_clean(caption, cleaned):
  assert text.clean(caption) == cleaned


def test_clean_is_two_passes():
  # An escaped tag becomes a tag in the first pass (entities decoded last) and goes in the second.
  once = text.clean_once("&lt;i&gt;hidden&lt;/i&gt; tag")
  assert "<i>" in once
  assert text.clean("&lt;i&gt;hidden&lt;/i&gt; tag") == text.clean_once(once)
  assert "<i>" not in text.clean("&lt;i&gt;hidden&lt;/i&gt; tag")


def _spiece(**ids) -> bytes:
  import sentencepiece as spm

  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(t5_files.SENTENCES * 4),
    model_writer=out,
    vocab_size=64,
    minloglevel=2,
    **ids,
  )
  return out.getvalue()


def test_tokenizer_needs_t5_ids(tmp_path):
  path = tmp_path / "spiece.model"
  path.write_bytes(_spiece())  # sentencepiece's defaults: unk 0, BOS 1, EOS 2, no pad.
  with pytest.raises(ValueError, match="has pad id -1 and EOS id 2; expected T5's 0 and 1"):
    text.Tokenizer(path)


def test_tokenizer_lengths(tmp_path):
  path = tmp_path / "spiece.model"
  path.write_bytes(t5_files.train_spiece())
  tokens = text.Tokenizer(path, max_length=6)(["a cat", "a photo of a cat on a wooden table"])
  assert tokens.ids.shape == (2, 6) and tokens.truncated == 1
  assert tokens.lengths[1] == 6 and tokens.ids[1, 5] == text.EOS_ID
  assert tokens.ids[0, tokens.lengths[0] :].tolist() == [text.PAD_ID] * (6 - tokens.lengths[0])
  with pytest.raises(ValueError, match="max_length=1; expected an integer >= 2"):
    text.Tokenizer(path, max_length=1)


@pytest.mark.parametrize(
  "content, message",
  [
    (b"", "holds no prompt; expected one prompt a line"),
    (b"\n  \n", "holds no prompt"),
    (b"a cat\n\xff\xfe dog\n", "is not UTF-8 (byte 6)"),
    (None, "does not exist; expected a text file"),
  ],
)
def test_bad_prompts_file(tmp_path, content, message):
  path = tmp_path / "prompts.txt"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    text.read_prompts(path)
  assert "\n" not in str(e.value)


def test_prompts_file(tmp_path):
  (tmp_path / "p.txt").write_text("A red car\n\n  a café at night \n", encoding="utf-8")
  assert text.read_prompts(tmp_path / "p.txt") == ["A red car", "a café at night"]
