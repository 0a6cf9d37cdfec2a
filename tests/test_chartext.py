"""Char-level testbed: TFDS-identical split, vocab, windows, and add-k n-gram tables vs hand counts."""
import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import chartext, ngram

SHARED_FILE = "/work/shared/data/tinyshakespeare.txt"
needs_file = pytest.mark.skipif(not os.path.exists(SHARED_FILE), reason="shared tinyshakespeare absent")

# --------------------------------------------------------------------------------------------
# N-gram tables against hand counts on "abab ba" (vocab ' ' < 'a' < 'b', V = 3).

TINY = "abab ba"
K = 0.5
# Every (context -> next char) count in TINY, written out by hand.
HAND_COUNTS = {
    1: {"": {"a": 3, "b": 3, " ": 1}},
    # pairs: ab ba ab "b " " b" ba
    2: {"a": {"b": 2}, "b": {"a": 2, " ": 1}, " ": {"b": 1}},
    # triples: aba bab "ab " "b b" " ba"
    3: {"ab": {"a": 1, " ": 1}, "ba": {"b": 1}, "b ": {"b": 1}, " b": {"a": 1}},
}
# The same tables smoothed by hand: (count + 1/2) / (total + 3/2), in vocab order ' ', 'a', 'b'.
HAND_PROBS = {
    1: {"": [1.5 / 8.5, 3.5 / 8.5, 3.5 / 8.5]},
    2: {"a": [0.5 / 3.5, 0.5 / 3.5, 2.5 / 3.5], "b": [1.5 / 4.5, 2.5 / 4.5, 0.5 / 4.5],
        " ": [0.5 / 2.5, 0.5 / 2.5, 1.5 / 2.5]},
    3: {"ab": [1.5 / 3.5, 1.5 / 3.5, 0.5 / 3.5], "ba": [0.5 / 2.5, 0.5 / 2.5, 1.5 / 2.5],
        "aa": [1 / 3, 1 / 3, 1 / 3], "  ": [1 / 3, 1 / 3, 1 / 3]},  # unseen contexts: uniform
}


def _tiny_model(order):
    vocab = chartext.Vocab.from_text(TINY)
    return vocab, ngram.NGramModel(order, K).fit(vocab.encode(TINY), vocab.size)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_counts_match_hand_counts(order):
    vocab, model = _tiny_model(order)
    assert vocab.chars == " ab"
    for ctx, nxt in HAND_COUNTS[order].items():
        expected = [nxt.get(c, 0) for c in vocab.chars]
        np.testing.assert_array_equal(model.context_counts(vocab.encode(ctx)), expected)
    assert model.counts.sum() == len(TINY) - order + 1
    assert model.keys.shape[0] == len(HAND_COUNTS[order])  # no context invented


@pytest.mark.parametrize("order", [1, 2, 3])
def test_smoothed_probs_match_hand(order):
    vocab, model = _tiny_model(order)
    table = model.table()
    for ctx, probs in HAND_PROBS[order].items():
        ids = vocab.encode(ctx)
        np.testing.assert_allclose(np.exp(model.log_probs(ids)), probs, rtol=1e-12)
        np.testing.assert_allclose(np.exp(ngram.ngram_log_probs(table, ids)), probs, rtol=1e-6)


def test_cross_entropy_and_top1_on_tiny_text():
    vocab, model = _tiny_model(2)
    ids = vocab.encode(TINY)
    # Targets b a b ' ' b a after contexts a b a b ' ' b (see HAND_PROBS[2]).
    p = [2.5 / 3.5, 2.5 / 4.5, 2.5 / 3.5, 1.5 / 4.5, 1.5 / 2.5, 2.5 / 4.5]
    assert model.cross_entropy(ids) == pytest.approx(-np.mean(np.log(p)), rel=1e-12)
    # argmax: after a -> b (right x2), after b -> a (right x2, wrong for ' '), after ' ' -> b (right).
    assert model.top1_accuracy(ids) == pytest.approx(5 / 6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probs_sum_to_one_for_every_context(order):
    text = "the cat sat on the mat; a bat sat."
    vocab = chartext.Vocab.from_text(text)
    model = ngram.NGramModel(order, 0.1).fit(vocab.encode(text), vocab.size)
    contexts = np.array(list(itertools.product(range(vocab.size), repeat=order - 1)),
                        np.int64).reshape(vocab.size ** (order - 1), order - 1)  # seen or not
    np.testing.assert_allclose(np.exp(model.log_probs(contexts)).sum(-1), 1.0, rtol=1e-12)
    lookup = jax.jit(ngram.ngram_log_probs)(model.table(), jnp.asarray(contexts))
    np.testing.assert_allclose(np.exp(lookup).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(lookup, model.log_probs(contexts), atol=1e-5)


def test_bad_model_arguments_are_one_line():
    for kwargs in ({"order": 0}, {"order": 2, "k": 0.0}):
        with pytest.raises(ValueError, match=r"^[^\n]*$"):
            ngram.NGramModel(**kwargs)
    with pytest.raises(ValueError, match="not fitted"):
        ngram.NGramModel(2).log_probs(np.zeros((1, 1), int))
    _, model = _tiny_model(3)
    with pytest.raises(ValueError, match="contexts of shape"):
        model.log_probs(np.zeros((4, 1), int))


# --------------------------------------------------------------------------------------------
# Split, vocab and windows.


def test_split_rule_is_tfds_90_5_5():
    parts = chartext.split_text("x" * 1000)
    assert [len(parts[s]) for s in chartext.SPLITS] == [900, 50, 50]
    parts = chartext.split_text("".join(map(chr, range(65, 65 + 31))))  # 31 chars: 27, then 4 -> 2 / 2
    assert [len(parts[s]) for s in chartext.SPLITS] == [27, 2, 2]
    assert "".join(parts[s] for s in chartext.SPLITS) == "".join(map(chr, range(65, 65 + 31)))


def test_vocab_roundtrip_and_unknown_char():
    vocab = chartext.Vocab.from_text("hello, world\n")
    ids = vocab.encode("hello\nworld")
    assert ids.dtype == np.int32 and vocab.decode(ids) == "hello\nworld"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        vocab.encode("hellz")


@needs_file
def test_shared_file_split_and_vocab():
    data = chartext.load_char_data(SHARED_FILE)
    assert (len(data.train), len(data.validation), len(data.test)) == (1_003_854, 55_770, 55_770)
    assert len(data.train) + len(data.validation) + len(data.test) == chartext.TINY_SHAKESPEARE_CHARS
    assert data.vocab.size == chartext.TINY_SHAKESPEARE_VOCAB == 65
    assert data.vocab.chars[:3] == "\n !" and data.vocab.chars[-1] == "z"
    assert data.vocab.decode(data.train[:14]) == "First Citizen:"
    with open(SHARED_FILE, encoding="utf-8") as f:
        assert data.vocab.decode(data.validation[:200]) == f.read()[1_003_854:1_004_054]


@pytest.mark.parametrize("use_jax", [True, False])
def test_sample_windows_targets_follow_contexts(use_jax):
    data = np.arange(100, 110, dtype=np.int32)  # distinct values: a window is identified by its start
    key = jax.random.PRNGKey(0) if use_jax else np.random.default_rng(0)
    contexts, targets = chartext.sample_windows(key, data, 2000, 3)
    contexts, targets = np.asarray(contexts), np.asarray(targets)
    assert contexts.shape == (2000, 3) and targets.shape == (2000,)
    np.testing.assert_array_equal(np.diff(contexts, axis=1), 1)  # consecutive characters
    np.testing.assert_array_equal(targets, contexts[:, -1] + 1)  # the char after the window
    assert set(contexts[:, 0].tolist()) == set(range(100, 107))  # all 7 windows, none past the end


def test_sample_windows_jits():
    data = jnp.arange(50)
    sample = jax.jit(chartext.sample_windows, static_argnames=("batch", "context"))
    contexts, targets = sample(jax.random.PRNGKey(1), data, batch=4, context=8)
    np.testing.assert_array_equal(targets, contexts[:, -1] + 1)


@pytest.mark.parametrize("stride", [1, 3])
def test_eval_windows_cover_every_target_once(stride):
    data, context = np.arange(23), 4
    batches = list(chartext.eval_windows(data, context, batch=5, stride=stride))
    contexts = np.concatenate([c for c, _ in batches])
    targets = np.concatenate([t for _, t in batches])
    np.testing.assert_array_equal(targets, data[context::stride])
    np.testing.assert_array_equal(contexts, targets[:, None] + np.arange(-context, 0))
    assert len(targets) == chartext.num_eval_windows(len(data), context, stride)
    assert all(len(t) == 5 for _, t in batches[:-1])


# --------------------------------------------------------------------------------------------
# The reference ladder (about 2 s) and the TFDS failure path.


@needs_file
def test_ladder_on_shared_file():
    data = chartext.load_char_data(SHARED_FILE)
    rows = ngram.ladder(data.train, data.validation, data.vocab.size)
    assert [r.order for r in rows] == [1, 2, 3, 4]
    nats = [r.nats for r in rows]
    assert all(a > b for a, b in zip(nats, nats[1:]))
    assert rows[1].top1 == pytest.approx(0.27, abs=0.02)  # issue 5: bigram ~27%
    assert rows[3].top1 == pytest.approx(0.47, abs=0.02)  # issue 5: 4-gram ~47%
    assert rows[3].bits == pytest.approx(rows[3].nats / math.log(2))


def test_tfds_failure_is_one_line(monkeypatch, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")

    def broken_load(*args, **kwargs):
        raise ConnectionError("Failed to resolve host\nTraceback (most recent call last): ...")

    monkeypatch.setattr(tfds, "load", broken_load)
    with pytest.raises(chartext.DataUnavailableError) as info:
        chartext.load_splits()
    message = str(info.value)
    assert "\n" not in message and "--text_file" in message and "ConnectionError" in message
    assert info.value.__suppress_context__  # `from None`: no chained traceback

    with pytest.raises(SystemExit) as exit_info:
        ngram.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_tfds_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)
    with pytest.raises(chartext.DataUnavailableError, match=r"^[^\n]*--text_file[^\n]*$"):
        chartext.load_tfds_splits()


def test_tfds_success_path_decodes_each_split(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    texts = {"train": "train text", "validation": "val", "test": "test!"}

    def fake_load(name, split, data_dir=None):
        assert name == "tiny_shakespeare"
        return [[{"text": texts[s].encode("utf-8")}] for s in split]

    monkeypatch.setattr(tfds, "load", fake_load)
    monkeypatch.setattr(tfds, "as_numpy", lambda ds: ds)
    assert chartext.load_splits() == texts


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors before anything is fitted or compiled.


def _one_line_error(cls, fn, *args, match=None, **kwargs) -> str:
    with pytest.raises(cls, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_bad_text_files(tmp_path):
    assert issubclass(chartext.TextFileError, ValueError) and issubclass(chartext.TextFileError,
                                                                         chartext.DataUnavailableError)
    missing = tmp_path / "missing.txt"
    msg = _one_line_error(chartext.TextFileError, chartext.validate_text_file, str(missing))
    assert msg == f"--text_file={missing} is invalid; no such file"
    _one_line_error(chartext.TextFileError, chartext.validate_text_file, str(tmp_path), match="not a regular file")
    _one_line_error(chartext.TextFileError, chartext.load_char_data, str(missing), match="no such file")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    _one_line_error(chartext.TextFileError, chartext.read_text_file, str(tmp_path / "latin1.txt"),
                    match="cannot be read: UnicodeDecodeError")
    for name, text in (("empty.txt", ""), ("one.txt", "aaaa")):
        (tmp_path / name).write_text(text)
        _one_line_error(chartext.TextFileError, chartext.read_text_file, str(tmp_path / name),
                        match="need >= 2 distinct")
    chartext.validate_text_file(str(tmp_path / "one.txt"))  # exists and is readable: fine


def test_text_shorter_than_one_context():
    chartext.validate_text(9, 8)
    msg = _one_line_error(ValueError, chartext.validate_text, 8, 8, "the validation split")
    assert msg == "context=8 is invalid; the validation split has 8 characters, need more than one context (>= 9)"
    for context in (-1, 2.5, True):
        _one_line_error(ValueError, chartext.validate_text, 100, context, match="context=")
    data = chartext.encode_splits(chartext.split_text("abcdefghij" * 3))  # 27 / 1 / 2 characters
    chartext.validate_splits(data, 4, splits=("train",))
    _one_line_error(ValueError, chartext.validate_splits, data, 4, match="the validation split has 1 characters")
    # eval_windows checks at the call, not when first iterated (it used to yield nothing).
    _one_line_error(ValueError, chartext.eval_windows, np.arange(4), 4, batch=2, match="evaluation text has 4")
    with pytest.raises(ValueError, match="are invalid for data of length 4"):
        chartext.sample_windows(np.random.default_rng(0), np.arange(4), 2, 4)


@pytest.mark.parametrize("k", [float("nan"), float("inf"), -0.1, 0.0, "0.1", True, None])
def test_bad_smoothing(k):
    _one_line_error(ValueError, ngram.validate_k, k, "smoothing", match="^smoothing=")
    _one_line_error(ValueError, ngram.NGramModel, 2, k, match="^k=")


def test_bad_orders_and_ladder_inputs():
    for order in (0, -1, 2.0, True):
        _one_line_error(ValueError, ngram.NGramModel, order, match="order=")
    # 65^11 > 2^63: the int64 context codes would overflow silently.
    ngram.validate_order(11, 65)
    _one_line_error(ValueError, ngram.validate_order, 12, 65, match="overflows int64")
    _one_line_error(ValueError, ngram.NGramModel(12).fit, np.arange(20) % 65, 65, match="overflows int64")
    _one_line_error(ValueError, ngram.validate_ladder, 100, 100, 65, (), match="orders is empty")
    _one_line_error(ValueError, ngram.validate_ladder, 100, 3, 65, (1, 2, 3, 4), match="3 evaluation characters")
    _one_line_error(ValueError, ngram.ladder, np.arange(3), np.arange(50) % 3, 3, (1, 4), match="3 training")


@pytest.mark.parametrize("flags,word", [(["--k=inf"], "k=inf"), (["--k_sweep=0.1,nan"], "k_sweep=nan"),
                                        (["--k=-1"], "k=-1"), (["--orders=0"], "orders"),
                                        (["--text_file=/nonexistent/x.txt"], "no such file"),
                                        (["--orders=1,2,30"], "order=30 is invalid for V=28"),
                                        (["--split=test", "--orders=1,9"], "evaluation characters")])
def test_ngram_main_bad_input_exits_2_with_one_line(flags, word, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 3)  # test split: 7 characters
    with pytest.raises(SystemExit) as e:
        ngram.main([f"--text_file={text}", *flags])
    assert e.value.code == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m envs.ngram: error: ") and word in err[0], err
    assert out.out == ""
