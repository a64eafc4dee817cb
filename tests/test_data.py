"""Tests for attnzoo.data: tokenizers, corpora, token datasets, MQAR."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.data import (
    IGNORE_INDEX,
    ArrayDataset,
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    TokenDataset,
    load_text_dataset,
    load_tokenizer,
    make_tokenizer,
    mqar,
    stdlib_corpus,
    text_corpus,
    unigram_entropy,
)
from attnzoo.data.tokenizers import load_directory_tokenizer

SAMPLE_TEXT = "def f(x):\n    return x + 1  # héllo wörld 日本語 🎉\n\tclass A: pass\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_text_tree(root, num_files=40):
    """A directory of small, distinct text files: enough for both splits to be non-empty."""
    for i in range(num_files):
        write(root / f"pkg{i % 3}" / f"mod{i}.py", f"# module {i}\n" + SAMPLE_TEXT * (i + 1))
    return root


@pytest.fixture(scope="module")
def bpe():
    texts = [SAMPLE_TEXT * 3, "the quick brown fox jumps over the lazy dog\n" * 20, "<eos> literal <bos>\n"]
    return BPETokenizer.train(texts, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_corpus()


# ---------------------------------------------------------------- tokenizers


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ((ids >= 0) & (ids < 256)).all()
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials_and_save_load(tmp_path):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    ids = np.concatenate([[tok.bos_id], tok.encode("abc"), [tok.eos_id, tok.pad_id]])
    assert tok.decode(ids) == "abc"
    assert tok.decode([0xFF]) == "\ufffd"
    tok.save(tmp_path)
    restored = load_tokenizer(tmp_path)
    assert isinstance(restored, ByteTokenizer) and restored.identity == tok.identity


def test_bpe_save_load_reproduces_ids_and_text(bpe, tmp_path):
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert 259 < bpe.vocab_size <= 400
    text = SAMPLE_TEXT + "the lazy dog <eos> \x00 ünïcode\r\n"
    bpe.save(tmp_path)
    assert {"tokenizer.json", "tokenizer_meta.json"} <= set(os.listdir(tmp_path))
    restored = load_tokenizer(tmp_path)
    assert isinstance(restored, BPETokenizer)
    assert restored.identity == bpe.identity and restored.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(restored.encode(text), bpe.encode(text))
    assert restored.decode(restored.encode(text)) == text
    assert bpe.eos_id not in bpe.encode("<eos>")  # a literal "<eos>" is text
    assert len(bpe.encode(SAMPLE_TEXT)) < len(SAMPLE_TEXT.encode())  # merges were learned


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_make_tokenizer_kinds_and_errors():
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    assert isinstance(make_tokenizer("bpe", [SAMPLE_TEXT * 5], vocab_size=300), BPETokenizer)
    with pytest.raises(ValueError, match=r"tokenizer: unknown kind 'wordpiece'.*'byte', 'bpe'"):
        make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="tokenizer: 'bpe' needs train_texts"):
        make_tokenizer("bpe")


def test_load_tokenizer_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer: no tokenizer_meta.json"):
        load_tokenizer(tmp_path)


def test_a_hugging_face_tokenizer_json_with_its_special_ids_is_restored_from_a_run(bpe, tmp_path):
    """A pretrained directory's bare tokenizer.json becomes an HFTokenizer (special ids from tokenizer_config.json,
    else config.json's, the first of a list); saved into a run, load_tokenizer restores it (kind "hf")."""
    pretrained = tmp_path / "pretrained"
    bpe.save(pretrained)
    (pretrained / "tokenizer_meta.json").unlink()  # as a Hugging Face checkpoint ships it
    (pretrained / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    tok = load_directory_tokenizer(pretrained, {"bos_token_id": [0, 7], "eos_token_id": 5})
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    text = "the lazy dog " + SAMPLE_TEXT
    np.testing.assert_array_equal(tok.encode(text), bpe.encode(text))
    tok.save(tmp_path / "run_tokenizer")
    restored = load_tokenizer(tmp_path / "run_tokenizer")
    assert isinstance(restored, HFTokenizer) and restored.identity == tok.identity
    assert (restored.bos_id, restored.eos_id, restored.pad_id) == (0, 1, None)
    assert restored.decode(restored.encode(text)) == text
    assert load_directory_tokenizer(tmp_path / "run_tokenizer").identity == tok.identity


# ---------------------------------------------------------------- corpora


def test_stdlib_corpus_is_deterministic_and_disjoint(stdlib):
    again = stdlib_corpus()
    assert again == stdlib
    train, val = set(stdlib.files("train")), set(stdlib.files("val"))
    assert train and val and not train & val
    assert 0.01 < len(val) / len(train | val) < 0.1
    assert stdlib.name.startswith("stdlib-py3.")
    relative = [os.path.relpath(p, stdlib.root).split(os.sep) for p in train | val]
    assert not any({"test", "site-packages"} & set(parts) for parts in relative)
    assert all(p.endswith(".py") for p in train | val)
    assert list(stdlib.files("train")) == sorted(stdlib.files("train"))


def test_stdlib_split_depends_only_on_relative_path(stdlib):
    bigger_val = stdlib_corpus(val_fraction=0.2)
    assert set(stdlib.files("val")) < set(bigger_val.files("val"))
    assert bigger_val.fingerprint != stdlib.fingerprint


def test_text_corpus_accepts_files_dirs_and_globs(tmp_path):
    tree = make_text_tree(tmp_path / "tree")
    write(tmp_path / "notes.txt", "some notes\n")
    write(tmp_path / "tree" / ".hidden" / "secret.py", "hidden\n")
    (tmp_path / "tree" / "blob.bin").write_bytes(b"\x00\x01binary")
    by_dir = text_corpus(str(tree))
    all_files = set(by_dir.files("train")) | set(by_dir.files("val"))
    assert len(all_files) == 40 and not any("secret" in p or "blob" in p for p in all_files)
    assert by_dir.files("train") and by_dir.files("val") and by_dir.within_file_val_fraction == 0
    by_glob = text_corpus(str(tmp_path / "tree" / "**" / "*.py"))
    assert by_glob.fingerprint == by_dir.fingerprint
    mixed = text_corpus([str(tree), str(tmp_path / "notes.txt"), str(tmp_path / "tree" / "pkg0")])
    assert len(set(mixed.files("train")) | set(mixed.files("val"))) == 41


def test_single_file_corpus_is_split_inside_the_file(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    corpus = text_corpus(str(write(tmp_path / "input.txt", text)), val_fraction=0.1)
    assert corpus.name == "input.txt" and corpus.within_file_val_fraction == 0.1
    train, val = list(corpus.iter_texts("train")), list(corpus.iter_texts("val"))
    assert train[0] + val[0] == text
    assert len(val[0]) == len(text) - int(len(text) * 0.9)


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    tree = make_text_tree(tmp_path / "tree", num_files=5)
    before = text_corpus(str(tree))
    assert text_corpus(str(tree)).fingerprint == before.fingerprint
    write(tree / "pkg0" / "mod0.py", "changed\n")
    assert text_corpus(str(tree)).fingerprint != before.fingerprint


def test_text_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data: '.*nothing\*\.txt' matched no text files; accepted: 'stdlib'"):
        text_corpus(str(tmp_path / "nothing*.txt"))
    with pytest.raises(ValueError, match="data: no sources given"):
        text_corpus([])
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "a.txt", "")
    with pytest.raises(ValueError, match="data: .* contain no text"):
        text_corpus(str(tmp_path / "empty"))
    corpus = text_corpus(str(write(tmp_path / "gone.txt", "soon gone\n")))
    os.remove(tmp_path / "gone.txt")
    with pytest.raises(ValueError, match="data: cannot read .*gone.txt"):
        list(corpus.iter_texts("train"))
    with pytest.raises(ValueError, match="split: 'test'"):
        corpus.files("test")


def test_text_is_read_as_utf8_with_replacement(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (text,) = text_corpus(str(tmp_path / "latin1.txt")).iter_texts("train")
    assert text.startswith("caf\ufffd")


# ---------------------------------------------------------------- token datasets


@pytest.fixture
def tree_dataset(tmp_path):
    corpus = text_corpus(str(make_text_tree(tmp_path / "tree")))
    return corpus, TokenDataset.build(corpus, ByteTokenizer(), tmp_path / "cache"), tmp_path / "cache"


def test_streaming_build_matches_in_memory_tokenization(tree_dataset):
    corpus, ds, cache = tree_dataset
    tok = ByteTokenizer()
    for split in ("train", "val"):
        texts = [_read(p) for p in corpus.files(split)]
        expected = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in texts])
        assert isinstance(ds.tokens[split], np.memmap) and ds.tokens[split].dtype == np.uint16
        np.testing.assert_array_equal(ds.tokens[split], expected)
        assert ds.num_tokens(split) == len(expected)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_cache_is_reused_keyed_and_leaves_no_temp_files(tree_dataset, bpe):
    corpus, ds, cache = tree_dataset
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and all(corpus.fingerprint[:16] in f and "-byte-" in f for f in files)
    mtimes = [os.path.getmtime(cache / f) for f in files]
    TokenDataset.build(corpus, ByteTokenizer(), cache)
    assert [os.path.getmtime(cache / f) for f in files] == mtimes
    TokenDataset.build(corpus, bpe, cache)
    assert len(os.listdir(cache)) == 4 and not any(f.endswith(".tmp") for f in os.listdir(cache))
    assert sum(bpe.identity in f for f in os.listdir(cache)) == 2


class FailingTokenizer(ByteTokenizer):
    identity = "failing"

    def __init__(self, fail_after):
        self.calls, self.fail_after = 0, fail_after

    def encode(self, text):
        self.calls += 1
        if self.calls > self.fail_after:
            raise KeyboardInterrupt
        return super().encode(text)


def test_interrupted_build_leaves_nothing_behind(tree_dataset):
    corpus, _, cache = tree_dataset
    with pytest.raises(KeyboardInterrupt):
        TokenDataset.build(corpus, FailingTokenizer(fail_after=3), cache)
    assert not any("failing" in f for f in os.listdir(cache))


class WideTokenizer(ByteTokenizer):
    vocab_size, identity = 70_000, "wide"


def test_large_vocab_uses_uint32(tree_dataset):
    corpus, _, cache = tree_dataset
    assert TokenDataset.build(corpus, WideTokenizer(), cache).tokens["train"].dtype == np.uint32


def test_batches_are_a_pure_function_of_seed_and_step(tree_dataset):
    _, ds, _ = tree_dataset
    x, y = ds.batch("train", step=7, batch_size=4, seq_len=32, seed=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == np.int32
    for a, b in zip((x, y), ds.batch("train", 7, 4, 32, 1)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(x, ds.batch("train", 8, 4, 32, 1)[0])
    assert not np.array_equal(x, ds.batch("train", 7, 4, 32, 2)[0])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_batch_windows_come_from_the_stream(tree_dataset):
    _, ds, _ = tree_dataset
    tokens = np.asarray(ds.tokens["val"]).astype(np.int32)
    x, y = ds.batch("val", 0, 8, 16, 0)
    for row_x, row_y in zip(x, y):
        window = np.concatenate([row_x, row_y[-1:]])
        starts = np.flatnonzero(tokens[: len(tokens) - 16] == window[0])
        assert any(np.array_equal(tokens[s : s + 17], window) for s in starts)


def test_eval_batches_are_consecutive_non_overlapping_windows(tree_dataset):
    _, ds, _ = tree_dataset
    tokens = np.asarray(ds.tokens["val"]).astype(np.int32)
    batches = list(ds.eval_batches("val", batch_size=4, seq_len=16))
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    assert len(xs) == (len(tokens) - 1) // 16
    np.testing.assert_array_equal(xs.reshape(-1), tokens[: xs.size])
    np.testing.assert_array_equal(ys.reshape(-1), tokens[1 : xs.size + 1])
    assert len(list(ds.eval_batches("val", 4, 16, max_batches=2))) == 2


def test_too_short_split_is_an_error(tree_dataset):
    _, ds, _ = tree_dataset
    seq_len = ds.num_tokens("val")
    with pytest.raises(ValueError, match="seq_len: the 'val' split has .* fewer than seq_len \\+ 1"):
        ds.batch("val", 0, 1, seq_len, 0)
    assert ds.batch("val", 0, 1, seq_len - 1, 0)[0].shape == (1, seq_len - 1)


def test_check_seq_len_names_the_first_short_split(tree_dataset):
    _, ds, _ = tree_dataset
    val_tokens = ds.num_tokens("val")
    ds.check_seq_len(val_tokens - 1)
    with pytest.raises(ValueError, match=f"the 'val' split has {val_tokens} tokens, fewer than seq_len \\+ 1"):
        ds.check_seq_len(val_tokens)
    ds.check_seq_len(val_tokens, ["train"])


def test_from_cache_reopens_a_built_dataset_without_the_corpus(tree_dataset, bpe):
    corpus, ds, cache = tree_dataset
    reopened = TokenDataset.from_cache(corpus.name, corpus.fingerprint, ByteTokenizer(), cache)
    for split in ("train", "val"):
        np.testing.assert_array_equal(reopened.tokens[split], ds.tokens[split])
    assert TokenDataset.from_cache(corpus.name, corpus.fingerprint, bpe, cache) is None
    assert TokenDataset.from_cache(corpus.name, "0" * 64, ByteTokenizer(), cache) is None


def test_unigram_entropy_matches_direct_count():
    tokens = np.array([0, 0, 1, 2, 2, 2, 2, 3], dtype=np.uint16)
    ds = TokenDataset({"train": tokens, "val": tokens}, ByteTokenizer())
    p = np.array([2, 1, 4, 1]) / 8
    assert unigram_entropy(ds, "train", chunk_size=3) == pytest.approx(-(p * np.log(p)).sum())


def test_load_text_dataset_from_stdlib_and_paths(tmp_path):
    ds = load_text_dataset("stdlib", ByteTokenizer(), tmp_path / "cache")
    assert ds.num_tokens("train") > 1_000_000 and ds.num_tokens("val") > 10_000
    assert 2.5 < unigram_entropy(ds, "val") < np.log(256)
    tree = make_text_tree(tmp_path / "tree", num_files=5)
    assert load_text_dataset([str(tree)], ByteTokenizer(), tmp_path / "cache").num_tokens("train") > 0


# ---------------------------------------------------------------- array datasets


def test_array_dataset_epochs_visit_every_example_once():
    inputs = np.arange(10 * 4).reshape(10, 4)
    ds = ArrayDataset({"train": (inputs, -inputs), "val": (inputs[:3], inputs[:3])}, vocab_size=64)
    rows = np.concatenate([ds.batch("train", step, 3, 4, seed=0)[0][:, 0] // 4 for step in range(10)])
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    assert not np.array_equal(rows[:10], rows[10:20])  # a fresh order each epoch
    x, y = ds.batch("train", 5, 3, 4, seed=0)
    np.testing.assert_array_equal(y, -x)
    np.testing.assert_array_equal(x, ds.batch("train", 5, 3, 4, seed=0)[0])
    assert x.dtype == np.int32


def test_array_dataset_eval_covers_all_and_checks_shapes():
    inputs, labels = mqar(10, 16, 2, 32)
    ds = ArrayDataset({"val": (inputs, labels)}, vocab_size=32)
    batches = list(ds.eval_batches("val", batch_size=4, seq_len=16))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)
    with pytest.raises(ValueError, match="seq_len: 8 differs"):
        ds.batch("val", 0, 2, 8)
    with pytest.raises(ValueError, match="split: this dataset has no 'train' split"):
        ds.batch("train", 0, 2, 16)
    with pytest.raises(ValueError, match=r"splits\['train'\]"):
        ArrayDataset({"train": (inputs, labels[:, :-1])}, vocab_size=32)


# ---------------------------------------------------------------- MQAR


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_invariants(random_non_queries):
    n, seq_len, kv, vocab = 200, 64, 8, 128
    inputs, labels = mqar(n, seq_len, kv, vocab, random_non_queries=random_non_queries, seed=3)
    assert inputs.shape == labels.shape == (n, seq_len) and inputs.dtype == labels.dtype == np.int32
    keys, values = inputs[:, 0 : 2 * kv : 2], inputs[:, 1 : 2 * kv : 2]
    assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
    assert all(len(set(row)) == kv for row in keys) and all(len(set(row)) == kv for row in values)
    assert ((labels != IGNORE_INDEX).sum(axis=1) == kv).all()
    assert (labels[:, : 2 * kv] == IGNORE_INDEX).all()
    for row in range(n):
        positions = np.flatnonzero(labels[row] != IGNORE_INDEX)
        assert ((positions - 2 * kv) % 2 == 0).all()
        pairs = dict(zip(keys[row], values[row]))
        assert sorted(inputs[row, positions]) == sorted(keys[row])
        assert all(labels[row, p] == pairs[inputs[row, p]] for p in positions)
        others = np.setdiff1d(np.arange(2 * kv, seq_len), positions)
        assert random_non_queries or (inputs[row, others] == 0).all()
    if random_non_queries:
        assert ((inputs >= 0) & (inputs < vocab)).all() and (inputs[:, 2 * kv :] != 0).mean() > 0.9


def test_mqar_is_deterministic_by_seed_and_favours_short_gaps():
    a, b, c = mqar(50, 128, 8, 256, seed=0), mqar(50, 128, 8, 256, seed=0), mqar(50, 128, 8, 256, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    gaps = (np.flatnonzero(a[1].reshape(-1) != IGNORE_INDEX) % 128 - 16) // 2
    assert (gaps < 56 // 2).mean() > 0.6  # the power law favours the first half of the 56 slots


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seq_len=63), "seq_len"),
        (dict(vocab_size=64), "vocab_size"),
        (dict(num_kv_pairs=17), "num_kv_pairs"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(num_examples=0), "num_examples"),
        (dict(power_a=0.0), "power_a"),
    ],
)
def test_mqar_argument_errors_name_the_field(kwargs, field):
    args = dict(num_examples=4, seq_len=64, num_kv_pairs=4, vocab_size=128) | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        mqar(**args)
