"""The GPU staging's bookkeeping, run on the CPU with stand-in streams and events."""

import contextlib
import math

import pytest
import torch

from pymerge import staging
from pymerge.errors import NonFiniteError


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def cuda_staging(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return staging.CudaStaging(torch.device("cpu"))


def _get(t):
    return lambda pin_memory=False: t.clone()


def test_nan_flags_are_checked_one_item_behind_and_at_the_end(cuda_staging):
    good, bad = torch.ones(3), torch.tensor([1.0, math.nan])
    s = cuda_staging
    with s.uploading():
        s.read(_get(good), True, "a")
        s.read(_get(bad), True, "b holds NaN")
    s.uploaded()  # the item just uploaded is not checked yet: no stall on its copies
    with s.uploading():
        s.read(_get(good), True, "c")
    with pytest.raises(NonFiniteError, match="b holds NaN"):
        s.uploaded()  # ... it is when the next item has been issued


def test_the_last_item_is_checked_by_finish(cuda_staging):
    s = cuda_staging
    with s.uploading():
        s.read(_get(torch.tensor([math.inf])), True, "last")
    s.uploaded()
    with pytest.raises(NonFiniteError, match="last"):
        s.finish()


def test_unchecked_reads_and_empty_tensors_pass(cuda_staging):
    s = cuda_staging
    with s.uploading():
        s.read(_get(torch.tensor([math.nan])), False, "allowed")
        s.read(_get(torch.empty(0)), True, "empty")
        s.read(_get(torch.tensor([1, 2])), True, "ints")
    s.uploaded()
    s.finish()


def test_tensors_in_walks_nested_items():
    a, b, c = torch.zeros(1), torch.ones(1), torch.ones(2)
    assert [id(t) for t in staging.tensors_in((a, [b, {"x": c}], None, 3))] == [id(a), id(b), id(c)]
