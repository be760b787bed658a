"""PoseGPTDataset on real megatron-core .bin/.idx files built in the test.

Token ids encode where they come from: token = 1_000_000 * source + 1_000 * document + offset, so a
sample's tokens say which prefix, which document and which offsets they were read from.
"""

import logging
import pickle
from collections import OrderedDict

import numpy
import pytest
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from pose_megatron.data import PoseGPTDataset, PoseGPTDatasetConfig, make_sample_rng
from pose_megatron.loader import build_pose_datasets
from pose_megatron.positions import PoseSampling, sample_pose

SEQ, TARGET = 16, 256
WINDOW = 5 * SEQ  # the default content window
# Document lengths: 10 and 16 are below the default min_doc_length (17).
LENGTHS = [10, 17, 40, 80, 170, 400, 16, 90]


class FakeTokenizer:
    """What megatron-core's GPTDataset reads from a tokenizer."""

    vocab_size = 4_000_000
    eod = 0
    bos = 1
    unique_identifiers = OrderedDict(class_name="FakeTokenizer")


def write_documents(prefix, lengths, source=0):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for document, length in enumerate(lengths):
        tokens = 1_000_000 * source + 1_000 * document + numpy.arange(length)
        builder.add_document(tokens.astype(numpy.int32), [length])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def decode(tokens):
    """(source, document, offset) of each token id."""
    tokens = numpy.asarray(tokens)
    return tokens // 1_000_000, tokens // 1_000 % 1_000, tokens % 1_000


@pytest.fixture
def prefix(tmp_path):
    return write_documents(tmp_path / "docs", LENGTHS)


def build(prefix, tmp_path, sizes=(None, None, None), split="100,0,0", **kwargs):
    pose = kwargs.pop("pose", PoseSampling(SEQ, TARGET))
    datasets = build_pose_datasets(
        [prefix],
        None,
        split,
        list(sizes),
        1234,
        FakeTokenizer(),
        pose,
        path_to_cache=str(tmp_path / "cache"),
        **kwargs,
    )
    return datasets


def test_samples_are_the_document_tokens_at_token_index(prefix, tmp_path):
    train, _, _ = build(prefix, tmp_path, sizes=(40, None, None))
    assert isinstance(train, PoseGPTDataset)
    extended = PoseSampling(SEQ, TARGET).with_extra_token()
    for idx in range(len(train)):
        sample = train[idx]
        doc_id, start, length = train.sample_index[train.shuffle_index[idx]]
        layout = sample_pose(make_sample_rng(1234, idx), length, extended)
        text = 1_000 * doc_id + start + layout.token_index  # the document's tokens there
        assert sample["tokens"].tolist() == text[:-1].tolist()
        assert sample["labels"].tolist() == text[1:].tolist()
        assert sample["position_ids"].tolist() == layout.position_ids[:-1].tolist()
        assert sample["loss_mask"].tolist() == [1.0] * SEQ
        # Independently of the sampler: one document, increasing offsets, labels shifted by one.
        _, documents, offsets = decode(torch.cat([sample["tokens"], sample["labels"][-1:]]))
        assert len(set(documents.tolist())) == 1
        assert numpy.all(numpy.diff(offsets) >= 1)
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        positions = sample["position_ids"]
        assert positions[0] == 0 and torch.all(positions.diff() >= 1) and positions[-1] < TARGET
        assert {k: v.dtype for k, v in sample.items()} == {
            "tokens": torch.int64,
            "labels": torch.int64,
            "position_ids": torch.int64,
            "loss_mask": torch.float32,
        }


def test_windows_per_document_and_min_doc_length(prefix, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pose_megatron.data"):
        train, _, _ = build(prefix, tmp_path)
    # One epoch: documents of n >= 17 tokens give max(1, n // 80) samples, each from its own window.
    expected = {1: 1, 2: 1, 3: 1, 4: 2, 5: 5, 7: 1}
    seen = {}
    for idx in range(len(train)):
        _, documents, offsets = decode(train[idx]["tokens"])
        window = offsets[0] // WINDOW
        assert numpy.all(offsets // WINDOW == window), "a sample stays inside one window"
        seen.setdefault(int(documents[0]), []).append(int(window))
    assert {d: len(w) for d, w in seen.items()} == expected
    assert all(sorted(w) == list(range(len(w))) for w in seen.values())
    kept = [n for n in LENGTHS if n >= SEQ + 1]
    assert (train.num_documents_kept, train.num_tokens_kept) == (len(kept), sum(kept))
    assert (train.num_documents_total, train.num_tokens_total) == (len(LENGTHS), sum(LENGTHS))
    assert f"kept {len(kept)} of {len(LENGTHS)} documents and {sum(kept)} of" in caplog.text


def test_requested_samples_repeat_every_window_once_per_epoch(prefix, tmp_path):
    train, _, _ = build(prefix, tmp_path, sizes=(25, None, None))
    assert len(train) == 33  # 3 epochs of 11 windows
    windows = [tuple(row) for row in numpy.asarray(train.sample_index)[train.shuffle_index]]
    for epoch in range(3):
        assert len(set(windows[11 * epoch : 11 * (epoch + 1)])) == 11
    # Each epoch's draw of the same window is a different layout (seeded by sample index).
    first = [train[i]["position_ids"].tolist() for i in range(33)]
    assert len({str(p) for p in first}) > 30


def test_short_documents_are_padded_and_masked(prefix, tmp_path):
    train, _, _ = build(prefix, tmp_path, min_doc_length=1)
    assert train.num_documents_kept == len(LENGTHS)
    found = 0
    for idx in range(len(train)):
        sample = train[idx]
        _, documents, offsets = decode(sample["tokens"][:1])
        if documents[0] == 0:  # the 10-token document: 9 inputs, 9 labels, then padding
            found += 1
            assert sample["tokens"][:9].tolist() == list(range(9))
            assert sample["labels"][:9].tolist() == list(range(1, 10))
            assert sample["loss_mask"].tolist() == [1.0] * 9 + [0.0] * (SEQ - 9)
            assert sample["tokens"][9:].eq(0).all() and sample["labels"][9:].eq(0).all()
            positions = sample["position_ids"]
            assert torch.all(positions[:9].diff() >= 1) and positions.max() < TARGET
        if documents[0] == 6:  # 16 tokens = seq_length: 15 real inputs
            assert sample["loss_mask"].sum() == 15
    assert found == 1


def test_same_samples_in_any_order_after_rebuild_and_in_workers(prefix, tmp_path):
    first, _, _ = build(prefix, tmp_path, sizes=(30, None, None))
    forward = [first[i] for i in range(len(first))]
    backward = [first[i] for i in reversed(range(len(first)))][::-1]
    again, _, _ = build(prefix, tmp_path / "elsewhere", sizes=(30, None, None))
    # A DataLoader worker gets a pickled copy of the dataset.
    again = pickle.loads(pickle.dumps(again))
    for a, b, c in zip(forward, backward, [again[i] for i in range(len(again))], strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])


def test_index_cache_is_reused_and_keyed_by_pose_settings(prefix, tmp_path, monkeypatch):
    build(prefix, tmp_path)
    cache = tmp_path / "cache"
    files = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".tokens.json"))
    assert len(files) == 4 and not any(".tmp" in name for name in files)

    def fail(self):
        raise AssertionError("indices rebuilt although the cache holds them")

    monkeypatch.setattr(PoseGPTDataset, "_build_indices", fail)
    train, _, _ = build(prefix, tmp_path)  # same settings: a cache hit
    assert len(train) == 11
    for changed in (PoseSampling(SEQ, TARGET, num_chunks=3), PoseSampling(SEQ, 2 * TARGET)):
        with pytest.raises(AssertionError, match="rebuilt"):
            build(prefix, tmp_path, pose=changed)
    with pytest.raises(AssertionError, match="rebuilt"):
        build(prefix, tmp_path, min_doc_length=40)


def test_blending_two_prefixes(tmp_path):
    a = write_documents(tmp_path / "a", [100, 300, 200, 50], source=1)
    b = write_documents(tmp_path / "b", [400, 120, 90], source=2)
    train, _, _ = build_pose_datasets(
        [a, b],
        [0.25, 0.75],
        "100,0,0",
        [200, 0, 0],
        7,
        FakeTokenizer(),
        PoseSampling(SEQ, TARGET),
        path_to_cache=str(tmp_path / "cache"),
    )
    assert isinstance(train, BlendedDataset) and len(train) == 200
    counts = [0, 0]
    for idx in range(len(train)):
        sample = train[idx]
        sources, documents, _ = decode(sample["tokens"])
        assert len(set(sources.tolist())) == 1 and len(set(documents.tolist())) == 1
        assert sources[0] == sample["dataset_id"] + 1  # prefix a is dataset 0
        counts[sample["dataset_id"]] += 1
    assert counts == [50, 150]


def test_splits_use_disjoint_documents(tmp_path):
    prefix = write_documents(tmp_path / "docs", [100] * 10)
    train, valid, test = build(prefix, tmp_path, split="60,40,0")
    assert test is None
    documents = []
    for dataset in (train, valid):
        documents.append({int(decode(dataset[i]["tokens"])[1][0]) for i in range(len(dataset))})
    assert documents == [set(range(6)), set(range(6, 10))]


def test_attention_mask_eod_mask_and_batch_padding(tmp_path):
    prefix = write_documents(tmp_path / "docs", [200, 200])  # token 0 (= eod) starts document 0
    train, _, _ = build(prefix, tmp_path, create_attention_mask=True, eod_mask_loss=True)
    for idx in range(len(train)):
        sample = train[idx]
        mask = sample["attention_mask"]
        assert mask.shape == (1, SEQ, SEQ) and mask.dtype == torch.bool
        assert torch.equal(mask[0], ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
        assert torch.equal(sample["loss_mask"] == 0, sample["tokens"] == FakeTokenizer.eod)
    assert train[None]["loss_mask"].eq(0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pose=None), "pose is required"),
        (dict(pose=PoseSampling(8, 64)), "must equal sequence_length"),
        (dict(reset_position_ids=True), "reset_position_ids must be False"),
        (dict(min_doc_length=0), "min_doc_length must be >= 1"),
    ],
)
def test_bad_config(prefix, kwargs, message):
    settings = dict(
        random_seed=1,
        sequence_length=SEQ,
        blend=([prefix], None),
        split="1,0,0",
        tokenizer=FakeTokenizer(),
        pose=PoseSampling(SEQ, TARGET),
    )
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PoseGPTDatasetConfig(**settings)


def test_no_long_enough_document_is_a_clear_error(tmp_path):
    prefix = write_documents(tmp_path / "short", [5, 9, 12])
    with pytest.raises(ValueError, match="lower --pose-min-doc-length"):
        build(prefix, tmp_path, sizes=(10, None, None))


def test_missing_prefix_and_bad_weights(prefix, tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data.py"):
        build(str(tmp_path / "nothing"), tmp_path)
    with pytest.raises(ValueError, match="one weight per prefix"):
        build_pose_datasets(
            [prefix], [0.5, 0.5], "1,0,0", [9, 0, 0], 1, FakeTokenizer(), PoseSampling(SEQ, TARGET)
        )
    with pytest.raises(ValueError, match="needs a sample count"):
        build_pose_datasets(
            [prefix, prefix],
            [0.5, 0.5],
            "1,0,0",
            [9, None, 0],
            1,
            FakeTokenizer(),
            PoseSampling(SEQ, TARGET),
        )
