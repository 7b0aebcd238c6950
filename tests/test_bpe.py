"""Tests of the code chapter 08 exports (lib/groundup/bpe.py)."""

import json
import math

import pytest
import regex
from hypothesis import given, settings, strategies as st

from groundup.bpe import (GPT2_SPLIT_PATTERN, BPETokenizer, bits_per_char, merge_pair, pair_counts, train_merges,
                          train_merges_naive, word_counts)

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
          "Ünïcödé wörds, 数字 1234 and emoji 🙂🙂 too; aaaa bbbb aaaaaaa. ") * 3


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer().train(CORPUS, 256 + 120, special_tokens={"<|endoftext|>": 376, "<|pad|>": 377})


def test_pair_counts_and_merge():
    assert pair_counts([[1, 2, 1, 2], [1, 2]], [1, 5]) == {(1, 2): 7, (2, 1): 1}
    assert merge_pair([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]
    assert merge_pair([7, 7, 7], (7, 7), 9) == [9, 7]               # non-overlapping, left to right
    assert merge_pair([], (1, 2), 9) == []


def test_split_pattern_is_gpt2s_and_lossless():
    assert regex.findall(GPT2_SPLIT_PATTERN, "Hello world's  end!!\n\n 42") == \
        ["Hello", " world", "'s", " ", " end", "!!", "\n\n", " 42"]
    assert "".join(regex.findall(GPT2_SPLIT_PATTERN, CORPUS)) == CORPUS


def test_incremental_trainer_equals_naive():
    wc = word_counts(CORPUS)
    for rank in (None, list(reversed(range(256)))):
        naive = train_merges_naive(wc, 150, byte_rank=rank)
        fast = train_merges(wc, 150, byte_rank=rank)
        assert list(naive.items()) == list(fast.items())


@settings(max_examples=30, deadline=None, database=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=12, ).map(lambda b: bytes(x % 5 + 97 for x in b)),
                       st.integers(1, 20), min_size=1, max_size=30))
def test_incremental_trainer_equals_naive_random(wc):
    # a 5-letter alphabet makes many ties and overlapping runs, where a wrong update shows up
    assert list(train_merges(wc, 40).items()) == list(train_merges_naive(wc, 40).items())


def test_encoding_reproduces_training_segmentation(tok):
    # applying the merges in rank order to each training word gives what training produced
    for w in word_counts(CORPUS):
        ids = list(w)
        for pair, z in tok.merges.items():
            ids = merge_pair(ids, pair, z)
        assert tok._encode_chunk(w) == ids


def test_roundtrip_and_compression(tok):
    ids = tok.encode(CORPUS)
    assert tok.decode(ids) == CORPUS
    assert len(ids) < len(CORPUS.encode()) / 2
    assert tok.vocab_size == 256 + 120 + 2


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(), st.text(alphabet="ab <|endoftext|>", max_size=30))
def test_roundtrip_property(tok, s, t):
    assert tok.decode(tok.encode(s, allowed_special="none")) == s
    mixed = s + "<|endoftext|>" + t + "<|pad|>"
    ids = tok.encode(mixed, allowed_special="all")
    assert tok.decode(ids) == mixed
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_roundtrip_all_of_tiny_shakespeare(mirror):
    text = (mirror / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    tok = BPETokenizer().train(text, 1024)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.2          # about 2.4 characters per token at vocab 1024


def test_special_tokens(tok):
    doc = "end<|endoftext|>start<|pad|>"
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode(doc)
    assert tok.encode(doc, allowed_special={"<|pad|>"})[-1] == 377
    assert 376 not in tok.encode(doc, allowed_special={"<|pad|>"})
    assert tok.encode(doc, allowed_special="all").count(376) == 1
    assert 376 not in tok.encode(doc, allowed_special="none")
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(doc, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special must be"):
        tok.encode(doc, allowed_special="sometimes")


def test_special_token_ids_are_checked():
    t = BPETokenizer().train("abababab cdcd", 258)
    with pytest.raises(ValueError, match="ids below 258"):
        t.register_special_tokens({"<s>": 100})
    with pytest.raises(ValueError, match="distinct"):
        t.register_special_tokens({"<s>": 300, "</s>": 300})
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer().train("abc", 100)


def test_decode_errors(tok):
    ids = tok.encode("é")
    assert tok.decode(ids[:1]) == "\ufffd"                              # half a UTF-8 character
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids[:1], errors="strict")
    with pytest.raises(ValueError, match="not in this tokenizer"):
        tok.decode([tok.vocab_size])


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "groundup-bpe" and len(data["merges"]) == 120
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern and loaded.vocab == tok.vocab
    assert loaded.encode(CORPUS) == tok.encode(CORPUS)
    data["merges"][0] = [999, 1, "x"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="does not exist yet"):
        BPETokenizer.load(path)
    path.write_text(json.dumps({"format": "other"}), encoding="utf-8")
    with pytest.raises(ValueError, match="not a groundup-bpe"):
        BPETokenizer.load(path)


def test_same_merges_as_huggingface_with_its_tie_order():
    tokenizers = pytest.importorskip("tokenizers")
    from groundup.bpe import bytes_to_unicode, hf_byte_rank

    text = CORPUS * 2
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=256 + 100, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text], trainer=trainer)
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    hf_merges = [tuple(bytes(u2b[c] for c in part) for part in (m.split(" ") if isinstance(m, str) else m))
                 for m in json.loads(hf.to_str())["model"]["merges"]]
    ours = BPETokenizer().train(text, 256 + 100, byte_rank=hf_byte_rank())
    assert [(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges] == hf_merges
    assert len(ours.encode(text)) == len(hf.encode(text).ids)


def test_training_stops_when_nothing_is_left_to_merge():
    merges = train_merges({b"ab": 3, b"c": 1}, 10)
    assert merges == {(97, 98): 256}
    assert train_merges_naive({b"ab": 3, b"c": 1}, 10) == merges


def test_bits_per_char():
    assert bits_per_char(math.log(2), 10, 10) == pytest.approx(1.0)
    # 3 nats per token at 1 token per 4 characters = 0.75 nats per character
    assert bits_per_char(3.0, 250, 1000) == pytest.approx(0.75 / math.log(2))
    with pytest.raises(ValueError):
        bits_per_char(1.0, 0, 10)


def test_vocab_size_covers_a_special_token_beyond_the_vocabulary():
    t = BPETokenizer().train("abababab cdcd", 258)
    t.register_special_tokens({"<|gap|>": 300})              # ids 258..299 unused
    ids = t.encode("ab<|gap|>", allowed_special="all")
    assert 300 in ids
    assert t.vocab_size == 301 and max(ids) < t.vocab_size   # an embedding of vocab_size rows fits
    with pytest.raises(ValueError, match="not in this tokenizer"):
        t.decode([280])                                      # an id in the gap is unused
    assert BPETokenizer().train("abababab cdcd", 258).vocab_size == 258


def test_incremental_trainer_on_overlapping_runs():
    # runs of one symbol and alternating pairs: the left neighbour of a site can be the new symbol
    wc = {b"aaaaaaa": 3, b"abababab": 2, b"aab": 5, b"baaab": 1, b"ab": 4}
    assert list(train_merges(wc, 12).items()) == list(train_merges_naive(wc, 12).items())


def test_byte_ids_permute_the_byte_symbols(tmp_path):
    perm = list(reversed(range(256)))
    t = BPETokenizer(byte_ids=perm)
    assert t.encode("a") == [255 - 97] and t.decode([255 - 97]) == "a"
    assert t.decode(t.encode("héllo 🙂")) == "héllo 🙂"
    t.save(tmp_path / "t.json")
    assert BPETokenizer.load(tmp_path / "t.json").encode("héllo") == t.encode("héllo")
    with pytest.raises(ValueError, match="permutation"):
        BPETokenizer(byte_ids=[0] * 256)


GPT2_PROBES = [
    "Hello world",
    "It's 2024: naïve café, Ünïcödé, 数字 and emoji 🙂🚀!\n\n  x_1 = f(a, b) ** 2\t# ok  \n",
    "they'll've DON'T   spaces\u00a0and\u2003odd ones   \n\n\n",
    "   leading spaces, trailing spaces   ",
    "Numbers 1234567890 3.14159 -42 1e-9; URLs https://example.org/a?b=c&d=e",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "\x00\x01 control \x7f chars and \ufffd replacement, zero\u200bwidth, combining e\u0301",
    "<|endoftext|> as ordinary text, <|notspecial|>",
]


@pytest.fixture(scope="module")
def gpt2_pair(mirror):
    tokenizers = pytest.importorskip("tokenizers")
    from groundup.bpe import load_gpt2_tokenizer

    vocab, merges = mirror / "gpt2" / "vocab.json", mirror / "gpt2" / "merges.txt"
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return load_gpt2_tokenizer(vocab, merges), hf


def test_gpt2_files_give_huggingface_ids(gpt2_pair, mirror):
    ours, hf = gpt2_pair
    assert ours.vocab_size == 50_257 and len(ours.merges) == 50_000
    assert ours.special_tokens == {"<|endoftext|>": 50_256}
    assert ours.encode("Hello world") == [15496, 995]
    for text in GPT2_PROBES:
        ids = ours.encode(text, allowed_special="none")
        assert ids == hf.encode(text).ids, text
        assert ours.decode(ids) == text
    shakespeare = (mirror / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:300_000]
    assert ours.encode(shakespeare) == hf.encode(shakespeare).ids
    assert ours.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]


@settings(max_examples=300, deadline=None, database=None)
@given(st.text())
def test_gpt2_files_give_huggingface_ids_random(gpt2_pair, s):
    ours, hf = gpt2_pair
    assert ours.encode(s, allowed_special="none") == hf.encode(s).ids


def test_gpt2_loader_rejects_inconsistent_files(tmp_path, mirror):
    from groundup.bpe import load_gpt2_tokenizer

    vocab = json.loads((mirror / "gpt2" / "vocab.json").read_text(encoding="utf-8"))
    merges = (mirror / "gpt2" / "merges.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    swapped = [merges[0], merges[2], merges[1], *merges[3:]]            # two ranks swapped
    (tmp_path / "merges.txt").write_text("\n".join(swapped) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="ranks and ids must agree"):
        load_gpt2_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_trainer_restores_the_garbage_collector_state():
    import gc

    assert gc.isenabled()
    train_merges({b"abab": 2}, 3)
    assert gc.isenabled()
    gc.disable()
    try:
        train_merges({b"abab": 2}, 3)
        assert not gc.isenabled()
    finally:
        gc.enable()
