"""The evaluation tools against an independent transformers computation on one tiny LLaMA.

One random Hugging Face LLaMA (PoSE's revised YaRN exported as longrope; vocabulary 250, so the
Megatron copy pads its output layer to 256 rows) is saved as a Hugging Face directory and, through
copy_hf_into_pose, as a pose_megatron checkpoint. Both backends, the CLIs (perplexity, passkey, far
tokens), and the CLIs under torchrun at TP=2 and PP=2 must reproduce a hand-written transformers loop
over the same windows.
"""

import dataclasses
import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import ROPE_CASES, TINY, copy_hf_into_pose, hf_llama, pose_llama

from pose_megatron.evaluation import (
    ExtrapolationWarning,
    evaluate_perplexity,
    open_backend,
)
from tool_modules import load_tool

REPO = Path(__file__).resolve().parents[2]
CFG = dataclasses.replace(TINY, vocab_size=250)
SCALING = ROPE_CASES["yarn-revised"]  # factor 8 over the tiny model's 64 positions
TARGET = 512
BOS = 1
DOC_LENGTHS = (300, 130, 520)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, megatron_env):
    """(in-memory HF model, HF directory, Megatron checkpoint root, tokenizer path, docs)."""
    from pose_megatron.checkpoint.layout import RunConfig
    from pose_megatron.checkpoint.megatron_io import save_model_weights

    root = tmp_path_factory.mktemp("eval")
    hf = hf_llama(CFG, SCALING, seed=3)
    hf.save_pretrained(root / "hf")
    pose = pose_llama(CFG, SCALING).eval()
    copy_hf_into_pose(hf, pose, CFG)
    run_config = RunConfig(model=CFG, rope_scaling=SCALING, seq_length=64, target_length=TARGET)
    save_model_weights(root / "megatron", 100, pose, run_config)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, CFG.vocab_size, size=n) for n in DOC_LENGTHS]
    return {"hf": hf, "hf_dir": str(root / "hf"), "megatron": str(root / "megatron"),
            "tokenizer": train_tokenizer(root), "docs": docs, "root": root}


def train_tokenizer(root: Path) -> str:
    import sentencepiece

    from pose_megatron.evaluation.passkey import FILLER, QUESTION, TASK, key_line

    rng = random.Random(0)
    lines = [TASK, FILLER, QUESTION] * 20 + [key_line(rng.randint(1, 50000)) for _ in range(100)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=200, hard_vocab_limit=False,
        character_coverage=1.0, unk_id=0, bos_id=BOS, eos_id=2, pad_id=-1, split_digits=True,
        minloglevel=2,
    )
    (root / "tokenizer.model").write_bytes(model.getvalue())
    return str(root / "tokenizer.model")


_REFERENCE_CACHE = {}


def reference_perplexity(hf, docs, length, stride=None, truncate=False):
    """The paper's protocol written out directly against transformers, in float64 log-softmax.
    Returns (perplexity, tokens scored); memoised per model and settings (several tests ask)."""
    key = (id(hf), tuple(len(d) for d in docs), length, stride, truncate)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _reference_perplexity(hf, docs, length, stride, truncate)
    return _REFERENCE_CACHE[key]


def _reference_perplexity(hf, docs, length, stride, truncate):
    stride = stride or length - 1
    total, count = 0.0, 0
    for doc in docs:
        scored_until = 0
        for begin in range(0, len(doc), stride):
            end = min(begin + length - 1, len(doc))
            ids = torch.tensor([[BOS] + doc[begin:end].tolist()])
            with torch.no_grad():
                logits = hf(ids, attention_mask=torch.ones_like(ids)).logits[0, :-1]  # full window
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            nll = -logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            new = end - scored_until
            total += nll[-new:].sum().item()
            count += new
            scored_until = end
            if truncate or end == len(doc):
                break
    return math.exp(total / count), count


@pytest.mark.parametrize("kind", ["megatron", "hf"])
def test_perplexity_matches_transformers(tiny, kind):
    backend = open_backend(kind, tiny[kind if kind == "megatron" else "hf_dir"], dtype="fp32")
    docs, lengths = tiny["docs"], [48, 128, 512, 1024]
    with pytest.warns(ExtrapolationWarning, match=r"\[1024\]"):
        results = evaluate_perplexity(backend, docs, lengths, bos=BOS, stride=40, progress=False)
    truncated = evaluate_perplexity(backend, docs, [100], bos=BOS, truncate=True, progress=False)
    for result in results + truncated:
        expected, count = reference_perplexity(tiny["hf"], docs, result.length, 40, result.truncate)
        assert result.tokens_scored == count
        assert result.perplexity == pytest.approx(expected, rel=1e-4), result
    assert [r.extrapolated for r in results] == [False, False, False, True]
    assert truncated[0].tokens_scored == 3 * 99


def test_greedy_generation_matches_transformers(tiny):
    prompt = tiny["docs"][0][:40].tolist()
    ids = list(prompt)
    for _ in range(8):  # recompute the whole forward per token: no cache involved
        with torch.no_grad():
            t = torch.tensor([ids])
            ids.append(int(tiny["hf"](t, attention_mask=torch.ones_like(t)).logits[0, -1].argmax()))
    expected = ids[len(prompt):]
    for kind in ("megatron", "hf_dir"):
        backend = open_backend("megatron" if kind == "megatron" else "hf", tiny[kind], dtype="fp32")
        assert backend.greedy_generate(prompt, 8) == expected, kind
        stop = expected[2]
        assert backend.greedy_generate(prompt, 8, stop_ids=(stop,)) == expected[: expected.index(stop) + 1]


def write_jsonl(path: Path):
    """Three text documents: about 90, 20 and 160 words of filler words with numbers."""
    from pose_megatron.evaluation.passkey import FILLER

    rng = random.Random(1)
    words = FILLER.split()
    lines = [" ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(n)) for n in (90, 20, 160)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))


def test_cli_perplexity_and_passkey_both_backends(tiny, capsys):
    root = tiny["root"]
    write_jsonl(root / "docs.jsonl")
    out = root / "ppl.json"
    common = ["--load", tiny["megatron"], "--label", "mg", "--hf-dir", tiny["hf_dir"], "--label", "hf",
              "--tokenizer-model", tiny["tokenizer"], "--dtype", "fp32", "--no-progress"]
    status = load_tool("eval_perplexity").main(
        common + ["--data-path", str(root / "docs.jsonl"), "--lengths", "64,256", "--stride", "32",
                  "--min-doc-tokens", "100", "--output", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["data"]["documents"] == 2 and report["data"]["documents_skipped"] == 1
    mg, hf = report["results"]["mg"], report["results"]["hf"]
    for length in ("64", "256"):
        assert mg[length]["perplexity"] == pytest.approx(hf[length]["perplexity"], rel=1e-4)
        assert mg[length]["tokens_scored"] == hf[length]["tokens_scored"] == report["data"]["tokens"]
        assert mg[length]["documents"] == 2
    assert (root / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| mg " in printed and "| hf " in printed

    out = root / "passkey.json"
    status = load_tool("eval_passkey").main(
        common + ["--lengths", "200,400", "--trials", "2", "--depths", "0,1", "--output", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    mg, hf = report["results"]["mg"], report["results"]["hf"]
    assert len(mg["trials"]) == len(hf["trials"]) == 8
    slack = report["protocol"]["filler_sentence_tokens"]
    for a, b in zip(mg["trials"], hf["trials"]):
        assert a["length"] - slack <= a["prompt_tokens"] + 10 <= a["length"]  # room for 10 answer tokens
        assert (a["key"], a["answer"]) == (b["key"], b["answer"])  # same prompts, same greedy answers
    assert set(mg["by_depth"]["200"]) == {"0", "1"}
    assert (root / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert report["protocol"]["trials"] == 2
    assert report["skipped"]["by_length"] == {"200": 0, "400": 0}


def write_indexed_docs(prefix: Path, docs) -> None:
    """The documents as a .bin/.idx prefix, BOS first (as tools/preprocess_data.py --prepend-bos)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor([BOS] + doc.tolist(), dtype=torch.int32), [len(doc) + 1])
    builder.finalize(f"{prefix}.idx")


def reference_far_nll(hf, docs, start, end, short_window, stride):
    """Mean NLL of document[start:end] with full context and with short windows, written out
    against transformers: (full, short)."""

    def nll(doc, begin, stop, scored_from):
        ids = torch.tensor([[BOS] + doc[begin:stop].tolist()])
        with torch.no_grad():
            logits = hf(ids, attention_mask=torch.ones_like(ids)).logits[0, :-1]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        per_token = -logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]  # [i] predicts doc[begin + i]
        return per_token[scored_from - begin :].tolist()

    full, short = [], []
    for doc in docs:
        full += nll(doc, 0, end, start)
        for scored_from in range(start, end, stride):
            stop = min(scored_from + stride, end)
            short += nll(doc, stop - (short_window - 1), stop, scored_from)
    assert len(full) == len(short) == len(docs) * (end - start)
    return float(np.mean(full)), float(np.mean(short))


def test_cli_far_tokens_both_backends_match_transformers(tiny):
    root = tiny["root"]
    write_indexed_docs(root / "far_document", tiny["docs"])
    out = root / "far.json"
    status = load_tool("eval_far_tokens").main([
        "--load", tiny["megatron"], "--label", "mg", "--hf-dir", tiny["hf_dir"], "--label", "hf",
        "--tokenizer-model", tiny["tokenizer"], "--dtype", "fp32", "--no-progress",
        "--data-path", str(root / "far_document"), "--data-name", "corpus", "--far-start", "128",
        "--far-end", "256", "--short-window", "64", "--stride", "16", "--output", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    long_docs = [d for d in tiny["docs"] if len(d) >= 256]
    full, short = reference_far_nll(tiny["hf"], long_docs, 128, 256, 64, 16)
    for label in ("mg", "hf"):
        result = report["results"]["corpus"][label]
        assert result["documents"] == len(long_docs) == 2 and result["tokens_scored"] == 2 * 128
        assert result["full_nll"] == pytest.approx(full, rel=1e-5), label
        assert result["short_nll"] == pytest.approx(short, rel=1e-5), label
    assert report["protocol"] == {"start": 128, "end": 256, "short_window": 64, "stride": 16}
    assert set(report["checkpoints"]) == {"mg", "hf"}


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="two ranks need two GPUs when CUDA is present")
def test_clis_under_torchrun_match_transformers(tiny):
    """TP=2 (vocab-parallel cross entropy over a padded, split vocabulary), PP=2 (the pipeline
    schedule with several windows in flight; each generated token broadcast from the last stage to
    the first) and DP=2 (windows and trials split between replicas, then reduced) reproduce the
    reference perplexity and transformers' greedy answers."""
    root = tiny["root"]
    prefix = root / "docs_document"
    write_indexed_docs(prefix, tiny["docs"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__).with_name("eval_parallel_worker.py")), str(root), tiny["megatron"],
           str(prefix), tiny["tokenizer"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    expected = {n: reference_perplexity(tiny["hf"], tiny["docs"], n, 40) for n in (128, 512)}
    assert load_tool("eval_passkey").main(
        ["--hf-dir", tiny["hf_dir"], "--tokenizer-model", tiny["tokenizer"], "--lengths", "200,300",
         "--trials", "2", "--seed", "5", "--dtype", "fp32", "--no-progress", "--no-plot",
         "--output", str(root / "passkey_hf.json")]) == 0
    hf_answers = [(t["key"], t["answer"])
                  for t in json.loads((root / "passkey_hf.json").read_text())["results"]["hf"]["trials"]]
    assert len(hf_answers) == 4
    for layout in ("tp2_pp1", "tp1_pp2", "tp1_pp1"):
        results = json.loads((root / f"ppl_{layout}.json").read_text())["results"]["megatron"]
        for n, (ppl, count) in expected.items():
            assert results[str(n)]["perplexity"] == pytest.approx(ppl, rel=1e-4), layout
            assert results[str(n)]["tokens_scored"] == count
        trials = json.loads((root / f"passkey_{layout}.json").read_text())["results"]["megatron"]["trials"]
        assert [(t["key"], t["answer"]) for t in trials] == hf_answers, layout
