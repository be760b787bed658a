"""Far-token scoring (pose_megatron.evaluation.far_tokens) and its tool's input checks, without a model."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.far_tokens import evaluate_far_tokens, full_window, short_windows

REPO = Path(__file__).resolve().parents[2]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_far_token_tool_takes_no_lengths_and_checks_its_flags(capsys, tmp_path):
    tool = load_tool("eval_far_tokens")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # a model directory, never loaded here
    base = ["--hf-dir", str(tmp_path / "m"), "--data-path", "a", "b", "--output", str(tmp_path / "o.json")]
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
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")  # never loaded: the data fails first
    status = load_tool("eval_far_tokens").main([
        "--hf-dir", str(tmp_path / "no-model"), "--data-path", str(tmp_path / "d"),
        "--tokenizer-model", str(model), "--far-start", "512", "--far-end", "1024",
        "--output", str(tmp_path / "far.json")])
    assert status == 2
    assert "shorter than 1024 tokens" in capsys.readouterr().err
    assert not (tmp_path / "far.json").exists()
