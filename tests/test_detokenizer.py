"""Streaming text: deltas add up to the final text, stop strings are cut even across tokens."""
from __future__ import annotations

import pytest

from pdcluster.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(llm):
    return llm.tokenizer


def stream(tok, text: str, stop=(), include=False, min_tokens=0):
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, tok.encode("Hello"), tuple(stop), include, min_tokens=min_tokens)
    pieces = []
    for t in ids:
        stopped = d.push([t])
        pieces.append(d.take(final=stopped))
        if stopped:
            break
    pieces.append(d.take(final=True))
    return "".join(pieces), d.stopped


def test_deltas_reassemble_unicode_text(tok):
    text = " Grüße aus Köln — 東京 🚀 done"
    out, stopped = stream(tok, text)
    assert out == tok.decode(tok.encode(text)) and not stopped


def test_text_ending_mid_character_ends_with_a_replacement_character(tok):
    """A length finish inside an emoji's bytes: the held-back bytes are not lost, and the text is
    what decoding all the output tokens gives."""
    ids = tok.encode(" ok 🚀")
    for cut in range(1, len(ids)):
        d = IncrementalDetokenizer(tok, tok.encode("Hello"))
        pieces = []
        for t in ids[:cut]:
            d.push([t])
            pieces.append(d.take(final=False))
        pieces.append(d.take(final=True))
        assert "".join(pieces) == tok.decode(ids[:cut]), cut
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # the case above covers a split character


class _Bytes:
    """A tokenizer whose tokens are raw bytes; token 2 holds "!" and the start of an emoji."""
    PIECES = {1: b"hi", 2: b"!\xf0", 3: b"\x9f\x9a\x80"}

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.PIECES[i] for i in ids).decode(errors="replace")


def test_text_flushed_at_the_end_is_still_cut_at_a_stop_string():
    d = IncrementalDetokenizer(_Bytes(), [], ("!",))
    assert not d.push([1, 2])           # "!" waits with the emoji's first byte
    assert d.take(final=True) == "hi" and d.stopped
    d = IncrementalDetokenizer(_Bytes(), [])
    d.push([1, 2])
    assert d.take(final=True) == "hi!\ufffd"


def test_stop_string_spanning_tokens_is_cut(tok):
    out, stopped = stream(tok, " alpha beta gamma delta", stop=["a gam"])
    assert stopped and out == " alpha bet"
    out, _ = stream(tok, " alpha beta gamma delta", stop=["a gam"], include=True)
    assert out == " alpha beta gam"


def test_stop_strings_count_from_min_tokens(tok):
    text = " stop here, then go on and stop again"
    first = len(tok.encode(" stop"))
    assert stream(tok, text, stop=["stop"]) == (" ", True)
    # the first "stop" is within min_tokens: the request runs on to the second
    out, stopped = stream(tok, text, stop=["stop"], min_tokens=first + 2)
    assert stopped and out == " stop here, then go on and "
    assert stream(tok, text, stop=["nowhere"], min_tokens=3) == (tok.decode(tok.encode(text)), False)


def test_text_that_might_start_a_stop_string_is_held_back(tok):
    d = IncrementalDetokenizer(tok, [], ("STOP!",))
    for t in tok.encode(" one two STO"):
        d.push([t])
    released = d.take(final=False)
    assert "STO" not in released and released.startswith(" one")


def test_special_tokens_stay_when_asked(tok):
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert tok.hf.convert_tokens_to_ids("<|im_start|>") in ids  # a special token of this vocabulary
    for skip, want in ((True, "assistant\nHi"), (False, "<|im_start|>assistant\nHi<|im_end|>")):
        d = IncrementalDetokenizer(tok, [], (), skip_special_tokens=skip)
        d.push(ids)
        assert d.take(final=True) == want


def test_token_bytes_are_the_text_even_where_a_token_splits_a_character(tok):
    """Logprobs' `bytes` per token: an emoji's tokens each hold part of its UTF-8 bytes, and together
    the tokens' bytes are the text (each token decoded alone shows U+FFFD instead)."""
    from pdcluster.cluster.serve.openai_protocol import token_spelling

    text = "🍕 Grüße 東京"
    ids = tok.encode(text, add_special_tokens=False)
    parts = [tok.token_bytes(i) for i in ids]
    assert b"".join(parts) == text.encode()
    partial = [p for p in parts if "\ufffd" in p.decode(errors="replace")]
    assert partial  # this tokenizer splits the emoji
    spellings = [token_spelling(p) for p in partial]
    assert all(s.startswith("bytes:\\x") for s in spellings) and len(set(spellings)) == len(partial)
    assert token_spelling(" Gr".encode()) == " Gr"
    eos = next(iter(tok.eos_token_ids))   # a special token's bytes are its literal text
    assert tok.token_bytes(eos) == tok.hf.convert_ids_to_tokens(eos).encode() == b"<|im_end|>"
