"""The small reproduction's synthetic retrieval documents (experiments/pose_small/synthetic.py)."""

import numpy as np
import pytest

from experiments.pose_small import synthetic
from pose_megatron.evaluation import passkey


@pytest.fixture(scope="module")
def tokenizer():
    from pose_megatron.corpus import ensure_sample_corpus
    from pose_megatron.tokenizer import build_tokenizer

    corpus = ensure_sample_corpus()
    return build_tokenizer(corpus.tokenizer_type, corpus.tokenizer_model)


def _lines(doc):
    return doc.text.split("\n")


def test_document_uses_the_evaluation_prompt_strings():
    spec = synthetic.RetrievalDocSpec(num_tokens=600, max_key_offset=50, max_gap=200)
    doc = synthetic.make_retrieval_doc(np.random.default_rng(0), spec)
    lines = _lines(doc)
    assert lines[0] == passkey.TASK
    assert lines[2] == passkey.key_line(doc.key)
    questions = lines[4::2]
    assert questions and all(q == f"{passkey.QUESTION} {doc.key}." for q in questions)
    fillers = [lines[1]] + lines[3::2]
    assert all(f == passkey.filler(len(f.split())) for f in fillers if f)
    assert len(questions) == len(doc.gap_words)
    assert passkey.KEY_RANGE[0] <= doc.key <= passkey.KEY_RANGE[1]
    # The evaluation's own answer parser reads the answer after the question as the key.
    answer = doc.text.split(passkey.QUESTION, 1)[1]
    assert passkey.first_integer(answer) == doc.key


def test_documents_depend_only_on_seed_and_index():
    spec = synthetic.pretraining_spec(256, 1.84)
    a = [d.text for d in synthetic.iter_retrieval_docs(spec, 5, seed=3)]
    b = [d.text for d in synthetic.iter_retrieval_docs(spec, 8, seed=3)][:5]
    c = [d.text for d in synthetic.iter_retrieval_docs(spec, 5, seed=4)]
    assert a == b
    assert a != c
    assert len(set(a)) == 5


def test_token_budget_and_key_question_distances(tokenizer):
    tpw = synthetic.filler_tokens_per_word(tokenizer)
    assert 1.0 < tpw < 4.0
    for window, spec in ((128, synthetic.pretraining_spec(128, tpw)), (256, synthetic.pretraining_spec(256, tpw)),
                         (1024, synthetic.extension_spec(1024, 128, tpw))):
        docs = list(synthetic.iter_retrieval_docs(spec, 40, seed=0))
        distances, first_answer_ends = [], []
        for doc in docs:
            ids = tokenizer.tokenize(doc.text)
            # Planned in tokens through the filler density: the realised length is close.
            assert abs(len(ids) - spec.num_tokens) <= 0.1 * spec.num_tokens + 60
            d = synthetic.key_question_distances(ids, doc.key, tokenizer)
            assert len(d) == len(doc.gap_words) and d == sorted(d) and d[0] > 0
            distances.append(d[0])
            first_answer_ends.append(synthetic.answer_spans(ids, doc.key, tokenizer)[0][1])
        if spec.lead_with_task:  # pretraining: a sample's labels (the first window) hold the first
            # answer, and the document is longer than a sample (shorter ones are not trained on)
            assert sum(end <= window for end in first_answer_ends) >= 0.95 * len(docs)
            assert all(len(tokenizer.tokenize(d.text)) + 2 > window + 1 for d in docs)  # + BOS, EOD
            assert max(distances) > window // 3
        else:  # extension: first questions from short distances to most of the target
            assert min(distances) < window // 4 and max(distances) > window // 2
        assert max(distances) <= window + 64


def test_extension_documents_open_with_the_key(tokenizer):
    """A PoSE sample's first chunk (at most L_c / 2 tokens) must be able to hold the key line."""
    spec = synthetic.extension_spec(1024, 128, synthetic.filler_tokens_per_word(tokenizer))
    assert not spec.lead_with_task and spec.max_key_offset == 128 // 16
    for doc in synthetic.iter_retrieval_docs(spec, 20, seed=1):
        assert passkey.TASK not in doc.text
        ids = tokenizer.tokenize(doc.text)
        key_ids = tokenizer.tokenize(passkey.key_line(doc.key))
        start = next(i for i in range(len(ids)) if ids[i:i + len(key_ids)] == key_ids)
        assert start + len(key_ids) <= 128 // 2 - 16  # key line + offset well inside the first chunk


def test_answer_spans_are_the_digits_after_each_question(tokenizer):
    spec = synthetic.extension_spec(1024, 128, synthetic.filler_tokens_per_word(tokenizer))
    for doc in synthetic.iter_retrieval_docs(spec, 10, seed=5):
        ids = tokenizer.tokenize(doc.text)
        mentions = synthetic.key_mentions(ids, doc.key, tokenizer)
        answers = synthetic.answer_spans(ids, doc.key, tokenizer)
        assert len(mentions) == 2 + len(doc.gap_words)  # twice in the key line, once per answer
        assert answers == mentions[2:]
        for a, b in answers:
            assert tokenizer.detokenize(ids[a:b]).strip() == str(doc.key)
            assert tokenizer.detokenize(ids[:a]).rstrip().endswith(passkey.QUESTION)
        far = synthetic.far_answer_spans(ids, doc.key, tokenizer, 128)
        assert set(far) <= set(answers)
        for span in answers:  # far exactly when the previous mention ends >= 127 tokens before
            previous = max(b for a, b in mentions if b <= span[0])
            assert (span in far) == (span[0] - previous >= 127)
    with pytest.raises(ValueError, match="not the key 4242"):
        synthetic.key_mentions(tokenizer.tokenize("The pass key is 4243."), 4242, tokenizer)


def test_write_jsonl_round_trips(tmp_path):
    import json

    spec = synthetic.pretraining_spec(256, 1.84)
    path = tmp_path / "s.jsonl"
    assert synthetic.write_retrieval_jsonl(str(path), spec, 7, seed=2) == 7
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in records] == [d.text for d in synthetic.iter_retrieval_docs(spec, 7, 2)]
    assert all(f"The pass key is {r['key']}." in r["text"] for r in records)


@pytest.mark.parametrize("kwargs", [dict(num_tokens=10, max_key_offset=0),
                                    dict(num_tokens=500, max_key_offset=0, min_gap=0),
                                    dict(num_tokens=500, max_key_offset=0, min_gap=50, max_gap=10),
                                    dict(num_tokens=500, max_key_offset=-1)])
def test_spec_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        synthetic.RetrievalDocSpec(**kwargs)
