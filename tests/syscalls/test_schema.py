"""The argument validator: defaults, types, ranges, unknown arguments; errors name the argument."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from djinn.kernel.errors import EINVAL
from djinn.syscalls.schema import Arg, validate

SPEC = (
    Arg("session", "session"),
    Arg("n", "int", required=False, default=4, min=1, max=10),
    Arg("mode", "str", required=False, default="last", choices=("last", "all")),
    Arg("ids", "ids", required=False),
)


def test_defaults_filled():
    assert validate("x", SPEC, {"session": "s-1"}) == {"session": "s-1", "n": 4, "mode": "last", "ids": None}


@pytest.mark.parametrize("args,needle", [
    ({}, "'session' is required"),
    ({"session": 3}, "'session' must be a session id"),
    ({"session": "s", "n": "4"}, "'n' must be an integer"),
    ({"session": "s", "n": True}, "'n' must be an integer"),
    ({"session": "s", "n": 0}, "'n' must be >= 1"),
    ({"session": "s", "n": 11}, "'n' must be <= 10"),
    ({"session": "s", "mode": "some"}, "'mode' must be one of"),
    ({"session": "s", "ids": [1.5]}, "'ids' must be token ids"),
    ({"session": "s", "ids": torch.zeros(3)}, "'ids' must be token ids"),
    ({"session": "s", "typo": 1}, "unknown argument(s) typo"),
])
def test_errors_name_the_argument(args, needle):
    with pytest.raises(EINVAL) as e:
        validate("x", SPEC, args)
    assert needle in e.value.message


def test_args_must_be_a_map():
    with pytest.raises(EINVAL, match="must be a map"):
        validate("x", SPEC, [1, 2])


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(), st.none(), st.floats()), max_size=5))
def test_arbitrary_args_only_raise_einval(args):
    try:
        validate("x", SPEC, args)
    except EINVAL:
        pass
