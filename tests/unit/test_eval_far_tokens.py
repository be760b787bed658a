"""Far-token scoring (pose_megatron.evaluation.far_tokens) and its tool's input checks, without a model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.far_tokens import evaluate_far_tokens, full_window, short_windows
from tool_modules import load_tool

REPO = Path(__file__).resolve().parents[2]


def test_short_windows_score_the_range_once_with_bounded_context():
    start, end, window, stride = 1024, 2048, 256, 32
    windows = short_windows(start, end, window, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(start, end))
    for w in windows:
        assert w.num_tokens == window  # BOS + window - 1 document tokens
        assert w.score_from - w.start >= window - 1 - stride  # least context of a scored token
    full = full_window(start, end)
    assert (full.start, full.score_from, full.end) == (0, start, end)
    with pytest.raises(ValueError):
        short_windows(start, end, window, window)
    with pytest.raises(ValueError, match="without full context"):
        short_windows(100, end, window, stride)


class _ContextBackend(EvalBackend):
    """NLL of a token = 1 + 1 / (context tokens it sees): more context, lower loss."""

    def __init__(self, group_size=1, dp_rank=0, dp_size=1):
        super().__init__("fake", "none")
        self.group_size, self.dp_rank, self.dp_size = group_size, dp_rank, dp_size
        self.calls = []

    def _score(self, requests):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            context = np.arange(r.first_target, len(r.targets)) + 1
            out.append(torch.as_tensor(1.0 + 1.0 / context, dtype=torch.float64))
        return out


def test_far_tokens_compares_full_and_short_context_on_the_same_tokens():
    docs = [np.arange(600) % 50, np.arange(700) % 40]
    backend = _ContextBackend()
    result = evaluate_far_tokens(backend, docs, bos=1, start=256, end=512, short_window=64, stride=16)
    assert result.tokens_scored == 2 * 256 and result.documents == 2
    full = np.mean(1 + 1 / (np.arange(256, 512) + 1))
    assert math.isclose(result.full_nll, full, rel_tol=1e-12)
    assert result.short_nll > result.full_nll
    assert result.to_json()["ratio"] < 1
    with pytest.raises(ValueError):
        evaluate_far_tokens(backend, [np.arange(100)], bos=1, start=256, end=512, short_window=64, stride=16)


def test_far_tokens_groups_windows_and_checks_the_replica_sums():
    """Several short windows share a score() call; a replica that scores only its share of the
    windows, without the other replicas' sums, is caught instead of reported."""
    docs = [np.arange(600) % 50]
    grouped = _ContextBackend(group_size=4)
    result = evaluate_far_tokens(grouped, docs, bos=1, start=256, end=512, short_window=64, stride=16)
    assert grouped.calls == [1] + [4] * 4  # one full window, then 16 short windows four at a time
    single = evaluate_far_tokens(_ContextBackend(), docs, bos=1, start=256, end=512, short_window=64, stride=16)
    assert result.short_nll == pytest.approx(single.short_nll, rel=1e-12)
    lonely = _ContextBackend(dp_rank=0, dp_size=2)  # all_reduce_sum without a process group adds nothing
    with pytest.raises(RuntimeError, match="scored 256 tokens over all ranks, expected 512"):
        evaluate_far_tokens(lonely, docs + docs, bos=1, start=256, end=512, short_window=64, stride=16)


def _model_dir(tmp_path):
    """What the tools' flag check asks of an --hf-dir (a config.json); nothing is loaded."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return str(tmp_path / "m")


def test_far_token_tool_takes_no_lengths_and_checks_its_flags(tmp_path, capsys):
    tool = load_tool("eval_far_tokens")
    base = ["--hf-dir", _model_dir(tmp_path), "--data-path", "a", "b", "--output", str(tmp_path / "o.json")]
    args = tool.parse_args(base)
    assert args.data_name == ["a", "b"] and not hasattr(args, "lengths")
    for extra, message in ((["--lengths", "128"], "unrecognized arguments: --lengths"),
                           (["--data-name", "x"], "one --data-name per --data-path"),
                           (["--far-start", "512", "--far-end", "512"], "--far-start < --far-end")):
        with pytest.raises(SystemExit):
            tool.parse_args(base + extra)
        assert message in capsys.readouterr().err


def test_far_token_tool_fails_on_data_before_loading_any_model(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{tmp_path / 'd'}.bin", dtype=np.int32)
    builder.add_document(torch.arange(3, 300, dtype=torch.int32), [297])
    builder.finalize(f"{tmp_path / 'd'}.idx")
    sp = pytest.importorskip("sentencepiece")
    model = tmp_path / "tok.model"
    import io

    stream = io.BytesIO()
    sp.SentencePieceTrainer.train(sentence_iterator=iter(["far tokens need long documents"] * 50),
                                  model_writer=stream, vocab_size=30, hard_vocab_limit=False,
                                  bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    model.write_bytes(stream.getvalue())
    status = load_tool("eval_far_tokens").main([  # the model is never loaded: the data fails first
        "--hf-dir", _model_dir(tmp_path), "--data-path", str(tmp_path / "d"),
        "--tokenizer-model", str(model), "--far-start", "512", "--far-end", "1024",
        "--output", str(tmp_path / "far.json")])
    assert status == 2
    assert "shorter than 1024 tokens" in capsys.readouterr().err
    assert not (tmp_path / "far.json").exists()


def test_marked_tokens_only_are_scored_and_windows_without_marks_are_not_run():
    docs = [np.arange(600) % 50, np.arange(700) % 40]
    masks = [np.zeros(600, bool), np.zeros(700, bool)]
    masks[0][[260, 261, 300, 100]] = True  # 100 lies before the far range: not scored
    masks[1][[511, 520]] = True  # 520 lies beyond it
    backend = _ContextBackend()
    result = evaluate_far_tokens(backend, docs, bos=1, start=256, end=512, short_window=64, stride=16, masks=masks)
    scored = np.array([260, 261, 300, 511])
    assert result.tokens_scored == 4 and result.marked_only and result.documents == 2
    assert math.isclose(result.full_nll, np.mean(1 + 1 / (scored + 1)), rel_tol=1e-12)
    # Short windows end at a stride boundary: a marked token at p sees 63 - (stride - 1 - (p - 256) % 16)
    # tokens... computed from the windows themselves, as the tool would:
    windows = short_windows(256, 512, 64, 16)
    context = [next(p - w.start + 1 for w in windows if w.score_from <= p < w.end) for p in scored]
    assert math.isclose(result.short_nll, np.mean(1 + 1 / np.asarray(context)), rel_tol=1e-12)
    # Two full windows, and only the short windows holding a mark: 256..271, 288..303, 496..511.
    assert backend.calls == [1, 1, 1, 1, 1]
    unmarked = evaluate_far_tokens(_ContextBackend(), docs, bos=1, start=256, end=512, short_window=64, stride=16)
    assert not unmarked.marked_only and unmarked.tokens_scored == 512
    with pytest.raises(ValueError, match="mark no token in positions 256..511"):
        evaluate_far_tokens(backend, docs, bos=1, start=256, end=512, short_window=64, stride=16,
                            masks=[np.zeros(600, bool), np.zeros(700, bool)])
    with pytest.raises(ValueError, match="shape"):
        evaluate_far_tokens(backend, docs, bos=1, start=256, end=512, short_window=64, stride=16,
                            masks=[np.zeros(10, bool), np.zeros(700, bool)])


def test_score_spans_are_matched_to_source_documents_and_checked(tmp_path):
    """Line i of a span file belongs to source document i, also when shorter documents before it
    were skipped by the evaluation."""
    from pose_megatron.evaluation.documents import load_documents
    from pose_megatron.evaluation.far_tokens import masks_from_spans, read_score_spans

    class Words:
        bos, eod, vocab_size = 1, 2, 1000

        def tokenize(self, text):
            return [3 + int(w) for w in text.split()]

    data = tmp_path / "docs.jsonl"
    lengths = [5, 40, 3, 30]
    data.write_text("".join(json.dumps({"text": " ".join(["7"] * n)}) + "\n" for n in lengths))
    docs = load_documents(str(data), min_tokens=20, tokenizer=Words())
    assert docs.indices == [1, 3]
    spans = tmp_path / "spans.jsonl"
    spans.write_text("\n".join(json.dumps({"spans": s}) for s in ([[0, 1]], [[2, 4], [10, 11]], [], [[29, 30]])) + "\n")
    masks = masks_from_spans(read_score_spans(str(spans)), docs, str(spans))
    assert np.flatnonzero(masks[0]).tolist() == [2, 3, 10] and np.flatnonzero(masks[1]).tolist() == [29]

    spans.write_text(json.dumps({"spans": [[0, 1]]}) + "\n" + json.dumps({"spans": [[0, 41]]}) + "\n")
    with pytest.raises(ValueError, match=r"spans.jsonl:2: span \[0, 41\) runs past the document's 40 tokens"):
        masks_from_spans(read_score_spans(str(spans)), docs, str(spans))
    spans.write_text(json.dumps({"spans": [[0, 1]]}) + "\n" + json.dumps({"spans": [[0, 40]]}) + "\n")
    with pytest.raises(ValueError, match="has 2 lines, but document 3"):
        masks_from_spans(read_score_spans(str(spans)), load_documents(str(data), min_tokens=30, tokenizer=Words()),
                         str(spans))
    spans.write_text(json.dumps({"spans": [[4, 4]]}) + "\n")
    with pytest.raises(ValueError, match=":1: spans need 0 <= first < end"):
        read_score_spans(str(spans))
    spans.write_text('{"span": []}\n')
    with pytest.raises(ValueError, match=r':1: expected \{"spans"'):
        read_score_spans(str(spans))


def test_far_token_tool_checks_its_score_span_flags(tmp_path, capsys):
    tool = load_tool("eval_far_tokens")
    spans = tmp_path / "s.jsonl"
    spans.write_text('{"spans": []}\n')
    base = ["--hf-dir", _model_dir(tmp_path), "--data-path", "a", "b", "--data-name", "corpus", "synthetic",
            "--output", str(tmp_path / "o.json")]
    assert tool.parse_args(base + ["--score-spans", f"synthetic={spans}"]).score_spans == {"synthetic": str(spans)}
    assert tool.parse_args(base).score_spans == {}
    for extra, message in ((["--score-spans", str(spans)], "write NAME=FILE.jsonl"),
                           (["--score-spans", f"other={spans}"], "no data set is named 'other'"),
                           (["--score-spans", "corpus=missing.jsonl"], "missing.jsonl does not exist")):
        with pytest.raises(SystemExit):
            tool.parse_args(base + extra)
        assert message in capsys.readouterr().err
