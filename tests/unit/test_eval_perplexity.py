"""Perplexity driver, evaluation documents, bad input and reports, on a model-free backend."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.documents import NoUsableDocumentsError, load_documents
from pose_megatron.evaluation.perplexity import (
    ExtrapolationWarning,
    evaluate_perplexity,
)
from pose_megatron.evaluation.report import perplexity_table, plot_perplexity
from tool_modules import load_tool

BOS, EOD = 1, 2
REPO = Path(__file__).resolve().parents[2]


def token_nll(tokens: np.ndarray) -> np.ndarray:
    """The fake model's NLL of a target: a function of the token only."""
    return 0.25 + (tokens % 7) * 0.5


class TableBackend(EvalBackend):
    """NLL depends only on the target token: the corpus perplexity is then the same at every
    length and stride, and equals exp(mean token_nll over all document tokens) exactly when every
    token is scored once."""

    def __init__(self, max_positions=None, group_size=1):
        super().__init__("table", "memory")
        self.max_positions, self.group_size = max_positions, group_size
        self.requests = []

    def _score(self, requests):
        self.requests.extend(requests)
        out = []
        for r in requests:
            assert r.input_ids[0] == BOS
            assert r.input_ids[1:].tolist() == r.targets[:-1].tolist()
            out.append(torch.from_numpy(token_nll(r.targets[r.first_target :])).double())
        return out


def docs_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, size=n) for n in lengths]


@pytest.mark.parametrize("stride,truncate", [(None, False), (5, False), (16, False), (None, True)])
def test_corpus_perplexity_is_token_weighted_over_every_token(stride, truncate):
    docs = docs_of([40, 97, 33, 64])
    backend = TableBackend(group_size=3)
    results = evaluate_perplexity(backend, docs, [8, 33], bos=BOS, stride=stride, truncate=truncate,
                                  progress=False)
    for r in results:
        kept = [d[: r.length - 1] for d in docs] if truncate else docs
        expected = np.concatenate([token_nll(d) for d in kept])
        assert r.tokens_scored == len(expected)
        assert r.perplexity == pytest.approx(math.exp(expected.mean()), rel=1e-12)
        assert r.documents == 4
        assert r.stride == min(stride or r.length - 1, r.length - 1)
    # Only windows of one length share a score() call.
    assert max(len(r.input_ids) for r in backend.requests) <= 32


def test_lengths_beyond_the_model_warn_and_run():
    backend = TableBackend(max_positions=16)
    with pytest.warns(ExtrapolationWarning, match=r"\[32\] exceed the model's 16 positions"):
        results = evaluate_perplexity(backend, docs_of([50]), [16, 32], bos=BOS, progress=False)
    assert [r.extrapolated for r in results] == [False, True]
    assert all(math.isfinite(r.perplexity) for r in results)
    table = perplexity_table({"m": {r.length: r.to_json() for r in results}}, [16, 32])
    assert "*" in table and "extrapolation" in table


def write_indexed(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def test_indexed_documents_skip_short_ones_and_strip_markers(tmp_path):
    raw = [[BOS] + list(range(10, 10 + n)) + [EOD] for n in (5, 30, 12, 40, 31, 50)]
    write_indexed(str(tmp_path / "d"), raw)
    found = load_documents(str(tmp_path / "d"), min_tokens=30, num_docs=3, bos=BOS, eod=EOD)
    assert [len(d) for d in found.documents] == [30, 40, 31]
    assert found.documents[0].tolist() == list(range(10, 40))  # BOS and EOD removed
    assert found.skipped == 2  # 5 and 12 tokens; reading stopped after the third usable one
    assert found.summary()["documents_skipped"] == 2


def test_jsonl_documents_are_tokenized(tmp_path):
    class Bytes:
        bos, eod = 1, 2

        def tokenize(self, text):
            return [3 + b for b in text.encode()]

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["short", "x" * 40, "y" * 25]) + "\n")
    found = load_documents(str(path), min_tokens=20, tokenizer=Bytes())
    assert [len(d) for d in found.documents] == [40, 25] and found.skipped == 1
    with pytest.raises(ValueError, match="tokenizer"):
        load_documents(str(path), min_tokens=20)


def test_no_usable_document_is_a_clear_error(tmp_path):
    write_indexed(str(tmp_path / "d"), [list(range(3, 13)), list(range(3, 20))])
    with pytest.raises(NoUsableDocumentsError, match=r"all 2 documents are shorter than 64 tokens \(the longest has 17\)"):
        load_documents(str(tmp_path / "d"), min_tokens=64)
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        load_documents(str(tmp_path / "missing"), min_tokens=1)


def test_cli_fails_on_data_before_loading_any_model(tmp_path, capsys):
    """The model directory (config.json only, no weights) is never loaded: the data error comes first."""
    eval_perplexity = load_tool("eval_perplexity")
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")
    write_indexed(str(tmp_path / "d"), [list(range(3, 40))])
    status = eval_perplexity.main([
        "--hf-dir", str(tmp_path / "no-model"), "--data-path", str(tmp_path / "d"), "--bos-id", "1",
        "--lengths", "128,256", "--output", str(tmp_path / "out.json"), "--no-progress",
    ])
    assert status == 2
    err = capsys.readouterr().err
    assert "no usable document" in err and "shorter than 256 tokens" in err
    assert not (tmp_path / "out.json").exists()


def test_perplexity_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    results = {"a": {1024: {"perplexity": 8.0}, 2048: {"perplexity": 7.0}},
               "b": {1024: {"perplexity": 9.0}, 2048: {"perplexity": 1200.0}}}
    path = plot_perplexity(results, str(tmp_path / "p.png"))
    assert path and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    table = perplexity_table(results, [1024, 2048])
    assert table.splitlines()[0].split("|")[2].strip() == "1024"
    assert "1.2e+03" in table
