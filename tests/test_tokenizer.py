"""OpenAI CLIP BPE against ids known from the published vocabulary (not from our own output)."""
import numpy as np
import pytest

from vtp_jax.data import tokenizer

# Each of these words is a single merged token "word</w>" in the CLIP vocabulary, whose ids are
# listed in the OpenAI CLIP README / widely quoted: "a"=320, "photo"=1125, "of"=539, "cat"=2368,
# "dog"=1929. SOT=49406, EOT=49407.
KNOWN = {"a photo of a cat": [320, 1125, 539, 320, 2368], "a dog": [320, 1929]}


def test_known_ids():
    out = tokenizer.tokenize(list(KNOWN))
    assert out.shape == (2, 77) and out.dtype == np.int32
    for row, ids in zip(out, KNOWN.values()):
        n = len(ids) + 2
        assert row[:n].tolist() == [49406, *ids, 49407]
        assert not row[n:].any()


def test_byte_fallback_and_vocab_layout():
    """Byte-level units: the first 94 ids are the printable ASCII bytes '!'..'~', in order, and
    id + 256 is the same byte ending a word; a lone "!" is therefore 0 + 256."""
    tok = tokenizer.get_tokenizer()
    assert len(tok.encoder) == tokenizer.VOCAB_SIZE
    assert tok.encoder["!"] == 0 and tok.encoder["~"] == 93 and tok.encoder["!</w>"] == 256
    assert tok.encode("!") == [256]
    assert tok.encode("~") == [93 + 256]


def test_cleaning_is_lowercase_html_ftfy_whitespace():
    t = tokenizer.tokenize(["A  Photo\n of\ta CAT", "a photo of a cat", "a photo &amp; a cat", "a photo & a cat"])
    np.testing.assert_array_equal(t[0], t[1])
    np.testing.assert_array_equal(t[2], t[3])


def test_truncation_forces_eot():
    t = tokenizer.tokenize(["cat " * 200], context_length=77)
    assert t[0, 0] == 49406 and t[0, -1] == 49407
    assert (t[0, 1:-1] == 2368).all()


def test_vocabulary_ships_with_the_package_and_the_variable_overrides_it(tmp_path, monkeypatch):
    """No open_clip needed: the packaged merges file is found; VTP_BPE_VOCAB points elsewhere, and
    one that names no file says so and how to fix it."""
    import gzip
    import importlib.util

    monkeypatch.delenv("VTP_BPE_VOCAB", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if open_clip were absent
    path = tokenizer.find_vocab_file()
    assert path.endswith("vtp_jax/data/assets/bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert len(f.read().split("\n")) >= 49152 - 256 - 2
    copy = tmp_path / "vocab.txt.gz"
    copy.write_bytes(open(path, "rb").read())
    monkeypatch.setenv("VTP_BPE_VOCAB", str(copy))
    assert tokenizer.find_vocab_file() == str(copy)
    monkeypatch.setenv("VTP_BPE_VOCAB", str(tmp_path / "absent.txt.gz"))
    with pytest.raises(FileNotFoundError, match="VTP_BPE_VOCAB=.*absent.txt.gz does not exist.*shipped with vtp_jax"):
        tokenizer.find_vocab_file()
