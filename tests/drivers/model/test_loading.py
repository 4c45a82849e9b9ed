"""load_model: specs, dtypes, devices, errors, and weights packed into one Text range."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from djinn.drivers.errors import BadArgument, NotFound
from djinn.drivers.model import PRESETS, ArenaLayout, ByteTokenizer, load_model, resolve_dtype
from tests.drivers.model.conftest import new_state
from tests.fakes import FakeTextAllocator, save_tiny


def _in_range(model, text: torch.Tensor) -> bool:
    lo, hi = text.data_ptr(), text.data_ptr() + text.numel()
    tensors = list(model.arch.hf.parameters()) + list(model.arch.hf.buffers())
    return all(lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi for t in tensors)


def test_demo_is_embedded_seeded_and_speaks_bytes():
    a, b = load_model("demo"), load_model("demo")
    assert (a.model_type, a.n_layers, a.hidden_size, a.dtype) == ("gpt2", 4, 256, torch.float32)
    for (na, pa), (nb, pb) in zip(a.arch.hf.named_parameters(), b.arch.hf.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    tok = a.tokenizer
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_id and tok.decode(ids) == "héllo"
    state = new_state(a, 64)
    text = tok.decode(list(a.generate(state, ids, 8)))
    assert isinstance(text, str)
    assert a.stat()["params"] == a.n_params and a.text_nbytes >= a.n_params * 4


def test_weights_are_views_into_one_text_range_and_unload_frees_it(tiny_dirs):
    alloc = FakeTextAllocator()
    model = load_model(str(tiny_dirs["gpt2"]), text_alloc=alloc)
    assert len(alloc.ranges) == 1
    assert _in_range(model, alloc.ranges[0].tensor)
    hf = model.arch.hf
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied weights placed once
    state = new_state(model)
    model.forward(state, [1, 2, 3])
    model.unload()
    model.unload()
    assert alloc.freed == 1
    with pytest.raises(NotFound):
        model.forward(state, [4])
    with pytest.raises(NotFound):
        model.new_state(state.arena, 8)


def test_weights_in_the_vmu_text_segment(tiny_dirs):
    vmu_mod = pytest.importorskip("djinn.drivers.vmu")
    vmu = vmu_mod.VMU("cpu", text_nbytes=4 << 20, data_nbytes=1 << 20, stack_nbytes=1 << 20, host_nbytes=1 << 20)
    try:
        model = load_model(str(tiny_dirs["llama"]), vmu=vmu)
        assert _in_range(model, vmu.text.tensor)
        assert vmu.text.allocator.used_nbytes >= model.text_nbytes
        model.unload()
        assert vmu.text.allocator.used_nbytes == 0
    finally:
        vmu.close()


def test_dummy_gpt2_has_real_shapes():
    model = load_model("dummy:gpt2")
    assert model.n_params == 124_439_808 and model.n_layers == 12 and model.vocab_size == 50257
    assert model.bytes_per_token == (12 * 2 * 12 * 64 + 768) * 4
    state = new_state(model, 16)
    assert len(list(model.generate(state, [1, 2, 3], 3))) == 3


@pytest.mark.parametrize(
    "spec, params_b, kv_bytes", [("dummy:llama-1b", 1.50, 32768), ("dummy:llama-8b", 8.03, 131072)]
)
def test_dummy_llama_shapes_on_meta(spec, params_b, kv_bytes):
    """The configs give MEASURED.md's sizes: 3.0 / 16 GB of bf16 weights, 32 / 128 KiB of KV per token."""
    cfg = PRESETS[spec].make_config()
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in hf.parameters())
    assert abs(n / 1e9 - params_b) < 0.01
    layout = ArenaLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size, torch.bfloat16)
    assert layout.kv_bytes_per_token == kv_bytes


def test_dtypes(tiny_dirs, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype(torch.float16, cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, cuda, "float16") == torch.float16
    assert resolve_dtype(None, cuda, "bfloat16") == torch.bfloat16
    assert resolve_dtype(None, cuda, "float32") == torch.bfloat16
    assert resolve_dtype(None, cuda, None) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, cuda, "bfloat16") == torch.float16
    for bad in ("int8", "float64", torch.int32, "fp8"):
        with pytest.raises(BadArgument):
            resolve_dtype(bad, cpu)


def test_bf16_model_runs_and_tracks_fp32(tiny_dirs):
    fp32 = load_model(str(tiny_dirs["llama"]))
    bf16 = load_model(str(tiny_dirs["llama"]), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.bytes_per_token * 2 == fp32.bytes_per_token
    assert bf16.arch.rotary.inv_freq.dtype == torch.float32  # buffers keep their dtype
    a = fp32.forward(new_state(fp32), [5, 6, 7, 8]).logits
    b = bf16.forward(new_state(bf16), [5, 6, 7, 8]).logits
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=0.1)


def test_fp16_checkpoint_loads(tmp_path):
    path = save_tiny("llama", tmp_path / "half", dtype=torch.float16)
    model = load_model(str(path))  # CPU default: float32, whatever the checkpoint holds
    assert model.dtype == torch.float32
    assert model.forward(new_state(model), [1, 2]).logits.isfinite().all()


def test_load_errors(tmp_path):
    with pytest.raises(BadArgument, match="no such local directory"):
        load_model("no-such-model")
    with pytest.raises(BadArgument, match="built-ins"):
        load_model("dummy:llama-70b")
    with pytest.raises(BadArgument):
        load_model("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadArgument, match="config.json"):
        load_model(str(empty))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(BadArgument, match="safetensors"):
        load_model(str(pickled))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    with pytest.raises(BadArgument, match="bert"):
        load_model(str(bert))
    with pytest.raises(BadArgument):
        load_model("demo", dtype="int8")
    with pytest.raises(BadArgument):
        load_model("demo", device="mps")
    with pytest.raises(BadArgument):
        load_model("demo", attn_implementation="flash_attention_2")
    if not torch.cuda.is_available():
        with pytest.raises(BadArgument, match="CUDA"):
            load_model("demo", device="cuda")


def _with_weights(tmp_path, tiny_dirs, name: str, weights: dict[str, torch.Tensor] | bytes):
    """A copy of the tiny GPT-2 directory whose model.safetensors holds `weights` (tensors, or raw bytes)."""
    d = tmp_path / name
    shutil.copytree(tiny_dirs["gpt2"], d)
    if isinstance(weights, bytes):
        (d / "model.safetensors").write_bytes(weights)
    else:
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def test_incomplete_checkpoint_is_refused_not_randomly_filled(tmp_path, tiny_dirs):
    full = load_file(str(tiny_dirs["gpt2"] / "model.safetensors"))
    alloc = FakeTextAllocator()
    with pytest.raises(BadArgument, match=r"(\d+) of the \1 tensors .* missing"):
        load_model(_with_weights(tmp_path, tiny_dirs, "none", {"unrelated": torch.zeros(2)}), text_alloc=alloc)
    some = {k: v for k, v in full.items() if k != "transformer.ln_f.weight"}
    with pytest.raises(BadArgument, match=r"1 of the .* missing .*ln_f\.weight"):
        load_model(_with_weights(tmp_path, tiny_dirs, "some", some), text_alloc=alloc)
    bad_shape = dict(full, **{"transformer.ln_f.bias": torch.zeros(3)})
    with pytest.raises(BadArgument, match=r"wrong shape .*ln_f\.bias"):
        load_model(_with_weights(tmp_path, tiny_dirs, "shape", bad_shape), text_alloc=alloc)
    assert alloc.ranges == []  # refused before any Text was taken


@pytest.mark.parametrize("content", [b"", b"\x08" + bytes(7) + b"not json" + bytes(64), bytes(1000)],
                         ids=["empty", "bad-header", "zeros"])
def test_unreadable_safetensors_is_bad_argument_naming_the_file(tmp_path, tiny_dirs, content):
    with pytest.raises(BadArgument, match="model.safetensors"):
        load_model(_with_weights(tmp_path, tiny_dirs, "bad", content))


def test_other_weight_file_names_are_bad_argument(tmp_path, tiny_dirs):
    d = tmp_path / "renamed"
    shutil.copytree(tiny_dirs["gpt2"], d)
    (d / "model.safetensors").rename(d / "weights.safetensors")
    with pytest.raises(BadArgument, match="model.safetensors"):
        load_model(str(d))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tied_lm_head_is_not_missing(tmp_path, kind):
    path = save_tiny(kind, tmp_path / kind, tie_word_embeddings=True)
    assert not any("lm_head" in k for k in load_file(str(path / "model.safetensors")))
    model = load_model(str(path))
    hf = model.arch.hf
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    assert model.forward(new_state(model), [1, 2]).logits.isfinite().all()
