"""The PoSE sampler: invariants for every mode, the exact reference law (docs/reference.md, "PoSE sampling")."""

import itertools

import numpy
import pytest
from scipy import stats

from pose_megatron.positions import PoseSampling, sample_pose

# ---- a law test that can fail --------------------------------------------------------------------


def assert_law(values, pmf, draws_label="draws", alpha=1e-4):
    """Assert that integer `values` follow the law {value: probability} (chi-square fit test).

    A value outside the support fails at once; otherwise the p-value must exceed alpha. Fixed seeds
    make every call deterministic, so alpha only sets how far from the law a sampler may be.
    """
    values = numpy.asarray(values)
    support = numpy.array(sorted(pmf))
    outside = numpy.setdiff1d(numpy.unique(values), support)
    assert outside.size == 0, f"{draws_label}: values {outside[:10]} are outside the support"
    observed = numpy.array([(values == v).sum() for v in support])
    expected = numpy.array([pmf[v] for v in support]) * values.size
    assert numpy.isclose(sum(pmf.values()), 1.0)
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > alpha, f"{draws_label}: chi-square p={p_value:.2e} rejects the law"


def uniform(low, high):
    """The uniform law on the integers low..high (both included)."""
    return {v: 1.0 / (high - low + 1) for v in range(low, high + 1)}


def draw(cfg, doc_length, count, seed=0):
    rng = numpy.random.default_rng(seed)
    return [sample_pose(rng, doc_length, cfg) for _ in range(count)]


def chunk_starts(sample):
    return numpy.concatenate(([0], numpy.cumsum(sample.chunk_lengths)[:-1]))


# ---- invariants ----------------------------------------------------------------------------------

MODES = [
    dict(num_chunks=2, content="skip"),
    dict(num_chunks=2, content="contiguous"),
    dict(num_chunks=3, content="skip"),
    dict(num_chunks=3, content="contiguous"),
    dict(num_chunks=16, content="skip"),  # RandPos at seq_length=16
    dict(num_chunks=5, content="skip", content_window=20),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
@pytest.mark.parametrize("doc_length", [1, 2, 7, 16, 17, 50, 80, 1000])
def test_invariants_hold_in_every_mode(mode, doc_length):
    cfg = PoseSampling(seq_length=16, target_length=128, **mode)
    for sample in draw(cfg, doc_length, 200, seed=doc_length):
        tokens, positions = sample.token_index, sample.position_ids
        n = min(16, doc_length)
        assert tokens.dtype == numpy.int64 and positions.dtype == numpy.int64
        assert tokens.shape == positions.shape == (n,)
        # Strictly increasing, in range, chunk 0 unshifted in both text and positions.
        assert numpy.all(numpy.diff(tokens) >= 1) and numpy.all(numpy.diff(positions) >= 1)
        assert tokens[0] == 0 and (positions[0] == 0 or cfg.is_randpos)
        assert positions[-1] < 128
        assert tokens[-1] < min(doc_length, cfg.window)
        # Chunks: count, lengths, and contiguity inside each chunk.
        assert sample.chunk_lengths.size == min(cfg.num_chunks, n)
        assert numpy.all(sample.chunk_lengths >= 1) and sample.chunk_lengths.sum() == n
        inside = numpy.ones(n - 1, dtype=bool)
        inside[chunk_starts(sample)[1:] - 1] = False  # the step into each new chunk
        assert numpy.all(numpy.diff(positions)[inside] == 1)
        assert numpy.all(numpy.diff(tokens)[inside] == 1)
        if mode["content"] == "contiguous" or doc_length < 16 or cfg.is_randpos:
            numpy.testing.assert_array_equal(tokens, numpy.arange(n))


def test_reference_two_chunk_law_is_exact():
    """L_c=8, L_t=32, a 24-token document: l0 ~ U{1..4}, u1 ~ U{0..24}, content end e ~ U{8..24}."""
    cfg = PoseSampling(seq_length=8, target_length=32)
    samples = draw(cfg, 24, 20000, seed=1)
    l0 = numpy.array([s.chunk_lengths[0] for s in samples])
    u1 = numpy.array([s.position_ids[s.chunk_lengths[0]] - s.chunk_lengths[0] for s in samples])
    end = numpy.array([s.token_index[-1] + 1 for s in samples])
    assert_law(l0, uniform(1, 4), "first chunk length")
    assert_law(u1, uniform(0, 32 - 8), "position skip u1")
    assert_law(end, uniform(8, 24), "content end")
    # Chunk 1 is the l1 tokens ending at e; positions reach L_t - 1 exactly when u1 is maximal.
    for s, e in zip(samples[:200], end[:200], strict=True):
        l1 = s.chunk_lengths[1]
        numpy.testing.assert_array_equal(s.token_index[-l1:], numpy.arange(e - l1, e))
    assert max(s.position_ids[-1] for s in samples) == 31
    # The draws are independent: the joint (l0, u1 > 12) table has no association.
    table = numpy.array(
        [[numpy.sum((l0 == a) & (u1 > 12) == b) for b in (0, 1)] for a in range(1, 5)]
    )
    assert stats.chi2_contingency(table).pvalue > 1e-4


def test_law_helper_rejects_wrong_laws():
    """The helper used above fails on the laws a buggy sampler would produce."""
    rng = numpy.random.default_rng(2)
    with pytest.raises(AssertionError, match="outside the support"):
        assert_law(rng.integers(1, 6, 20000), uniform(1, 4))  # l0 up to ceil(L_c/2)+1
    with pytest.raises(AssertionError, match="rejects"):
        assert_law(rng.integers(0, 24, 20000), uniform(0, 24))  # u1 missing its top value
    with pytest.raises(AssertionError, match="rejects"):
        # The pre-fix law that shifted the first chunk too: the gap is a difference of two uniforms.
        first, second = rng.integers(0, 25, (2, 20000))
        assert_law(numpy.abs(first - second), uniform(0, 24))
    with pytest.raises(AssertionError, match="rejects"):
        # Moving 2.5% of the mass from one value to another is enough with 20000 draws.
        values = rng.integers(1, 5, 20000)
        values[:2000][values[:2000] == 4] = 1
        assert_law(values, uniform(1, 4))


def test_default_content_window_is_five_times_seq_length():
    cfg = PoseSampling(seq_length=8, target_length=32)
    assert cfg.window == 40
    end = numpy.array([s.token_index[-1] + 1 for s in draw(cfg, 1000, 20000, seed=3)])
    assert_law(end, uniform(8, 40), "content end, document longer than the window")
    wide = PoseSampling(seq_length=8, target_length=32, content_window=100)
    end = numpy.array([s.token_index[-1] + 1 for s in draw(wide, 1000, 20000, seed=3)])
    assert_law(end, uniform(8, 100), "content end, content_window=100")


def test_short_documents_follow_the_reference():
    """n < L_c: the whole document, contiguous, l0 ~ U{1..ceil(n/2)}, u1 ~ U{0..L_t-n}."""
    cfg = PoseSampling(seq_length=8, target_length=32)
    samples = draw(cfg, 5, 20000, seed=4)
    for s in samples[:100]:
        numpy.testing.assert_array_equal(s.token_index, numpy.arange(5))
    l0 = numpy.array([s.chunk_lengths[0] for s in samples])
    u1 = numpy.array([s.position_ids[s.chunk_lengths[0]] - s.chunk_lengths[0] for s in samples])
    assert_law(l0, uniform(1, 3), "short-document first chunk")
    assert_law(u1, uniform(0, 32 - 5), "short-document skip")
    one = draw(cfg, 1, 5)
    assert all(s.token_index.tolist() == [0] and s.position_ids.tolist() == [0] for s in one)


def sequential_pair_law(top):
    """Joint law of (s1, s2) under the paper's sequential rule, enumerated from its text:
    s1 ~ U{0..top}, then s2 ~ U{s1..top}."""
    return {(a, b): 1 / (top + 1) / (top - a + 1) for a in range(top + 1) for b in range(a, top + 1)}


def sorted_iid_pair_law(top):
    """The old rule: two independent U{0..top} draws, sorted."""
    return {(a, b): (1 if a == b else 2) / (top + 1) ** 2 for a in range(top + 1) for b in range(a, top + 1)}


def assert_joint_law(pairs, pmf, label):
    codes = {pair: i for i, pair in enumerate(sorted(pmf))}
    outside = [p for p in pairs if p not in codes]
    assert not outside, f"{label}: {outside[:5]} outside the support"
    assert_law([codes[p] for p in pairs], {codes[p]: q for p, q in pmf.items()}, label)


def skips_of(sample, arrays):
    """(skip of chunk 1, skip of chunk 2) of a three-chunk sample, read off `arrays`."""
    starts = chunk_starts(sample)
    values = getattr(sample, arrays)
    return tuple(int(values[i] - i) for i in starts[1:])


def test_three_chunks_follow_the_papers_sequential_law():
    """N=3, L_c=8, L_t=32, a 24-token document (L_x=24): the cut points are a uniform 2-subset of
    1..7; (u1, u2) and (v1, v2) follow the sequential law, which the old sorted law does not."""
    cfg = PoseSampling(seq_length=8, target_length=32, num_chunks=3)
    samples = draw(cfg, 24, 20000, seed=5)
    subsets = list(itertools.combinations(range(1, 8), 2))
    code = {subset: i for i, subset in enumerate(subsets)}
    cuts = numpy.array([code[tuple(chunk_starts(s)[1:])] for s in samples])
    assert_law(cuts, {i: 1 / len(subsets) for i in range(len(subsets))}, "cut-point pair")
    assert_joint_law([skips_of(s, "position_ids") for s in samples], sequential_pair_law(24), "(u1, u2)")
    assert_joint_law([skips_of(s, "token_index") for s in samples], sequential_pair_law(16), "(v1, v2)")
    # The same test at the same size rejects the old law (two sorted independent draws).
    rng = numpy.random.default_rng(5)
    old = [tuple(sorted(rng.integers(0, 25, 2).tolist())) for _ in range(20000)]
    with pytest.raises(AssertionError, match="rejects"):
        assert_joint_law(old, sequential_pair_law(24), "old law")
    assert_joint_law(old, sorted_iid_pair_law(24), "old law against itself")  # the helper is fair


def test_three_chunks_mean_first_skip_at_256_to_2048():
    """The figure that exposed the old law: mean u1 is 896 (sequential), not ~597 (sorted)."""
    cfg = PoseSampling(seq_length=256, target_length=2048, num_chunks=3)
    samples = draw(cfg, 256, 4000, seed=11)
    u1 = numpy.array([skips_of(s, "position_ids")[0] for s in samples])
    # Sequential: u1 ~ U{0..1792}, mean 896; sorted: the minimum of two draws, mean ~597.
    assert abs(u1.mean() - 896) < 20


def subset_law(population, size):
    """Every sorted `size`-subset of range(population), equally likely."""
    subsets = list(itertools.combinations(range(population), size))
    return {subset: 1 / len(subsets) for subset in subsets}


@pytest.mark.parametrize("doc_length", [40, 3], ids=["long-document", "short-document"])
def test_randpos_is_a_uniform_sorted_subset_of_contiguous_text(doc_length):
    """RandPos (N = L_c = 4, L_t = 10): contiguous text, positions a uniform sorted subset of
    range(10) (of 4 positions, or of n = 3 for a short document), as the authors' code draws them."""
    cfg = PoseSampling(seq_length=4, target_length=10, num_chunks=4)
    samples = draw(cfg, doc_length, 20000, seed=6)
    n = min(4, doc_length)
    assert all(s.token_index.tolist() == list(range(n)) for s in samples)
    assert all(s.chunk_lengths.tolist() == [1] * n for s in samples[:100])
    assert_joint_law([tuple(s.position_ids.tolist()) for s in samples], subset_law(10, n), "positions")
    # The old law (position 0 first, then j + sorted i.i.d. skips) fails the same test.
    rng = numpy.random.default_rng(6)
    old = [tuple((numpy.arange(n) + numpy.concatenate(([0], numpy.sort(rng.integers(0, 11 - n, n - 1))))).tolist())
           for _ in range(20000)]
    with pytest.raises(AssertionError):
        assert_joint_law(old, subset_law(10, n), "old RandPos law")


def test_randpos_ignores_content_skips():
    cfg = PoseSampling(seq_length=8, target_length=64, num_chunks=8, content="skip")
    assert cfg.is_randpos
    assert all(s.token_index.tolist() == list(range(8)) for s in draw(cfg, 400, 200, seed=12))


def test_short_documents_with_three_chunks():
    """n = 5 < L_c = 8, N = 3: whole document; cut points a uniform 2-subset of 1..4; skips follow
    the sequential law bounded by L_t - n = 27."""
    cfg = PoseSampling(seq_length=8, target_length=32, num_chunks=3)
    samples = draw(cfg, 5, 20000, seed=13)
    assert all(s.token_index.tolist() == list(range(5)) for s in samples[:200])
    subsets = list(itertools.combinations(range(1, 5), 2))
    code = {subset: i for i, subset in enumerate(subsets)}
    assert_law([code[tuple(chunk_starts(s)[1:])] for s in samples],
               {i: 1 / len(subsets) for i in range(len(subsets))}, "short cut points")
    assert_joint_law([skips_of(s, "position_ids") for s in samples], sequential_pair_law(27),
                     "short (u1, u2)")


def test_contiguous_content_keeps_text_and_skips_positions():
    cfg = PoseSampling(seq_length=8, target_length=32, content="contiguous")
    samples = draw(cfg, 500, 5000, seed=7)
    assert all(s.token_index.tolist() == list(range(8)) for s in samples)
    u1 = numpy.array([s.position_ids[s.chunk_lengths[0]] - s.chunk_lengths[0] for s in samples])
    assert_law(u1, uniform(0, 24), "contiguous-content skip")


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 8])
def test_target_equal_to_seq_length_gives_plain_positions(num_chunks):
    cfg = PoseSampling(seq_length=8, target_length=8, num_chunks=num_chunks, content="contiguous")
    for s in draw(cfg, 100, 50, seed=8):
        assert s.position_ids.tolist() == list(range(8))
        assert s.token_index.tolist() == list(range(8))


def test_same_seed_same_sample_and_seeds_differ():
    cfg = PoseSampling(seq_length=64, target_length=4096, num_chunks=3)

    def layout(seed):
        s = sample_pose(numpy.random.default_rng([seed, 17]), 1000, cfg)
        return s.token_index.tolist(), s.position_ids.tolist()

    assert layout(1) == layout(1)
    assert len({str(layout(seed)) for seed in range(20)}) == 20


def test_extra_token_settings_keep_the_input_law():
    """with_extra_token draws L_c+1 pairs; the first L_c positions keep u1 ~ U{0..L_t-L_c}."""
    cfg = PoseSampling(seq_length=8, target_length=32)
    extended = cfg.with_extra_token()
    assert (extended.seq_length, extended.target_length, extended.window) == (9, 33, 40)
    samples = draw(extended, 100, 20000, seed=9)
    inputs_last = numpy.array([s.position_ids[-2] for s in samples])
    assert inputs_last.max() == 31
    u1 = numpy.array([s.position_ids[s.chunk_lengths[0]] - s.chunk_lengths[0] for s in samples])
    assert_law(u1, uniform(0, 24), "input skip with the extra label token")
    randpos = PoseSampling(seq_length=8, target_length=32, num_chunks=8).with_extra_token()
    assert randpos.num_chunks == 9
    assert PoseSampling(8, 8, content_window=8).with_extra_token().window == 9


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seq_length=8, target_length=4), "target_length"),
        (dict(seq_length=8, target_length=32, num_chunks=0), "num_chunks"),
        (dict(seq_length=8, target_length=32, num_chunks=1), "num_chunks"),
        (dict(seq_length=8, target_length=32, num_chunks=9), "num_chunks"),
        (dict(seq_length=8, target_length=32, content_window=7), "content_window"),
        (dict(seq_length=8, target_length=32, content="random"), "content"),
        (dict(seq_length=0, target_length=32), "seq_length"),
        (dict(seq_length=8.0, target_length=32), "seq_length"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"PoseSampling\.{field}\b"):
        PoseSampling(**kwargs)


def test_unknown_content_lists_the_allowed_values():
    with pytest.raises(ValueError, match="skip.*contiguous"):
        PoseSampling(8, 32, content="uniform")


def test_empty_document_is_rejected():
    with pytest.raises(ValueError, match="at least 1 token"):
        sample_pose(numpy.random.default_rng(0), 0, PoseSampling(8, 32))


def test_distance_coverage_matches_the_reference_figures():
    """docs/reference.md, "PoSE sampling": at L_c=2048, L_t=16384 a sample covers d<=1023 always, d in 2048..12000 with
    probability ~0.143, d=15000 ~0.097, d=16000 ~0.027 (uniform gap = uniform long distances)."""
    cfg = PoseSampling(seq_length=2048, target_length=16384)
    distances = [1023, 2048, 5000, 12000, 15000, 16000]
    covered = numpy.zeros(len(distances))
    rng = numpy.random.default_rng(10)
    count = 4000
    for _ in range(count):
        occupied = numpy.zeros(16384, dtype=bool)
        occupied[sample_pose(rng, 100_000, cfg).position_ids] = True
        covered += [numpy.any(occupied[:-d] & occupied[d:]) for d in distances]
    coverage = dict(zip(distances, covered / count, strict=True))
    assert coverage[1023] == 1.0
    for d, expected in (
        (2048, 0.143),
        (5000, 0.143),
        (12000, 0.143),
        (15000, 0.097),
        (16000, 0.027),
    ):
        assert abs(coverage[d] - expected) < 0.02, (d, coverage[d], expected)
