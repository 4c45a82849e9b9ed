"""check_ids: a sequence comes back as a list, a tensor as a 1-D int64 tensor; the same checks either way."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.errors import BadArgument
from djinn.drivers.model.validate import check_ids
from tests.drivers.model.conftest import new_state

VOCAB = 300


def test_a_list_stays_a_list() -> None:
    assert check_ids([5, 17, 42], VOCAB) == [5, 17, 42]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("shape", [(6,), (1, 6)])
def test_a_tensor_stays_a_long_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.tensor([5, 17, 42, 99, 7, 250], dtype=dtype).reshape(shape)
    ids = check_ids(t, VOCAB)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == [5, 17, 42, 99, 7, 250]


@pytest.mark.parametrize("bad", [[5, 300, 7], [-1, 5], [299, 1000, 3000]])
def test_ids_outside_the_vocabulary_are_refused_alike(bad: list[int]) -> None:
    errors = []
    for given in (bad, torch.tensor(bad)):
        with pytest.raises(BadArgument, match="outside the vocabulary") as info:
            check_ids(given, VOCAB)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_empty_input_is_refused_unless_allowed() -> None:
    for given in ([], torch.tensor([], dtype=torch.long)):
        with pytest.raises(BadArgument, match="empty"):
            check_ids(given, VOCAB)
        assert len(check_ids(given, VOCAB, allow_empty=True)) == 0


def test_other_tensors_are_refused() -> None:
    with pytest.raises(BadArgument, match="integer tensor"):
        check_ids(torch.tensor([1.0, 2.0]), VOCAB)
    with pytest.raises(BadArgument, match="shape"):
        check_ids(torch.ones(2, 3, dtype=torch.long), VOCAB)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_tensor_prompt_gives_the_logits_of_the_list(tiny, kind: str) -> None:
    model = tiny(kind, "sdpa")
    prompt = [5, 17, 42, 99, 7, 250, 3, 64]
    a, b = new_state(model, 32), new_state(model, 32)
    by_list = model.forward(a, prompt, return_logits="all").logits
    by_tensor = model.forward(b, torch.tensor(prompt), return_logits="all").logits
    assert torch.equal(by_list, by_tensor)
    gen_list = list(model.generate(a, [9], 4))
    gen_tensor = list(model.generate(b, torch.tensor([9]), 4))
    assert gen_list == gen_tensor and a.unfed_ids == b.unfed_ids == [gen_list[-1]]
    after_list = model.forward(a, torch.tensor([11, 12]), return_logits="last").logits  # unfed token first
    after_tensor = model.forward(b, [11, 12], return_logits="last").logits
    assert torch.equal(after_list, after_tensor) and a.position == b.position
