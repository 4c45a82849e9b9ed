"""load_model: turn a spec into a LoadedModel whose weights sit in one Text range on the device.

Rules:
- Specs: "demo" (seeded, embedded), "dummy:gpt2" | "dummy:llama-1b" | "dummy:llama-8b" (random
  weights made on the device), or a local Hugging Face directory with config.json and *.safetensors
  (GPT-2, Llama, Mistral, Qwen2, Qwen3). Nothing is ever downloaded.
- A spec that names nothing (no built-in, no such directory) and a directory that is not a whole
  checkpoint of its config (a tensor missing or of the wrong shape, an unreadable .safetensors file)
  are bad arguments: nothing is loaded, and no weight is ever left at its random init.
- dtype: float32 by default on the CPU. On CUDA by default the checkpoint's own half precision (bf16 or
  fp16); an fp32 or unspecified checkpoint, and the built-in models, get bf16 (fp16 where the GPU lacks
  bf16). Any of float32 / bfloat16 / float16 may be asked for explicitly.
- Memory: a checkpoint is read on the host, then each tensor is copied into the Text range, so the
  device never holds a second copy of the weights; dummy models are built on the meta device and filled
  in place (seconds for 8B on a GPU, no HF init).
- On CUDA, cuDNN's SDPA backend is switched off process-wide: it re-plans on every new KV length
  (MEASURED.md: 70 ms per GPT-2 decode step).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..errors import BadArgument
from .arch import SUPPORTED_MODEL_TYPES
from .model import LoadedModel
from .plans import register_meta_attention
from .presets import DEMO_SEED, PRESETS, preset_for
from .tokenizer import ByteTokenizer, Tokenizer, load_hf_tokenizer
from .weights import (
    TextAllocator,
    materialize_meta_buffers,
    pack_into_text,
    plain_text_allocator,
    random_fill,
    text_allocator_from_vmu,
)

__all__ = ["load_model", "resolve_device", "resolve_dtype", "ATTN_IMPLEMENTATIONS"]

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_HALF = (torch.bfloat16, torch.float16)


def resolve_device(device: Any) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (a torch.device works too). Raises BadArgument otherwise or without CUDA."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadArgument(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadArgument(f"device {device!r} asked for, but CUDA is not available on this machine")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < torch.cuda.device_count():
            raise BadArgument(f"no CUDA device {index}; this machine has {torch.cuda.device_count()}")
        return torch.device("cuda", index)
    raise BadArgument(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")


def _as_dtype(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value
    return _DTYPES.get(str(value).removeprefix("torch.").lower())


def resolve_dtype(dtype: Any, device: torch.device, checkpoint_dtype: Any = None) -> torch.dtype:
    """The dtype to run in (see the module rules). Raises BadArgument for anything but fp32/bf16/fp16."""
    if dtype is not None:
        dt = _as_dtype(dtype)
        if dt not in (torch.float32, *_HALF):
            raise BadArgument(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
        return dt
    if device.type == "cpu":
        return torch.float32
    ck = _as_dtype(checkpoint_dtype)
    if ck in _HALF and (ck != torch.bfloat16 or torch.cuda.is_bf16_supported()):
        return ck
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _model_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(PRESETS)
        raise BadArgument(
            f"no model {spec!r}: not a built-in ({known}) and no such local directory; nothing is downloaded"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BadArgument(f"{spec!r} is not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            raise BadArgument(f"{spec!r} holds only pickled .bin weights; convert them to safetensors")
        raise BadArgument(f"{spec!r} has no *.safetensors weights")
    return path


def _checkpoint_dtype(path: Path, cfg: PretrainedConfig) -> Any:
    got = getattr(cfg, "dtype", None)
    if got is None:
        raw = json.loads((path / "config.json").read_text())
        got = raw.get("dtype", raw.get("torch_dtype"))
    return got


def _from_checkpoint(spec: str, path: Path, dtype: torch.dtype, attn: str) -> nn.Module:
    """The checkpoint in `path` as an HF model on the host. Raises BadArgument when a file cannot be read
    or the files do not hold every tensor the config needs at its shape: transformers would only log
    that and leave those weights at their random init. Tied weights (lm_head) are not missing."""
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, attn_implementation=attn,
            output_loading_info=True, ignore_mismatched_sizes=True,  # reported in info, refused below
        )
    except SafetensorError as e:
        raise BadArgument(f"{spec!r}: unreadable weights ({_unreadable(path)}): {e}") from None
    except OSError as e:
        raise BadArgument(f"{spec!r}: cannot load the checkpoint: {e}") from None
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        n_model = len(hf.state_dict())
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the {n_model} tensors a {hf.config.model_type!r} model of this "
                            f"config needs are missing (e.g. {', '.join(missing[:3])})")
        if mismatched:
            problems.append(f"{len(mismatched)} have the wrong shape (e.g. {', '.join(mismatched[:3])})")
        raise BadArgument(f"{spec!r} is not a checkpoint of its config.json: {'; '.join(problems)}; "
                          "point load_model at a complete Hugging Face model directory")
    return hf


def _unreadable(path: Path) -> str:
    """The .safetensors files in `path` whose header cannot be read, by name (all of them if none fails
    on its own: the error came from reading a tensor)."""
    files = sorted(path.glob("*.safetensors"))
    bad = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError):
            bad.append(f.name)
    return ", ".join(bad or [f.name for f in files])


def _meta_factory(cfg: PretrainedConfig, dtype: torch.dtype, attn: str) -> Callable[[], nn.Module]:
    meta_attn = register_meta_attention() if attn == "sdpa" else attn
    cfg = copy.deepcopy(cfg)  # from_config sets the attention on the config: never touch the live model's

    def build() -> nn.Module:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=dtype, attn_implementation=meta_attn)
        return hf.eval()

    return build


def load_model(
    spec: str,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    vmu: Any = None,
    text_alloc: TextAllocator | None = None,
    attn_implementation: str = "sdpa",
    name: str | None = None,
) -> LoadedModel:
    """Load `spec` onto `device` (see the module rules). Weights go into one range from `text_alloc`,
    else from `vmu`'s Text segment, else a plain device tensor.

    Raises BadArgument (unknown spec, missing or not-a-model directory, incomplete or unreadable
    checkpoint, unsupported family, bad dtype/device/attention), OutOfMemory (from the text allocator).
    """
    if not isinstance(spec, str) or not spec:
        raise BadArgument(f"model spec must be a non-empty string, got {spec!r}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise BadArgument(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    dev = resolve_device(device)
    preset = preset_for(spec)
    if preset is None and spec.startswith("dummy:"):
        raise BadArgument(f"no built-in model {spec!r}; built-ins: {', '.join(PRESETS)}")
    tokenizer: Tokenizer | None
    path: Path | None = None
    if preset is not None:
        cfg = preset.make_config()
        dt = resolve_dtype(dtype, dev)
        tokenizer = ByteTokenizer()
    else:
        path = _model_dir(spec)
        try:
            cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise BadArgument(f"{spec!r}: unreadable config.json: {e}") from None
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise BadArgument(
                f"{spec!r} is a {cfg.model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        dt = resolve_dtype(dtype, dev, _checkpoint_dtype(path, cfg))
        tokenizer = load_hf_tokenizer(path)
    alloc = text_alloc or (text_allocator_from_vmu(vmu) if vmu is not None else plain_text_allocator(dev))

    if preset is not None and preset.seeded:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_SEED)
            hf = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
        text = pack_into_text(hf, alloc, dt)
    elif preset is not None:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation=attn_implementation)
        materialize_meta_buffers(hf)
        text = pack_into_text(hf, alloc, dt, fill=random_fill(dev))
    else:
        assert path is not None
        hf = _from_checkpoint(spec, path, dt, attn_implementation)
        text = pack_into_text(hf, alloc, dt)
    hf.eval()
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return LoadedModel(
        spec=spec,
        name=name or (path.name if path is not None else spec),
        hf=hf,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        text=text,
        meta_factory=_meta_factory(hf.config, dt, attn_implementation),
    )
