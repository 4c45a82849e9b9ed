"""Bad model input through the daemon: unknown specs, directories that are not models, dtypes, top_p, and
text that continues a session.

Every refusal must be EINVAL (or EEXIST for a name taken in another dtype), register nothing, and leave the
daemon and the sessions already open working as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import djinn
from djinn.drivers.model.tokenizer import BOS_ID
from tests.fakes import save_tiny

PROMPT = [5, 17, 42, 99]


@pytest.fixture
def live(kernel):
    """A session on the boot model with a few tokens in it; after the test it must still run, and the
    daemon must list the same models."""
    before = kernel.syscall("models")
    with kernel.open_session(max_tokens=32) as s:
        s.forward(PROMPT)
        yield s
        assert s.forward([7]).position == len(PROMPT) + 1
    assert kernel.syscall("models") == before
    assert kernel.syscall("nop") == {}


@pytest.fixture(scope="module")
def broken_dirs(tmp_path_factory) -> dict[str, Path]:
    """Directories with a valid tiny GPT-2 config.json whose weights are not that model's."""
    root = tmp_path_factory.mktemp("not-models")
    good = save_tiny("gpt2", root / "good")
    weights = load_file(str(good / "model.safetensors"))
    out = {}
    for case in ("none", "some", "empty", "corrupt"):
        d = root / case
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        out[case] = d
    save_file({"unrelated": torch.zeros(4)}, str(out["none"] / "model.safetensors"))
    some = dict(weights)
    some.pop("transformer.h.0.attn.c_attn.weight")
    save_file(some, str(out["some"] / "model.safetensors"), metadata={"format": "pt"})
    (out["empty"] / "model.safetensors").write_bytes(b"")
    (out["corrupt"] / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + bytes(64))
    return out


@pytest.mark.parametrize("spec", ["dummy:nope", "no-such-name", "/no/such/model/dir"])
def test_unknown_spec_is_einval(kernel, live, spec):
    with pytest.raises(djinn.errors.EINVAL, match="nothing is downloaded|built-ins"):
        kernel.load_model(spec)


@pytest.mark.parametrize("case, needle", [
    ("none", "missing"), ("some", "c_attn.weight"), ("empty", "model.safetensors"), ("corrupt", "model.safetensors"),
])
def test_directory_that_is_not_a_model_is_einval(kernel, live, broken_dirs, case, needle):
    with pytest.raises(djinn.errors.EINVAL, match=needle):
        kernel.load_model(str(broken_dirs[case]), name=f"broken-{case}")


def test_invalid_dtype_is_einval_loaded_or_not(kernel, live):
    with pytest.raises(djinn.errors.EINVAL, match="dtype"):
        kernel.load_model("demo", dtype="int8")  # the boot model
    with pytest.raises(djinn.errors.EINVAL, match="dtype"):
        kernel.load_model("demo", name="demo-int8", dtype="int8")  # a name not loaded


def test_other_dtype_of_a_loaded_model_is_eexist(kernel, live):
    loaded = kernel.load_model("demo")
    assert loaded["dtype"] == "float32"  # the CPU daemon's default
    with pytest.raises(djinn.errors.EEXIST, match="unload it first .* another name"):
        kernel.load_model("demo", dtype="bfloat16")
    for same in ("float32", "fp32", None):
        assert kernel.load_model("demo", dtype=same)["name"] == "demo"


def test_top_p_zero_is_refused_by_the_schema(kernel, live):
    with pytest.raises(djinn.errors.EINVAL, match="'top_p' must be > 0"):
        live.generate([1], max_new_tokens=1, temperature=1.0, top_p=0.0)


def test_text_continuing_a_session_gets_no_bos(kernel):
    with kernel.open_session(max_tokens=32) as a, kernel.open_session(max_tokens=32) as b:
        first = a.forward("ab")
        assert first.position == 3  # BOS, a, b
        got = a.forward("cd")
        assert got.position == 5
        ref = b.forward([BOS_ID, *b"abcd"])
        assert torch.allclose(got.logits, ref.logits, atol=1e-5, rtol=0)
        assert a.generate("e", max_new_tokens=2) == b.generate([ord("e")], max_new_tokens=2)
