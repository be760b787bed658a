"""Preprocessing JSONL to .bin/.idx, the tokenizer wrappers, and the sample corpus builder."""

import dataclasses
import json
import logging
import os
import pickle
import shlex
import string
import textwrap
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from pose_megatron import corpus as corpus_module
from pose_megatron import preprocess as preprocess_module
from pose_megatron.corpus import SampleCorpusSettings, ensure_sample_corpus, is_heldout
from pose_megatron.preprocess import MalformedLineError, PreprocessConfig, preprocess_jsonl
from pose_megatron.tokenizer import build_tokenizer
from tool_modules import load_tool

REPO = Path(__file__).resolve().parents[2]
SOURCES = [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, shlex, string)]
TEXTS = [
    "def f(x):\n\treturn x  # tabs, two spaces\n",
    "  leading spaces, trailing newline\n\n",
    "unicode: déjà vu ☃ 日本語 \u00a0 and emoji 🐍",
    SOURCES[0][:3000],
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny sentencepiece model (the sample corpus recipe) trained on a few KB of Python."""
    root = tmp_path_factory.mktemp("sp")
    jsonl = root / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in SOURCES[:2]))
    model = root / "tiny.model"
    corpus_module.train_sentencepiece(str(jsonl), str(model), 512, 5000, 0)
    return str(model)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(SOURCES[:2], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer"
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return str(path)


def write_jsonl(path, lines):
    """Write raw lines (str are JSON-encoded objects or raw text, bytes written as is)."""
    with open(path, "wb") as stream:
        for line in lines:
            stream.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            stream.write(b"\n")
    return str(path)


def documents(texts, key="text"):
    return [json.dumps({key: t}) for t in texts]


def config(tmp_path, jsonl, model, **kwargs):
    settings = dict(
        input=jsonl,
        output_prefix=str(tmp_path / "out" / "data"),
        tokenizer_type="sentencepiece",
        tokenizer_model=model,
        progress=False,
    )
    settings.update(kwargs)
    return PreprocessConfig(**settings)


def files_under(path):
    return sorted(p.name for p in Path(path).iterdir()) if Path(path).exists() else []


# ---- round trip ----------------------------------------------------------------------------------


def test_round_trip_gives_back_the_text_and_workers_agree(tmp_path, sp_model):
    jsonl = write_jsonl(tmp_path / "in.jsonl", documents(TEXTS * 10))
    one = preprocess_jsonl(
        config(tmp_path / "one", jsonl, sp_model, prepend_bos=True, append_eod=True)
    )
    two = preprocess_jsonl(
        config(
            tmp_path / "two",
            jsonl,
            sp_model,
            prepend_bos=True,
            append_eod=True,
            workers=2,
            lines_per_task=3,
        )
    )
    tokenizer = build_tokenizer("sentencepiece", sp_model)
    prefix = one.output_prefixes["text"]
    assert prefix.endswith("data_text_document")
    dataset = IndexedDataset(prefix)
    assert len(dataset) == one.documents == 40 and dataset.index.dtype == numpy.uint16
    for i, text in enumerate(TEXTS * 10):
        ids = dataset[i]
        assert ids[0] == tokenizer.bos and ids[-1] == tokenizer.eod
        assert tokenizer.detokenize(ids[1:-1]) == text
    assert one.tokens == int(dataset.sequence_lengths.sum())
    for suffix in (".bin", ".idx"):  # several workers write byte-identical files in input order
        assert (
            Path(prefix + suffix).read_bytes()
            == Path(two.output_prefixes["text"] + suffix).read_bytes()
        )


def test_huggingface_tokenizer_round_trip(tmp_path, hf_dir):
    jsonl = write_jsonl(tmp_path / "in.jsonl", documents(TEXTS))
    stats = preprocess_jsonl(
        config(tmp_path, jsonl, hf_dir, tokenizer_type="huggingface", append_eod=True)
    )
    tokenizer = build_tokenizer("huggingface", hf_dir)
    dataset = IndexedDataset(stats.output_prefixes["text"])
    for i, text in enumerate(TEXTS):
        assert dataset[i][-1] == tokenizer.eod
        assert tokenizer.detokenize(dataset[i][:-1]) == text


def test_several_json_keys_write_aligned_pairs(tmp_path, sp_model):
    lines = [json.dumps({"title": f"doc {i}", "text": t}) for i, t in enumerate(TEXTS)]
    stats = preprocess_jsonl(
        config(
            tmp_path,
            write_jsonl(tmp_path / "in.jsonl", lines),
            sp_model,
            json_keys=("text", "title"),
        )
    )
    tokenizer = build_tokenizer("sentencepiece", sp_model)
    titles = IndexedDataset(stats.output_prefixes["title"])
    texts = IndexedDataset(stats.output_prefixes["text"])
    assert [tokenizer.detokenize(titles[i]) for i in range(len(TEXTS))] == [
        f"doc {i}" for i in range(4)
    ]
    assert tokenizer.detokenize(texts[2]) == TEXTS[2]


def test_tokenizers_pickle_by_path(sp_model, hf_dir):
    for tokenizer in (
        build_tokenizer("sentencepiece", sp_model),
        build_tokenizer("huggingface", hf_dir),
    ):
        clone = pickle.loads(pickle.dumps(tokenizer))
        assert clone.tokenize(TEXTS[2]) == tokenizer.tokenize(TEXTS[2])
        assert clone.unique_identifiers == tokenizer.unique_identifiers
        assert (clone.vocab_size, clone.eod, clone.bos) == (
            tokenizer.vocab_size,
            tokenizer.eod,
            tokenizer.bos,
        )


# ---- malformed lines -----------------------------------------------------------------------------

BAD_LINES = [
    ('{"text": "unterminated', "not valid JSON"),
    ('["a", "list"]', "expected a JSON object, got list"),
    ('{"body": "no text key"}', "missing key 'text'"),
    ('{"text": 42}', "key 'text' holds int, not a string"),
    (b'{"text": "bad utf-8 \xff\xfe"}', "not valid JSON"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_malformed_line_fails_with_its_line_number_and_writes_nothing(
    tmp_path, sp_model, line, reason
):
    lines = documents(TEXTS[:2]) + [""] + [line] + documents(TEXTS[2:])  # the bad line is line 4
    jsonl = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(MalformedLineError) as error:
        preprocess_jsonl(config(tmp_path, jsonl, sp_model))
    assert f"in.jsonl:4: {reason}" in str(error.value)
    assert "--skip-bad-lines" in str(error.value)
    assert files_under(tmp_path / "out") == []  # no pair, no temporaries


def test_skip_bad_lines_counts_and_reports_them(tmp_path, sp_model, caplog):
    lines = []
    for (bad, _), good in zip(BAD_LINES, documents(TEXTS + TEXTS[:1]), strict=True):
        lines += [good, bad]
    lines += ["   ", json.dumps({"text": ""})]  # a blank line is no document; empty text is skipped
    jsonl = write_jsonl(tmp_path / "in.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="pose_megatron.preprocess"):
        stats = preprocess_jsonl(config(tmp_path, jsonl, sp_model, skip_bad_lines=True))
    assert (stats.documents, stats.bad_lines, stats.empty_documents) == (5, 5, 1)
    assert all(f"in.jsonl:{n}" in caplog.text for n in (2, 4, 6, 8, 10))
    tokenizer = build_tokenizer("sentencepiece", sp_model)
    dataset = IndexedDataset(stats.output_prefixes["text"])
    assert [tokenizer.detokenize(dataset[i]) for i in range(len(dataset))] == TEXTS + TEXTS[:1]


# ---- atomic outputs ------------------------------------------------------------------------------


def test_outputs_appear_only_when_complete(tmp_path, sp_model, monkeypatch):
    jsonl = write_jsonl(tmp_path / "in.jsonl", documents(TEXTS))
    original_commit = preprocess_module._commit
    seen = []

    def checked_commit(temporary, final):
        # Before the rename: nothing at the final names, and the temporary pair is whole.
        assert not os.path.exists(final + ".bin") and not os.path.exists(final + ".idx")
        assert len(IndexedDataset(temporary)) == len(TEXTS)
        original_commit(temporary, final)
        seen.append(final)

    monkeypatch.setattr(preprocess_module, "_commit", checked_commit)
    stats = preprocess_jsonl(config(tmp_path, jsonl, sp_model))
    assert seen == [stats.output_prefixes["text"]]
    assert files_under(tmp_path / "out") == ["data_text_document.bin", "data_text_document.idx",
                                           "data_text_document.tokens.json"]


def test_failed_run_keeps_the_previous_pair(tmp_path, sp_model, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", documents(TEXTS))
    prefix = preprocess_jsonl(config(tmp_path, good, sp_model)).output_prefixes["text"]
    before = {s: Path(prefix + s).read_bytes() for s in (".bin", ".idx")}

    bad = write_jsonl(tmp_path / "bad.jsonl", documents(TEXTS) + ["{oops"])
    with pytest.raises(MalformedLineError, match="bad.jsonl:5"):
        preprocess_jsonl(config(tmp_path, bad, sp_model, overwrite=True))

    def crash(self, idx_path):
        raise OSError("disk full")

    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", crash)
    with pytest.raises(OSError, match="disk full"):
        preprocess_jsonl(config(tmp_path, good, sp_model, json_keys=("text",), overwrite=True))
    assert {s: Path(prefix + s).read_bytes() for s in (".bin", ".idx")} == before
    assert files_under(tmp_path / "out") == ["data_text_document.bin", "data_text_document.idx",
                                           "data_text_document.tokens.json"]


# ---- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(input="missing.jsonl"), FileNotFoundError, "missing.jsonl.*does not exist"),
        (
            dict(tokenizer_type="bpe"),
            ValueError,
            r"unknown tokenizer type 'bpe'.*huggingface.*sentencepiece",
        ),
        (dict(tokenizer_model="nope.model"), FileNotFoundError, "nope.model.*does not exist"),
        (dict(tokenizer_type="huggingface", tokenizer_model="no_dir"), FileNotFoundError, "no_dir"),
        (dict(workers=0), ValueError, "workers must be >= 1"),
        (dict(json_keys=("text", "text")), ValueError, "duplicates"),
        (dict(json_keys=()), ValueError, "json_keys must be non-empty"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, sp_model, change, error, message):
    jsonl = write_jsonl(tmp_path / "in.jsonl", documents(TEXTS))
    settings = config(tmp_path, jsonl, sp_model)
    for key, value in change.items():
        if key in ("input", "tokenizer_model"):
            value = str(tmp_path / value)
        settings = dataclasses.replace(settings, **{key: value})
    with pytest.raises(error, match=message):
        preprocess_jsonl(settings)
    assert not (tmp_path / "out").exists()


def test_preprocess_cli(tmp_path, sp_model, capsys):
    tool = load_tool("preprocess_data")
    jsonl = write_jsonl(tmp_path / "in.jsonl", documents(TEXTS) + ["{bad"])
    common = [
        "--input",
        jsonl,
        "--output-prefix",
        str(tmp_path / "cli"),
        "--tokenizer-model",
        sp_model,
        "--no-progress",
        "--log-level",
        "WARNING",
    ]
    assert tool.main(common + ["--tokenizer-type", "bpe"]) == 1
    assert "error: unknown tokenizer type 'bpe'" in capsys.readouterr().err
    assert tool.main(common + ["--tokenizer-type", "sentencepiece"]) == 1
    assert "in.jsonl:5: not valid JSON" in capsys.readouterr().err
    assert (
        tool.main(
            common + ["--tokenizer-type", "sentencepiece", "--skip-bad-lines", "--append-eod"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote 4 documents" in out and "1 malformed lines skipped" in out
    assert f"--data-path {tmp_path / 'cli'}_text_document" in out
    missing = (
        ["--input", str(tmp_path / "none.jsonl")]
        + common[2:]
        + ["--tokenizer-type", "sentencepiece"]
    )
    assert tool.main(missing) == 1
    assert "none.jsonl' does not exist" in capsys.readouterr().err


# ---- the sample corpus ---------------------------------------------------------------------------


@pytest.fixture
def fake_stdlib(tmp_path):
    """A small stand-in for the standard library: real module sources plus files to be ignored."""
    root = tmp_path / "stdlib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "__pycache__").mkdir()
    (root / "os.py").write_text(SOURCES[0])
    for i, source in enumerate(SOURCES * 3):
        (root / ("pkg" if i % 2 else "") / f"module_{i}.py").write_text(source[i * 500 :])
    (root / "pkg" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8
    (root / "pkg" / "empty.py").write_text("")
    (root / "site-packages" / "third_party.py").write_text("import nothing\n")
    (root / "__pycache__" / "cached.py").write_text("x = 1\n")
    return str(root)


TINY = SampleCorpusSettings(vocab_size=400, heldout_percent=30, max_training_sentences=2000)


def test_sample_corpus_builds_splits_tokenizer_and_data(tmp_path, fake_stdlib):
    corpus = ensure_sample_corpus(str(tmp_path / "cache"), TINY, workers=1, stdlib_dir=fake_stdlib)
    train = [json.loads(line) for line in open(corpus.train_jsonl)]
    valid = [json.loads(line) for line in open(corpus.valid_jsonl)]
    paths = sorted(d["path"] for d in train + valid)
    assert paths == sorted(
        ["os.py"] + [f"{'pkg/' if i % 2 else ''}module_{i}.py" for i in range(9)]
    )
    assert all(is_heldout(d["path"], 30) for d in valid) and not any(
        is_heldout(d["path"], 30) for d in train
    )
    assert train and valid
    tokenizer = build_tokenizer(corpus.tokenizer_type, corpus.tokenizer_model)
    for docs, prefix in ((train, corpus.train_prefix), (valid, corpus.valid_prefix)):
        data = IndexedDataset(prefix)
        assert len(data) == len(docs)
        for i, doc in enumerate(docs):
            assert data[i][0] == tokenizer.bos and data[i][-1] == tokenizer.eod
            assert tokenizer.detokenize(data[i][1:-1]) == doc["text"]
    manifest = json.load(open(corpus.manifest))
    assert (
        manifest["train"]["documents"] == len(train) and manifest["settings"]["vocab_size"] == 400
    )
    assert files_under(tmp_path) == ["cache", "stdlib"]  # no staging directory left behind


def test_sample_corpus_cache_is_reused_only_when_complete(tmp_path, fake_stdlib, monkeypatch):
    cache = str(tmp_path / "cache")
    first = ensure_sample_corpus(cache, TINY, workers=1, stdlib_dir=fake_stdlib)
    builds = []
    real_build = corpus_module.build_sample_corpus
    monkeypatch.setattr(
        corpus_module,
        "build_sample_corpus",
        lambda *a, **k: builds.append(1) or real_build(*a, **k),
    )
    assert ensure_sample_corpus(cache, TINY, workers=1, stdlib_dir=fake_stdlib) == first
    assert builds == []
    os.remove(first.train_prefix + ".idx")  # half a pair: incomplete
    ensure_sample_corpus(cache, TINY, workers=1, stdlib_dir=fake_stdlib)
    os.remove(first.manifest)  # no manifest: incomplete
    ensure_sample_corpus(cache, TINY, workers=1, stdlib_dir=fake_stdlib)
    ensure_sample_corpus(
        cache, dataclasses.replace(TINY, vocab_size=450), workers=1, stdlib_dir=fake_stdlib
    )
    assert builds == [1, 1, 1]
    assert IndexedDataset.exists(first.train_prefix)


def test_sample_corpus_failure_leaves_no_cache(tmp_path, fake_stdlib, monkeypatch):
    def crash(cfg):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(corpus_module, "preprocess_jsonl", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_sample_corpus(str(tmp_path / "cache"), TINY, workers=1, stdlib_dir=fake_stdlib)
    assert files_under(tmp_path) == ["stdlib"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(corpus_module.CACHE_DIR_ENV, raising=False)
    assert corpus_module.default_cache_dir() == str(REPO / ".cache" / "sample_corpus")
    monkeypatch.setenv(corpus_module.CACHE_DIR_ENV, str(tmp_path / "x"))
    assert corpus_module.default_cache_dir() == str(tmp_path / "x")
    assert os.path.isfile(os.path.join(corpus_module.find_stdlib_dir(), "os.py"))
