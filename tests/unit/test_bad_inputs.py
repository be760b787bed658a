"""Bad input is refused before any work, with one line naming the problem and the fix; nothing a
user had is lost. In-process cases (flags, data files, preprocessing); process-level and signal
cases are in tests/distributed/test_faults.py."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from private_mounts import run_with_tmpfs

from pose_megatron import data_checks
from pose_megatron.checkpoint.layout import RunConfig, save_run_config, write_tracker
from pose_megatron.data_checks import DataError
from pose_megatron.loader import build_pose_datasets
from pose_megatron.positions import PoseSampling
from pose_megatron.preprocess import PreprocessConfig, preprocess_jsonl
from pose_megatron.presets import get_preset
from pose_megatron.rope import RopeScaling
from pose_megatron.train.arguments import parse_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus():
    from pose_megatron.corpus import ensure_sample_corpus

    return ensure_sample_corpus()


@pytest.fixture
def base(corpus):
    return ["--model", "tiny", "--seq-length", "64", "--data-path", corpus.train_prefix,
            "--tokenizer-model", corpus.tokenizer_model]


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("process group"))


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args([str(a) for a in argv], world_size=1)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


# ---- --load and --save ---------------------------------------------------------------------------


def fake_checkpoint(root: Path, model=None) -> Path:
    """A save root whose tracker names a release directory with a pose_config.json (enough for
    the parser, which reads only the stored configuration)."""
    release = root / "release"
    release.mkdir(parents=True)
    (release / "metadata.json").write_text("{}")
    save_run_config(release, RunConfig(model=model or get_preset("tiny", vocab_size=8192),
                                       rope_scaling=RopeScaling()))
    write_tracker(root, "release")
    return root


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("hf", "is a Hugging Face model directory, not a Megatron checkpoint; convert it first"),
    ("interrupted", "holds only an interrupted save or conversion (.release.incomplete)"),
    ("other", "holds no checkpoint"),
])
def test_load_that_holds_no_checkpoint_is_an_error(base, tmp_path, capsys, layout, message):
    load = tmp_path / "load"
    if layout == "hf":
        load.mkdir()
        (load / "config.json").write_text("{}")
        (load / "model.safetensors").write_bytes(b"")
    elif layout == "interrupted":
        (load / ".release.incomplete").mkdir(parents=True)
    elif layout == "other":
        load.mkdir()
        (load / "notes.txt").write_text("x")
    for extra in ([], ["--finetune"]):
        assert message in error_of(base + ["--load", load] + extra, capsys)


def test_job_chaining_first_submission_starts_fresh(base, tmp_path, capsys):
    chained = tmp_path / "run"
    assert parse_args(base + ["--load", str(chained), "--save", str(chained)], world_size=1).stored is None
    chained.mkdir()
    assert parse_args(base + ["--load", str(chained), "--save", str(chained)], world_size=1).stored is None
    # --finetune wants weights: an empty directory is then an error, not random initialisation.
    assert "holds no checkpoint" in error_of(base + ["--load", chained, "--save", chained, "--finetune"], capsys)


def test_save_holding_another_runs_checkpoint_needs_overwrite_save(base, tmp_path, capsys):
    other = fake_checkpoint(tmp_path / "other")
    line = error_of(base + ["--save", other], capsys)
    assert "already holds a checkpoint that --load does not name" in line and "--overwrite-save" in line
    assert parse_args(base + ["--save", str(other), "--overwrite-save"], world_size=1).training.overwrite_save


def test_architecture_flags_cannot_contradict_the_checkpoint(base, tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    line = error_of(base + ["--load", ckpt, "--num-layers", "3"], capsys)
    assert "--num-layers 3 contradicts the checkpoint's 2" in line and "drop the flag" in line


# ---- flag values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
    (["--eval-interval", "0"], "--eval-interval must be >= 1, got 0"),
    (["--save-interval", "-1"], "--save-interval must be >= 1, got -1"),
    (["--pose-target-length", "512", "--pose-num-chunks", "1"], "num_chunks 1 cannot skip positions"),
    (["--split", "100,0,0", "--eval-iters", "2"], "leaves the validation split empty"),
    (["--split", "a,b"], "--split 'a,b' must be up to three non-negative shares"),
])
def test_bad_values_are_refused_naming_the_flag(base, capsys, extra, message):
    assert message in error_of(base + extra, capsys)


def test_negative_blend_weight_is_refused(corpus, capsys):
    line = error_of(["--seq-length", "64", "--tokenizer-model", corpus.tokenizer_model, "--data-path",
                     "-0.5", corpus.train_prefix, "1.5", corpus.valid_prefix], capsys)
    assert "blend weights must be >= 0" in line


def test_tokenizer_that_is_a_directory_or_corrupt(base, tmp_path, capsys):
    assert "is not a file" in error_of(base + ["--tokenizer-model", tmp_path], capsys)
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a sentencepiece model")
    assert "cannot read" in error_of(base + ["--tokenizer-model", broken], capsys)


# ---- data files ----------------------------------------------------------------------------------


class Tokenizer:
    vocab_size, eod, bos = 100, 0, 1
    unique_identifiers = {"class": "Tokenizer"}


def write_prefix(path: Path, documents) -> str:
    builder = IndexedDatasetBuilder(f"{path}.bin", dtype=numpy.int32)
    for doc in documents:
        builder.add_document(numpy.asarray(doc, dtype=numpy.int32), [len(doc)])
    builder.finalize(f"{path}.idx")
    return str(path)


def build(prefix, tmp_path, **kwargs):
    return build_pose_datasets([prefix], None, "100,0,0", [None, None, None], 1, Tokenizer(),
                               PoseSampling(8, 32), path_to_cache=str(tmp_path / "cache"), **kwargs)


def test_truncated_bin_is_found_at_start(tmp_path):
    prefix = write_prefix(tmp_path / "d", [list(range(2, 50))] * 4)
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"d\.bin is truncated: .* bytes, but its index needs"):
        build(prefix, tmp_path)


def test_empty_dataset_is_named(tmp_path):
    prefix = write_prefix(tmp_path / "empty", [])
    with pytest.raises(DataError, match="holds no documents"):
        build(prefix, tmp_path)


def test_token_ids_beyond_the_vocabulary_are_found_by_the_scan(tmp_path):
    prefix = write_prefix(tmp_path / "d", [list(range(2, 50)), [5] * 30 + [150] + [5] * 30])
    with pytest.raises(DataError, match=r"holds token id 150, but the tokenizer has 100 tokens"):
        build(prefix, tmp_path)
    # The scan was cached on the files' sizes and mtimes; a rewrite invalidates it.
    assert json.loads(Path(tmp_path / "cache" / "d.tokens.json").read_text())["max_token"] == 150
    write_prefix(tmp_path / "d", [list(range(2, 50)), [5] * 61])
    build(prefix, tmp_path)  # the stale cache (150) is not believed: a new scan finds the data clean
    assert json.loads(Path(tmp_path / "cache" / "d.tokens.json").read_text())["max_token"] == 49


def test_a_matching_sidecar_is_read_instead_of_a_scan(tmp_path, monkeypatch):
    prefix = write_prefix(tmp_path / "d", [list(range(2, 50))] * 2)
    data_checks.write_sidecar(prefix, 150, 2, {"source": "test"})  # what preprocessing would write
    monkeypatch.setattr(data_checks, "SCAN_LIMIT_BYTES", 0)  # no scan: only the sidecar can say 150
    with pytest.raises(DataError, match=r"holds token id 150, but the tokenizer has 100 tokens"):
        build(prefix, tmp_path)


def test_token_ids_of_unscanned_data_are_checked_per_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(data_checks, "SCAN_LIMIT_BYTES", 0)  # as for a corpus too large to scan
    prefix = write_prefix(tmp_path / "d", [[150] + [5] * 40])  # token 0 is in every sample
    train, _, _ = build(prefix, tmp_path, min_doc_length=1)
    with pytest.raises(DataError, match=r"d: document 0 holds token id 150"):
        for i in range(len(train)):
            train[i]


def test_a_rebuilt_prefix_invalidates_the_index_cache(tmp_path):
    prefix = write_prefix(tmp_path / "d", [list(range(2, 60))] * 3)
    first, _, _ = build(prefix, tmp_path)
    write_prefix(tmp_path / "d", [list(range(2, 90))] * 5)  # same prefix, other documents
    second, _, _ = build(prefix, tmp_path)
    assert len(second) != len(first)
    assert int(second.sample_index[:, 0].max()) == 4  # windows of all five new documents


# ---- preprocessing -------------------------------------------------------------------------------


def preprocess(tmp_path, corpus, lines, **kwargs):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(line + "\n" for line in lines))
    cfg = PreprocessConfig(input=str(jsonl), output_prefix=str(tmp_path / "out" / "data"),
                           tokenizer_type="sentencepiece", tokenizer_model=corpus.tokenizer_model,
                           progress=False, **kwargs)
    return preprocess_jsonl(cfg)


def test_preprocessing_refuses_an_existing_prefix_unless_overwrite(tmp_path, corpus):
    preprocess(tmp_path, corpus, [json.dumps({"text": "print(1)"})])
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        preprocess(tmp_path, corpus, [json.dumps({"text": "print(2)"})])
    assert preprocess(tmp_path, corpus, [json.dumps({"text": "x"})] * 2, overwrite=True).documents == 2


def test_preprocessing_with_no_documents_is_an_error_and_writes_nothing(tmp_path, corpus):
    with pytest.raises(ValueError, match="gave no documents"):
        preprocess(tmp_path, corpus, [json.dumps({"text": ""}), "{bad"], skip_bad_lines=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, corpus):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / f".data_text_document.tmp-{dead.pid}.bin"
    stale.write_bytes(b"x" * 1000)
    preprocess(tmp_path, corpus, [json.dumps({"text": "print(1)"})])
    assert not stale.exists()


def run_tool(args):
    return [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--tokenizer-type",
            "sentencepiece", "--no-progress", *map(str, args)]


@pytest.mark.parametrize("read_only, size, message", [
    (True, "1m", "cannot write"),
    (False, "8k", "No space left on device"),
])
def test_unwritable_or_full_output_gives_one_line_and_leaves_nothing(tmp_path, corpus, read_only, size,
                                                                     message):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": Path(json.__file__).read_text() * 4}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    listing = f"{out}.listing"
    command = ["sh", "-c", " ".join(map(str, run_tool(
        ["--input", jsonl, "--output-prefix", out / "data", "--tokenizer-model", corpus.tokenizer_model])))
        + f"; status=$?; ls -A {out} > {listing}; exit $status"]
    proc = run_with_tmpfs(out, command, size=size, read_only=read_only)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert Path(listing).read_text() == ""  # no temporary left behind, nothing half-written


def test_model_config_vocab_is_the_tokenizers(base):
    run = parse_args(base, world_size=1)
    assert run.model == dataclasses.replace(get_preset("tiny"), vocab_size=8192)


# ---- evaluation ----------------------------------------------------------------------------------


def load_eval_tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool", ["eval_perplexity", "eval_passkey", "eval_far_tokens"])
def test_evaluation_checks_checkpoints_and_output_before_loading(tool, tmp_path, capsys, corpus):
    parse = load_eval_tool(tool).parse_args
    data = ["--data-path", corpus.valid_prefix] if tool != "eval_passkey" else []
    lengths = ["--lengths", "256"] if tool != "eval_far_tokens" else []
    common = data + lengths + ["--tokenizer-model", corpus.tokenizer_model]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for argv, message in [
        (["--load", tmp_path / "nothing", "--output", tmp_path / "r.json"], "--load .*nothing does not exist"),
        (["--load", hf, "--output", tmp_path / "r.json"], "is a Hugging Face model directory"),
        (["--hf-dir", tmp_path, "--output", tmp_path / "r.json"], "no config.json"),
        (["--hf-dir", hf, "--output", tmp_path], "--output .* cannot be written"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parse([str(a) for a in common + argv])
        assert exc.value.code == 2
        assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


def test_evaluation_data_beyond_the_vocabulary_is_refused(tmp_path, monkeypatch):
    from pose_megatron.evaluation import cli
    from pose_megatron.evaluation.documents import load_documents

    prefix = write_prefix(tmp_path / "d", [[5] * 30 + [150]])
    assert load_documents(prefix, min_tokens=4).max_token == 150
    truncated = write_prefix(tmp_path / "t", [[5] * 40])
    Path(truncated + ".bin").write_bytes(Path(truncated + ".bin").read_bytes()[:-8])
    with pytest.raises(DataError, match="is truncated"):
        load_documents(truncated, min_tokens=4)

    class SmallModel:
        vocab_size = 100

        def close(self):
            pass

    monkeypatch.setattr(cli, "open_backend", lambda *a, **k: SmallModel())
    monkeypatch.setattr(cli, "start_distributed", lambda specs: None)
    args = type("Args", (), dict(checkpoints=[cli.CheckpointSpec("hf", "model", "m")], dtype="auto",
                                 tensor_model_parallel_size=1, pipeline_model_parallel_size=1))
    with pytest.raises(ValueError, match="vocabulary of 100 tokens, but the inputs hold token id 150"):
        cli.evaluate_checkpoints(args, lambda backend: pytest.fail("evaluated"), max_token=150)


def test_tokenizer_without_an_end_of_document_id_is_refused(tmp_path):
    import sentencepiece

    from pose_megatron.tokenizer import build_tokenizer

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some text to learn pieces from" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "no_eos"),
                                             vocab_size=40, eos_id=-1, minloglevel=2)
    with pytest.raises(ValueError, match="has no end-of-sequence token"):
        build_tokenizer("sentencepiece", str(tmp_path / "no_eos.model"))
