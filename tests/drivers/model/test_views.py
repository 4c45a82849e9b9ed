"""The driver's shortcuts that replace a kernel launch or a view op per forward give what the long way gives."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.errors import BadArgument
from djinn.drivers.model.cache import ArenaCache
from djinn.drivers.model.validate import check_ids


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_position_ids_are_views_of_one_table(tiny, kind):
    arch = tiny(kind).arch
    table = arch.positions(0, arch.max_positions)
    for start, n in [(0, 1), (0, 7), (5, 3), (arch.max_positions - 2, 2)]:
        pos = arch.positions(start, n)
        assert torch.equal(pos, torch.arange(start, start + n).unsqueeze(0))
        assert pos.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()  # no new tensor
    # Past the model's positions (the plans' meta runs round shapes up): a fresh range, still right.
    past = arch.positions(arch.max_positions - 1, 3)
    assert torch.equal(past, torch.arange(arch.max_positions - 1, arch.max_positions + 2).unsqueeze(0))


def test_gpt2_embedding_of_a_contiguous_span_is_bitwise_the_gather(tiny):
    arch = tiny("gpt2").arch
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for start in (0, 2, arch.max_positions - 5):
        pos = arch.positions(start, 5)
        with torch.inference_mode():
            gathered = arch.wte(ids) + arch.wpe(pos)
            assert torch.equal(arch.embed(ids, pos, start), gathered)
            assert torch.equal(arch.embed(ids, pos), gathered)


def test_cache_row_views_are_each_layers_k_and_v():
    n_layers, heads, dim, tokens = 3, 2, 4, 6
    kv = torch.arange(tokens * n_layers * 2 * heads * dim, dtype=torch.float32)
    kv = kv.view(tokens, n_layers, 2, heads, dim)
    cache = ArenaCache(n_layers)
    cache.bind(kv, 0, 1)
    assert len(cache._rows) == n_layers
    for i, (k, v) in enumerate(cache._rows):
        for got, want in ((k, kv[:, i, 0]), (v, kv[:, i, 1])):
            assert got.shape == want.shape and got.stride() == want.stride()
            assert got.data_ptr() == want.data_ptr()


def test_host_ids_are_range_checked_like_device_ones():
    assert torch.equal(check_ids(torch.tensor([0, 9]), 10), torch.tensor([0, 9]))
    assert check_ids(torch.tensor([[2, 3]], dtype=torch.int32), 10).dtype == torch.long
    for bad in ([-1, 2], [0, 10]):
        with pytest.raises(BadArgument, match="outside the vocabulary"):
            check_ids(torch.tensor(bad), 10)
