"""Length buckets in the torch layer: sequence_length and batched_model(bucket_lengths=True)."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from batched_fn import length_buckets  # noqa: E402
from batched_fn.torch import batched_model, sequence_length  # noqa: E402
from torch_models import MaskedMean  # noqa: E402


def test_sequence_length_of_each_kind_of_example():
    ids = torch.arange(7)
    assert sequence_length(ids) == 7
    assert sequence_length(np.zeros((5, 3))) == 5
    assert sequence_length([1, 2, 3]) == 3
    assert sequence_length({"input_ids": ids, "attention_mask": torch.tensor([1, 1, 1, 0, 0, 0, 0])}) == 3
    assert sequence_length({"input_ids": ids}) == 7
    assert sequence_length({"tokens": [1, 2]}) == 2
    assert sequence_length((ids, torch.ones(7))) == 7
    with pytest.raises(TypeError, match=re.escape("sequence_length: a 0-dim Tensor has no length")):
        sequence_length(torch.tensor(3))
    with pytest.raises(TypeError, match=re.escape("sequence_length: an example of type object has no length")):
        sequence_length(object())


def test_bucket_lengths_batches_similar_lengths_together():
    model = MaskedMean()
    lengths = [3, 100, 5, 60, 4, 90, 6, 70, 2, 110, 50, 7]
    seqs = [torch.randint(1, 100, (n,)) for n in lengths]
    bucket = length_buckets(sequence_length)
    with batched_model(model, pad=True, bucket_lengths=True, max_batch_size=8, max_delay=0.2,
                       warmup=None) as predict:
        ys = [f.result(10) for f in [predict.submit(s) for s in seqs]]
        by_key = predict.stats().by_key
    with torch.no_grad():
        for s, y in zip(seqs, ys):
            torch.testing.assert_close(y, model.one(s))
    for mask in model.masks:
        assert len({bucket.bucket(int(m.sum())) for m in mask}) == 1     # one bucket per batch
    assert sorted(int(m.sum()) for mask in model.masks for m in mask) == sorted(lengths)
    assert {k: v.submitted for k, v in by_key.items()} == {8: 6, 64: 2, 128: 4}


def test_bucket_lengths_is_checked():
    with pytest.raises(ValueError, match=re.escape("invalid bucket_lengths value: it needs pad=True")):
        batched_model(MaskedMean(), bucket_lengths=True)
    with pytest.raises(TypeError, match=re.escape("invalid bucket_lengths value: expected a bool (got 'yes')")):
        batched_model(MaskedMean(), pad=True, bucket_lengths="yes")
    with pytest.raises(ValueError, match=re.escape("bucket_lengths=True sets batch_key: give one or the other")):
        batched_model(MaskedMean(), pad=True, bucket_lengths=True, batch_key=len)


def test_batch_key_is_passed_on():
    model = MaskedMean()
    with batched_model(model, pad=True, batch_key=length_buckets(sequence_length, edges=[4]), max_batch_size=8,
                       max_delay=0.2, warmup=None) as predict:
        for f in [predict.submit(torch.randint(1, 100, (n,))) for n in (2, 9, 3, 12)]:
            f.result(10)
        assert set(predict.stats().by_key) == {4, float("inf")}
