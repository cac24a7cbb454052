"""Tests for ldm.modules.encoders.tokenizer: known ids, parity with HF transformers' CLIPTokenizer, truncation."""
from __future__ import annotations

import gzip
import json
import logging
import socket

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldm.modules.encoders.tokenizer import DEFAULT_MERGES_PATH, CLIPTokenizer

BOS, EOS = 49406, 49407
CAT = [BOS, 320, 8853, 539, 320, 2368, EOS]  # "a photograph of a cat", from the original CLIP/SD tokenizer

LONG_PROMPT = ", ".join(f"detail {i}" for i in range(60))  # > 77 tokens, numbers split into digits
HUNDRED_WORDS = " ".join(["dragon", "castle", "mountain", "sunset"] * 25)

PROMPTS = [
    "",
    "a photograph of a cat",
    "a photograph of an astronaut riding a horse",
    "A PHOTOGRAPH OF A CAT",
    "MiXeD CaSe PrOmPt",
    "   leading and trailing spaces   ",
    "multiple    spaces\tand\ttabs\nand\r\nnewlines",
    "punctuation!!! what?? yes... (maybe) [sure] {ok} <tag> a, b; c: d",
    "(masterpiece:1.2), best quality, ((detailed)), [[background]]",
    "1024x768 wallpaper, 4k, 8K uhd, 16:9, 3.14159, 2023",
    "version 1.5 vs 2.1, rtx4090, sd-v1-4.ckpt",
    "it's a dog's life, they're here, we've won, i'm ok, you'll see, he'd go, don't",
    "IT'S SHOUTING, THEY'RE LOUD",
    "rock 'n' roll, 'quoted', \"double quoted\"",
    "café au lait, crème brûlée, naïve façade",
    "Ünïcödé ÀÉÎÕÜ straße",
    "decomposed cafe\u0301 and man\u0303ana",  # NFC (ftfy.fix_text in CLIP, the normalizer in HF)
    "emoji 🐱🐶 🚀✨ and 👩‍👩‍👧 family",
    "猫の写真, 中文提示词, 한국어 프롬프트",
    "русский текст, ελληνικά, עברית, العربية",
    "math ∑∫√∞ ≈ ≠, arrows → ← ↑, symbols © ® ™ §",
    "fish &amp; chips, a &lt;b&gt; c, &quot;quoted&quot;, &#39;single&#39;",
    "double escaped &amp;amp; entity",
    "email me@example.com, url https://example.com/a?b=c&d=e#frag",
    "hash #tags @mentions $100 50% ^caret *star* _under_ ~tilde~ `tick` | pipe \\ back",
    "trending on artstation, by greg rutkowski and alphonse mucha, octane render, unreal engine 5",
    "portrait of a woman, highly detailed, digital painting, sharp focus, illustration, 85mm, f/1.8",
    "a--b---c, well-known, state-of-the-art, e.g. i.e. etc.",
    "snake_case_words and camelCaseWords and ALLCAPS123abc",
    "repeated repeated repeated repeated repeated words",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 ½ ² ³ ٣ 四",
    "a photo of a cat<|endoftext|>trailing",
    "full-width ＡＢＣ１２３ and ｈｅｌｌｏ",
    "tabs\t\t\tonly\tbetween",
    "ãñõ ÿ ß ø å æ œ ð þ",
    "x",
    "?!",
    LONG_PROMPT,
    HUNDRED_WORDS,
    "a " * 200,
    "masterpiece, " * 40 + "cat",
]

# Prompts where HF's fast CLIPTokenizer disagrees with CLIP's original cleaning, by design rather than by bug:
# HF's normalizer is NFC + whitespace collapse + lowercase and never unescapes HTML entities, whereas CLIP (and
# this module) runs html.unescape twice, so "&amp;" is "&" here but "&amp;" ("&", "amp", ";") in HF.
HTML_ENTITY_PROMPTS = {
    "fish &amp; chips, a &lt;b&gt; c, &quot;quoted&quot;, &#39;single&#39;",
    "double escaped &amp;amp; entity",
}


def _reference_byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte alphabet in vocabulary order, written here independently of the module under test."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory: pytest.TempPathFactory):
    """transformers' CLIPTokenizer built offline from vocab.json / merges.txt generated from the shipped .gz."""
    transformers = pytest.importorskip("transformers")
    with gzip.open(DEFAULT_MERGES_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    alphabet = _reference_byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408
    folder = tmp_path_factory.mktemp("hf_clip")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    # Building from local files must not touch the network: make any connection attempt fail loudly.
    def no_network(*args, **kwargs):
        raise AssertionError("HF tokenizer construction tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        # Positional: transformers 4.x names these vocab_file/merges_file, 5.x vocab/merges (and reads paths).
        hf = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert hf("a photograph of a cat")["input_ids"] == CAT, "HF tokenizer did not load the generated files"
    return hf


def test_known_ids(tok: CLIPTokenizer) -> None:
    batch = tok(["a photograph of a cat"])
    assert batch.input_ids.dtype == torch.long
    assert batch.input_ids.tolist() == [CAT + [EOS] * (77 - len(CAT))]
    assert batch.lengths == [7]
    assert batch.truncated == [""]
    assert tok.encode("a photograph of a cat") == CAT[1:-1]
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (BOS, EOS, 49408)


def test_pad_id_zero(tok: CLIPTokenizer) -> None:
    batch = tok(["a photograph of a cat", ""], pad_id=0)
    assert batch.input_ids.tolist() == [CAT + [0] * 70, [BOS, EOS] + [0] * 75]
    assert batch.lengths == [7, 2]


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"p{i}" for i in range(len(PROMPTS))])
def test_parity_with_transformers(tok: CLIPTokenizer, hf_tok, prompt: str) -> None:
    if prompt in HTML_ENTITY_PROMPTS:
        pytest.skip("HF does not unescape HTML entities (CLIP does); checked in test_html_entities")
    expected = hf_tok(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tok([prompt]).input_ids[0].tolist() == expected


def test_html_entities(tok: CLIPTokenizer, hf_tok) -> None:
    # CLIP unescapes twice, so these equal HF's ids for the unescaped text.
    assert tok.encode("fish &amp; chips") == hf_tok("fish & chips", add_special_tokens=False)["input_ids"]
    assert tok.encode("a &amp;lt;b&amp;gt; c") == hf_tok("a <b> c", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("prompt", "hf_equivalent"),
    [
        # Python's str.lower() (CLIP's cleaning) maps a word-final capital sigma to final sigma; HF's Lowercase
        # normalizer maps every capital sigma to medial sigma.
        ("ΟΔΟΣ", "\u03bf\u03b4\u03bf\u03c2"),  # οδος with final ς
        # CLIP lowercases before pre-tokenising, so special-token text in any case becomes the special id; HF matches
        # added tokens case-sensitively on the raw text.
        ("a <|ENDOFTEXT|> b", "a <|endoftext|> b"),
        # str.strip() (CLIP's cleaning) also strips the separators U+001C..U+001F, which are not regex whitespace.
        ("cat\x1f", "cat"),
    ],
)
def test_known_cleaning_differences_from_hf(tok: CLIPTokenizer, hf_tok, prompt: str, hf_equivalent: str) -> None:
    """Inputs where HF's cleaning differs from CLIP's original; only the cleaning differs, not the BPE."""
    ours = tok.encode(prompt)
    assert ours != hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ours == hf_tok(hf_equivalent, add_special_tokens=False)["input_ids"]


def test_batch_matches_single(tok: CLIPTokenizer) -> None:
    batch = tok(PROMPTS)
    assert batch.input_ids.shape == (len(PROMPTS), 77)
    for row, prompt in enumerate(PROMPTS):
        assert batch.input_ids[row].tolist() == tok([prompt]).input_ids[0].tolist()


def test_truncation_warns_and_reports(tok: CLIPTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    words = ["dragon", "castle", "mountain", "sunset", "river"] * 20  # 100 single-token words
    ids = tok.encode(" ".join(words))
    assert len(ids) == 100
    with caplog.at_level(logging.WARNING, logger="ldm.modules.encoders.tokenizer"):
        batch = tok(["a cat", " ".join(words)])
    row = batch.input_ids[1].tolist()
    assert len(row) == 77 and row[0] == BOS and row[-1] == EOS
    assert row[1:-1] == ids[:75]
    assert batch.lengths == [4, 77]
    assert batch.truncated == ["", " ".join(words[75:])]
    records = [r for r in caplog.records if r.name == "ldm.modules.encoders.tokenizer"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "Prompt 2" in message and "77 tokens" in message and "dropped 25 tokens" in message
    assert f'"{" ".join(words[75:])}"' in message


def test_one_warning_for_several_long_prompts(tok: CLIPTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    other_long = "a castle on a hill at dawn with a dragon in the sky"
    with caplog.at_level(logging.WARNING, logger="ldm.modules.encoders.tokenizer"):
        batch = tok([HUNDRED_WORDS, "short", other_long, HUNDRED_WORDS], max_length=10)
    assert batch.truncated == [" ".join(HUNDRED_WORDS.split()[8:]), "", "a dragon in the sky", batch.truncated[0]]
    records = [r for r in caplog.records if r.name == "ldm.modules.encoders.tokenizer"]
    assert len(records) == 1
    message = records[0].getMessage()
    # identical prompts (a repeated batch) share one line
    assert "Prompts 1, 4 are longer than 10 tokens; dropped 92 tokens" in message
    assert 'Prompt 3 is longer than 10 tokens; dropped 5 tokens: "a dragon in the sky"' in message
    assert "Prompt 2" not in message


def test_no_warning_when_it_fits(tok: CLIPTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm.modules.encoders.tokenizer"):
        tok(["dragon " * 75])  # exactly 77 with bos and eos
    assert not caplog.records


@pytest.mark.parametrize(
    "prompt",
    [
        "a photograph of a cat",
        "an astronaut riding a horse on the moon trending on artstation",
        "the quick brown fox jumps over the lazy dog 1 2 3",
        "portrait of a woman with red hair oil painting",
    ],
)
def test_decode_round_trip(tok: CLIPTokenizer, prompt: str) -> None:
    assert tok.decode(tok.encode(prompt)) == prompt
    row = tok([prompt]).input_ids[0].tolist()
    assert tok.decode(row) == prompt
    assert tok.decode(row[:3], skip_special_tokens=False).startswith("<|startoftext|>")


def test_decode_is_lossy_at_word_pieces(tok: CLIPTokenizer) -> None:
    # CLIP ends every pre-tokenised piece with '</w>', so punctuation and multi-digit numbers come back spaced.
    assert tok.decode(tok.encode("Moon, stars 1024x768")) == "moon , stars 1 0 2 4 x 7 6 8"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12), max_size=20))
def test_decode_round_trip_property(words: list[str]) -> None:
    prompt = " ".join(words)
    assert CLIPTokenizer().decode(CLIPTokenizer().encode(prompt)) == prompt


def test_bad_input(tok: CLIPTokenizer) -> None:
    for bad in ([None], ["ok", 3], [b"bytes"]):
        with pytest.raises(ValueError):
            tok(bad)
    with pytest.raises(ValueError):
        tok.encode(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tok(["x"], max_length=1)
    with pytest.raises(ValueError):
        tok(["x"], pad_id=49408)
    with pytest.raises(ValueError):
        tok.decode([49408])


def test_whitespace_and_control_characters(tok: CLIPTokenizer) -> None:
    assert tok.encode(" a \n\t\r photograph\u3000of   a\u00a0cat ") == CAT[1:-1]
    for text in ["\x00\x01\x7f", "\ud800 lone surrogate", "\u200b\u200d\ufeff", "a\x1bb" * 500]:
        row = tok([text]).input_ids[0].tolist()
        assert row[0] == BOS and EOS in row


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.text(max_size=3000)))
def test_arbitrary_text_never_raises(text: str) -> None:
    batch = CLIPTokenizer()([text])
    assert batch.input_ids.shape == (1, 77)
    row = batch.input_ids[0].tolist()
    assert row[0] == BOS and EOS in row
    assert 2 <= batch.lengths[0] <= 77 and row[batch.lengths[0] - 1] == EOS
