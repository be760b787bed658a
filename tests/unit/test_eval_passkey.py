"""Passkey prompts, trials and scoring (docs/reference.md, "Evaluation protocols"), without a model."""

import io
import random
import re

import numpy as np
import pytest

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.passkey import (
    KEY_RANGE,
    PasskeyPromptBuilder,
    PromptDoesNotFit,
    build_prompts,
    evaluate_passkey,
    first_integer,
    make_trials,
    plan_prompts,
    prompt_text,
    summarize,
)
from pose_megatron.evaluation.perplexity import ExtrapolationWarning

# The paper's strings, typed from docs/reference.md (not imported: the test checks the module's copies).
PAPER_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
              "them. I will quiz you about the important information there.")
PAPER_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PAPER_QUESTION = "What is the pass key? The pass key is"


class CharTokenizer:
    """One token per ASCII character; BOS 1, EOD 2."""

    bos, eod, vocab_size = 1, 2, 131

    def tokenize(self, text):
        return [ord(c) + 3 for c in text]

    def detokenize(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A small sentencepiece model (merges words into pieces, so token counts are not char counts)."""
    import sentencepiece

    from pose_megatron.evaluation.passkey import key_line
    from pose_megatron.tokenizer import build_tokenizer

    rng = random.Random(0)
    lines = [PAPER_TASK, PAPER_FILLER, PAPER_QUESTION] * 50
    lines += [key_line(rng.randint(*KEY_RANGE)) for _ in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=200, hard_vocab_limit=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return build_tokenizer("sentencepiece", str(path))


def test_prompt_is_the_papers():
    text = prompt_text(4242, 4, 21)  # the filler sentences hold 19 words
    lines = text.split("\n")
    assert lines[0] == PAPER_TASK
    assert lines[1] == "The grass is green."
    assert lines[2] == "The pass key is 4242. Remember it. 4242 is the pass key."
    assert lines[3] == PAPER_FILLER + " The grass"
    assert lines[4] == PAPER_QUESTION
    assert len(lines) == 5


@pytest.mark.parametrize("tokenizer_name", ["char", "spm"])
@pytest.mark.parametrize("answer_tokens", [0, 10])
def test_prompts_fit_their_length_with_room_for_the_answer_and_key_at_depth(tokenizer_name, answer_tokens,
                                                                          spm_tokenizer):
    """BOS + prompt + answer <= length, and short of it by at most one filler sentence (in tokens:
    the char tokenizer's is "There and back again." = 21, the spm model's a handful)."""
    tokenizer = CharTokenizer() if tokenizer_name == "char" else spm_tokenizer
    builder = PasskeyPromptBuilder(tokenizer, answer_tokens=answer_tokens)
    sentence = max(len(tokenizer.tokenize(s + ".")) for s in PAPER_FILLER.rstrip(".").split(". "))
    assert builder.sentence_tokens == sentence
    for length in (300, 517, 1000, 4096):
        for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
            key = 31337 + length
            prompt = builder.build(length, depth, key)
            case = (length, depth)
            used = prompt.num_tokens + answer_tokens
            assert length - sentence <= used <= length, (case, prompt.num_tokens)
            ids = prompt.token_ids.tolist()
            assert ids[0] == tokenizer.bos
            # The key line starts at key_token_index...
            line = tokenizer.detokenize(ids[prompt.key_token_index :])
            assert line.lstrip().startswith(f"The pass key is {key}. Remember it."), case
            # ... and the filler before it is `depth` of all filler, counted in tokens (up to
            # one word: the filler is cut between words).
            text = tokenizer.detokenize(ids[1:])
            filler_total = len(ids) - len(builder._tokens(prompt_text(key, 0, 0)))
            before_key = text[: text.index("The pass key is")].rstrip()
            before = max(0, len(tokenizer.tokenize(before_key)) - len(tokenizer.tokenize(PAPER_TASK + "\n")))
            tolerance = 0.01 + 1.0 / prompt.filler_words
            assert abs(before / filler_total - depth) <= tolerance, (case, before, filler_total)
            assert abs(prompt.realized_depth - depth) <= tolerance, case
            assert text.rstrip().endswith(PAPER_QUESTION)


def test_the_longest_prompt_that_fits_is_chosen():
    """One more filler word would not fit: the builder takes the most filler the budget allows."""
    tokenizer = CharTokenizer()
    builder = PasskeyPromptBuilder(tokenizer, answer_tokens=7)
    for length in (300, 517, 2000):
        prompt = builder.build(length, 0.5, 4242)
        before = round(0.5 * (prompt.filler_words + 1))
        after = prompt.filler_words + 1 - before
        one_more = 1 + len(tokenizer.tokenize(prompt_text(4242, before, after)))
        assert prompt.num_tokens + 7 <= length < one_more + 7, length


def test_prompt_too_short_for_the_template_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        PasskeyPromptBuilder(CharTokenizer()).build(50, 0.5, 123)


def test_first_integer():
    assert first_integer(" 12345. Remember it.") == 12345
    assert first_integer("is 0042 and 7") == 42
    assert first_integer("the key is green") is None
    assert first_integer("") is None


def test_trials_are_seeded_per_trial():
    trials = make_trials([256, 512], trials=20, seed=3)
    assert len(trials) == 40
    assert all(KEY_RANGE[0] <= t.key <= KEY_RANGE[1] for t in trials)
    assert all(0.0 <= t.depth <= 1.0 for t in trials)
    assert len({t.depth for t in trials}) == 40  # random depths
    # Adding a length or more trials leaves the existing trials unchanged.
    more = make_trials([128, 256, 512], trials=25, seed=3)
    same = [t for t in more if t.length in (256, 512) and t.index < 20]
    assert [(t.length, t.key, t.depth) for t in same] == [(t.length, t.key, t.depth) for t in trials]
    assert make_trials([256], 20, seed=4)[0].key != trials[0].key or make_trials([256], 20, seed=4)[1].key != trials[1].key
    explicit = make_trials([256], trials=3, depths=[0.0, 0.5, 1.0])
    assert [t.depth for t in explicit] == [0.0] * 3 + [0.5] * 3 + [1.0] * 3


class OracleBackend(EvalBackend):
    """Answers with the key found in the prompt, except when told to miss; records prompts."""

    def __init__(self, tokenizer, miss_every=0, max_positions=None):
        super().__init__("oracle", "memory")
        self.tokenizer, self.miss_every, self.max_positions = tokenizer, miss_every, max_positions
        self.calls = 0

    def greedy_generate(self, prompt, max_new_tokens, stop_ids=()):
        self.calls += 1
        key = int(re.search(r"pass key is (\d+)", self.tokenizer.detokenize(list(prompt))).group(1))
        if self.miss_every and self.calls % self.miss_every == 0:
            key += 1
        answer = self.tokenizer.tokenize(f" {key}. The grass")[:max_new_tokens]
        return answer + [self.tokenizer.eod]


def test_scoring_and_summary():
    tokenizer = CharTokenizer()
    trials = make_trials([300, 600], trials=4, depths=[0.0, 1.0], seed=1)
    prompts = build_prompts(PasskeyPromptBuilder(tokenizer), trials)
    outcomes = evaluate_passkey(OracleBackend(tokenizer), prompts, tokenizer.detokenize,
                                max_new_tokens=10, stop_ids=(tokenizer.eod,), progress=False)
    assert all(o.correct for o in outcomes) and len(outcomes) == 16
    assert outcomes[0].answer.startswith(" ") and outcomes[0].predicted == trials[0].key

    outcomes = evaluate_passkey(OracleBackend(tokenizer, miss_every=2), prompts, tokenizer.detokenize,
                                stop_ids=(tokenizer.eod,), progress=False)
    summary = summarize(outcomes, explicit_depths=True)
    assert summary.by_length[300] == {"trials": 8, "correct": 4, "accuracy": 0.5}
    assert set(summary.by_depth[600]) == {"0", "1"}
    assert sum(c["trials"] for c in summary.by_depth[600].values()) == 8


def test_random_depths_are_binned():
    tokenizer = CharTokenizer()
    prompts = build_prompts(PasskeyPromptBuilder(tokenizer), make_trials([400], trials=10, seed=2))
    outcomes = evaluate_passkey(OracleBackend(tokenizer), prompts, tokenizer.detokenize, progress=False)
    bins = summarize(outcomes, explicit_depths=False).by_depth[400]
    assert set(bins) <= {"0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"}
    assert sum(c["trials"] for c in bins.values()) == 10


def test_prompts_beyond_the_model_warn_and_run():
    tokenizer = CharTokenizer()
    prompts = build_prompts(PasskeyPromptBuilder(tokenizer), make_trials([300, 900], trials=1))
    backend = OracleBackend(tokenizer, max_positions=512)
    with pytest.warns(ExtrapolationWarning, match="exceed the model's 512 positions"):
        outcomes = evaluate_passkey(backend, prompts, tokenizer.detokenize, progress=False)
    assert len(outcomes) == 2 and backend.calls == 2


def test_heatmap_and_table(tmp_path):
    pytest.importorskip("matplotlib")
    from pose_megatron.evaluation.report import passkey_table, plot_passkey_heatmap

    tokenizer = CharTokenizer()
    prompts = build_prompts(PasskeyPromptBuilder(tokenizer), make_trials([300, 600], 2, [0.0, 0.5, 1.0]))
    outcomes = evaluate_passkey(OracleBackend(tokenizer, miss_every=3), prompts, tokenizer.detokenize,
                                stop_ids=(2,), progress=False)
    summary = summarize(outcomes, explicit_depths=True)
    table = passkey_table({"a": summary.by_length}, [300, 600])
    assert "| a " in table and "(4/6)" in table
    path = plot_passkey_heatmap({"a": summary.by_depth, "b": summary.by_depth}, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path
    assert np.isclose(summary.by_length[300]["accuracy"], 4 / 6)


def _bare(tokenizer, key):
    """BOS + the prompt without filler."""
    return 1 + len(tokenizer.tokenize(prompt_text(key, 0, 0)))


def test_trials_that_cannot_fit_are_skipped_and_counted():
    """With one token per character a 5-digit key makes the prompt 2 tokens longer than a 4-digit
    one: at a length just too short for 5-digit keys those trials are skipped, the others run."""
    tokenizer = CharTokenizer()
    builder = PasskeyPromptBuilder(tokenizer, answer_tokens=10)
    length = _bare(tokenizer, 10000) - 1 + 10
    trials = make_trials([length, 600], trials=20, seed=7)
    long_keys = sum(1 for t in trials if t.length == length and t.key >= 10000)
    assert 0 < long_keys < 20  # the seed draws both kinds
    plan = plan_prompts(builder, trials)
    assert plan.skipped_by_length([length, 600]) == {length: long_keys, 600: 0}
    assert all(s.key >= 10000 and "too short" in s.reason for s in plan.skipped)
    assert len(plan.prompts) == 40 - long_keys
    assert all(p.num_tokens + 10 <= p.length for p in plan.prompts)
    with pytest.raises(PromptDoesNotFit, match="too short"):
        build_prompts(builder, trials)  # the strict form refuses any skip

    outcomes = evaluate_passkey(OracleBackend(tokenizer), plan.prompts, tokenizer.detokenize, progress=False)
    summary = summarize(outcomes, explicit_depths=False, skipped=plan.skipped_by_length([length, 600]))
    assert summary.by_length[length]["trials"] == 20 - long_keys
    assert summary.to_json()["skipped"] == {str(length): long_keys, "600": 0}
    from pose_megatron.evaluation.report import passkey_table

    table = passkey_table({"a": summary.by_length}, [length, 600], summary.skipped)
    assert f"({20 - long_keys}/{20 - long_keys}, {long_keys} skipped)" in table and "(20/20)" in table


class JumpTokenizer(CharTokenizer):
    """One token per character, plus 50 more for any text beyond 400 characters: adding a word
    can jump further than one filler sentence."""

    def tokenize(self, text):
        return super().tokenize(text) + ([0] * 50 if len(text) > 400 else [])


def test_a_prompt_short_by_more_than_a_sentence_is_skipped_and_a_length_with_no_trial_is_an_error():
    builder = PasskeyPromptBuilder(JumpTokenizer())
    assert builder.sentence_tokens == 21
    with pytest.raises(PromptDoesNotFit, match=r"within 21 tokens below 430 \(closest 40\d\)"):
        builder.build(430, 0.5, 4242)
    with pytest.raises(ValueError, match="every passkey trial at length 430 was skipped"):
        plan_prompts(builder, make_trials([430, 600], trials=3, seed=1))
    with pytest.raises(ValueError, match="every passkey trial at length 50 was skipped.*too short"):
        plan_prompts(PasskeyPromptBuilder(CharTokenizer()), make_trials([50, 300], trials=3))


def test_the_tool_reports_skips_in_its_json_and_table(tmp_path, monkeypatch, capsys):
    """tools/eval_passkey.py: prompts leave room for --max-new-tokens; skipped trials are counted
    per length in the JSON and the printed table (the model is the oracle, the tokenizer chars)."""
    import json

    from tool_modules import load_tool

    tool = load_tool("eval_passkey")
    tokenizer = CharTokenizer()
    monkeypatch.setattr(tool.cli, "required_tokenizer", lambda args, why: tokenizer)

    def oracle_loop(args, evaluate, max_token=None):
        return {"oracle": evaluate(OracleBackend(tokenizer))}, {"oracle": {"kind": "oracle"}}

    monkeypatch.setattr(tool.cli, "evaluate_checkpoints", oracle_loop)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    length = _bare(tokenizer, 10000) - 1 + 10
    out = tmp_path / "passkey.json"
    assert tool.main(["--hf-dir", str(tmp_path / "model"), "--lengths", f"{length},600", "--trials", "20",
                      "--seed", "7", "--max-new-tokens", "10", "--no-plot", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    long_keys = sum(1 for t in make_trials([length], 20, seed=7) if t.key >= 10000)
    assert report["skipped"]["by_length"] == {str(length): long_keys, "600": 0}
    assert len(report["skipped"]["trials"]) == long_keys
    assert report["results"]["oracle"]["skipped"] == {str(length): long_keys, "600": 0}
    assert all(t["prompt_tokens"] + 10 <= t["length"] for t in report["results"]["oracle"]["trials"])
    assert f"{long_keys} skipped" in capsys.readouterr().out
