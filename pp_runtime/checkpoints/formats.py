"""Read Mistral consolidated and Hugging Face checkpoints, one stage at a time; random weights and a
streaming safetensors writer for checkpoints too large to hold in memory.

Weights are always handed out under our (Mistral consolidated) names, so a stage loads the same
way whatever the source. Checkpoints hold one tensor per expert (`layers.N.feed_forward.experts.E.w1.weight`);
a loaded module stacks them per layer (`moe.stack_experts_`). Only the tensors a stage needs are read
(safetensors `safe_open`), and Hugging Face's rotary row permutation of wq/wk is undone on the way in.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from pp_runtime.errors import CheckpointError, ConfigError
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.moe import stack_experts_, unstack_experts
from pp_runtime.model.partition import StageSpec
from pp_runtime.model.transformer import StageModule

Format = Literal["mistral", "hf"]
HF_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------- format & args
def detect_format(path: str | Path) -> Format:
    """Tell a Mistral consolidated folder from a Hugging Face one (repos holding both read as Mistral)."""
    path = _require_dir(path)
    has_params, has_config = (path / "params.json").is_file(), (path / "config.json").is_file()
    if has_params and any(path.glob("consolidated*.safetensors")):
        return "mistral"
    if has_config and (any(path.glob("model*.safetensors")) or (path / HF_INDEX).is_file()):
        return "hf"
    if has_params:
        return "mistral"
    if has_config:
        return "hf"
    raise CheckpointError(
        f"{path} has neither params.json (Mistral consolidated format) nor config.json (Hugging Face format); "
        "point model.path at the folder that holds the checkpoint"
    )


def load_model_args(path: str | Path) -> ModelArgs:
    """Model hyper-parameters from the config file that matches the detected format."""
    path = Path(path)
    name = "params.json" if detect_format(path) == "mistral" else "config.json"
    try:
        data = json.loads((path / name).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path / name} is not valid JSON ({e})") from None
    return ModelArgs.from_params_json(data) if name == "params.json" else ModelArgs.from_hf_config(data)


def _require_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(path)!r} does not exist; set model.path to a folder holding "
            "params.json + consolidated.safetensors or config.json + model*.safetensors"
        )
    return path


# ---------------------------------------------------------------------------------- shapes
def full_spec(args: ModelArgs) -> StageSpec:
    """A single stage holding the whole model."""
    return StageSpec(index=0, rank=0, first=0, last=args.n_layers, has_embedding=True, has_head=True)


def stage_shapes(args: ModelArgs, spec: StageSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor the stage holds, taken from the model itself (built on
    meta); experts are listed one by one, as checkpoints store them."""
    if spec.last > args.n_layers:
        raise ConfigError(f"stage {spec.index} covers layers up to {spec.last - 1} but the model has {args.n_layers}")
    with torch.device("meta"):
        module = StageModule(args, spec)
    return {k: tuple(v.shape) for k, v in unstack_experts(module.state_dict()).items()}


# ---------------------------------------------------------------------------------- rotary permutation
def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows (Mistral) -> half-split rows per head (what HF's rotate_half expects);
    `unpermute_from_hf` undoes it."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's half-split rows per head (what its rotate_half expects) -> Mistral's interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def open_safetensors(path: Path):
    """`safe_open` whose failure on a damaged file (truncated, empty, not safetensors) is one line."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
                              "copy or download it again") from None


def check_finite(t: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """Weights holding NaN or inf would turn every output into garbage: refuse them, naming the tensor.
    One reduction per tensor at load, on the device the tensor lives on."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN/inf value(s) of {t.numel()}; the checkpoint "
                              "is damaged (or was saved from a diverged run): use another one")
    return t


# ---------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class _Source:
    """Where one of our tensors lives in the checkpoint and how to turn it into our layout."""

    file: Path
    key: str
    raw_shape: tuple[int, ...]  # shape the stored tensor must have
    expert: Optional[int] = None  # index into a fused [n_experts, ...] tensor
    half: Optional[int] = None  # 0: first half of rows (gate, w1), 1: second half (up, w3)
    unpermute_heads: Optional[int] = None  # undo HF's rotary permutation with this many heads


class _CheckpointIndex:
    """All tensor names of a checkpoint and the file each lives in (headers only, no data read)."""

    def __init__(self, path: Path, fmt: Format) -> None:
        self.path, self.fmt = path, fmt
        self.config_name = "params.json" if fmt == "mistral" else "config.json"
        self.key_file: dict[str, Path] = (
            self._read_index(path / HF_INDEX) if fmt == "hf" and (path / HF_INDEX).is_file() else {}
        )
        if not self.key_file:
            for f in self._weight_files():
                with open_safetensors(f) as h:
                    self.key_file.update({k: f for k in h.keys()})

    def _weight_files(self) -> list[Path]:
        pattern = "consolidated*.safetensors" if self.fmt == "mistral" else "model*.safetensors"
        files = sorted(self.path.glob(pattern)) or sorted(self.path.glob("*.safetensors"))
        if not files:
            pth = sorted(p.name for p in self.path.glob("*.pth")) + sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {', '.join(pth)}: convert it to safetensors first)" if pth else ""
            raise CheckpointError(
                f"{self.path} has {self.config_name} but no {pattern} weight file{hint}; "
                "copy the weights next to the config or point model.path at the right folder"
            )
        return files

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index ({e!r}); re-download or re-save it"
            ) from None
        files = {name: self.path / name for name in set(weight_map.values())}
        missing = sorted(n for n, f in files.items() if not f.is_file())
        if missing:
            raise CheckpointError(
                f"{index} lists {', '.join(missing)} but the file is not in {self.path}; the download is incomplete"
            )
        return {k: files[v] for k, v in weight_map.items()}


_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_MOE_PREFIXES = ("block_sparse_moe", "mlp")  # transformers < 5 / >= 5 module names
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_EXPERT_RE = re.compile(r"^feed_forward\.experts\.(\d+)\.(w[123])$")


def _hf_source(
    index: _CheckpointIndex, args: ModelArgs, name: str, shape: tuple[int, ...], tied: bool
) -> Optional[_Source]:
    """Find our tensor `name` among HF keys: plain, per-expert (old layout) or fused experts (v5 layout)."""
    kf = index.key_file
    if name in _HF_TOP_NAMES:
        key = _HF_TOP_NAMES[name]
        if key not in kf and name == "output.weight" and tied:
            key = _HF_TOP_NAMES["tok_embeddings.weight"]
        return _Source(kf[key], key, shape) if key in kf else None
    m = _LAYER_RE.match(name)
    assert m, name
    layer, rest = int(m.group(1)), m.group(2)
    base = f"model.layers.{layer}"
    if rest in _HF_LAYER_NAMES:
        key = f"{base}.{_HF_LAYER_NAMES[rest]}.weight"
        heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(rest)
        return _Source(kf[key], key, shape, unpermute_heads=heads) if key in kf else None
    if rest == "feed_forward.gate":
        keys = [f"{base}.{p}.gate.weight" for p in _MOE_PREFIXES]
        return next((_Source(kf[k], k, shape) for k in keys if k in kf), None)
    e = _EXPERT_RE.match(rest)
    assert e, name
    n_exp = args.moe.num_experts if args.moe else 0
    return _hf_expert_source(kf, base, int(e.group(1)), e.group(2), shape, n_exp)


def _hf_expert_source(
    kf: dict[str, Path], base: str, expert: int, w: str, shape: tuple[int, ...], n_exp: int
) -> Optional[_Source]:
    """One expert's w1/w2/w3: its own tensor, or its slice of the fused `gate_up_proj` / `down_proj`."""
    for p in _MOE_PREFIXES:
        key = f"{base}.{p}.experts.{expert}.{w}.weight"
        if key in kf:
            return _Source(kf[key], key, shape)
    for p in _MOE_PREFIXES:
        down, gate_up = f"{base}.{p}.experts.down_proj", f"{base}.{p}.experts.gate_up_proj"
        if w == "w2" and down in kf:
            return _Source(kf[down], down, (n_exp, *shape), expert=expert)
        if w != "w2" and gate_up in kf:  # rows [0, H) are the gate (w1), [H, 2H) the up projection (w3)
            return _Source(
                kf[gate_up], gate_up, (n_exp, 2 * shape[0], shape[1]), expert=expert, half=0 if w == "w1" else 1
            )
    return None


def _hf_ties_embeddings(path: Path) -> bool:
    """Whether config.json says the output head reuses the embedding (then lm_head may be absent)."""
    try:
        return bool(json.loads((path / "config.json").read_text()).get("tie_word_embeddings"))
    except (OSError, json.JSONDecodeError):
        return False


def _sources(index: _CheckpointIndex, args: ModelArgs, shapes: dict[str, tuple[int, ...]]) -> dict[str, _Source]:
    """Locate every needed tensor, failing with one message that lists all missing ones."""
    tied = index.fmt == "hf" and _hf_ties_embeddings(index.path)
    found: dict[str, Optional[_Source]] = {}
    for name, shape in shapes.items():
        if index.fmt == "mistral":
            found[name] = _Source(index.key_file[name], name, shape) if name in index.key_file else None
        else:
            found[name] = _hf_source(index, args, name, shape, tied)
    missing = [n for n, s in found.items() if s is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"checkpoint {index.path} lacks {len(missing)} tensor(s) this stage needs: {shown}; "
            f"the checkpoint is incomplete or its {index.config_name} describes a different model"
        )
    return {n: s for n, s in found.items() if s is not None}


def _check_no_extra_layers(index: _CheckpointIndex, args: ModelArgs) -> None:
    """Weights for layers or experts the config does not know about mean the config is wrong."""
    layer_re = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
    expert_re = re.compile(r"\.experts\.(\d+)\.")
    layers = {int(m.group(1)) for k in index.key_file if (m := layer_re.match(k))}
    if layers and max(layers) >= args.n_layers:
        raise CheckpointError(
            f"checkpoint {index.path} holds weights for layers 0-{max(layers)} but {index.config_name} says "
            f"n_layers={args.n_layers}: the {index.config_name} does not match the weights (it should say {max(layers) + 1})"
        )
    experts = {int(m.group(1)) for k in index.key_file if (m := expert_re.search(k))}
    n_exp = args.moe.num_experts if args.moe else 0
    if experts and max(experts) >= n_exp:
        said = f"num_experts={n_exp}" if n_exp else "a dense model (no mixture of experts)"
        raise CheckpointError(
            f"checkpoint {index.path} holds {max(experts) + 1} experts per layer but {index.config_name} describes {said}: "
            f"the {index.config_name} does not match the weights"
        )


# ---------------------------------------------------------------------------------- loading
def _check_shape(index: _CheckpointIndex, handle, name: str, src: _Source) -> None:
    """Compare the stored header shape with what the config implies, before any data is read."""
    actual = tuple(handle.get_slice(src.key).get_shape())
    if actual != src.raw_shape:
        label = name if src.key == name else f"{src.key} (our {name})"
        raise CheckpointError(
            f"{label} has shape {list(actual)} but {index.config_name} implies {list(src.raw_shape)}: "
            f"the {index.config_name} does not match the weights"
        )


def _read(handle, src: _Source) -> torch.Tensor:
    """Read one tensor (or just one expert's rows of a fused tensor) and convert it to our layout."""
    if src.expert is None:
        t = handle.get_tensor(src.key)
    elif src.half is None:
        t = handle.get_slice(src.key)[src.expert]
    else:
        rows = src.raw_shape[1] // 2
        t = handle.get_slice(src.key)[src.expert, src.half * rows : (src.half + 1) * rows]
    if src.unpermute_heads is not None:
        t = unpermute_from_hf(t, src.unpermute_heads)
    return t


def load_stage_state(
    path: str | Path,
    args: ModelArgs,
    spec: StageSpec,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read only the tensors stage `spec` holds, under our names, as `dtype` (default: as stored) on `device`."""
    path = _require_dir(path)
    index = _CheckpointIndex(path, detect_format(path))
    _check_no_extra_layers(index, args)
    sources = _sources(index, args, stage_shapes(args, spec))
    with ExitStack() as stack:
        files = sorted({s.file for s in sources.values()})
        handles = {f: stack.enter_context(open_safetensors(f)) for f in files}
        for name, src in sources.items():  # every header is checked before any data is read
            _check_shape(index, handles[src.file], name, src)
        return {
            name: check_finite(_read(handles[src.file], src).to(device=device, dtype=dtype).contiguous(), src.key,
                               src.file)
            for name, src in sources.items()
        }


def load_stage_module(
    path: str | Path,
    args: ModelArgs,
    spec: StageSpec,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
) -> StageModule:
    """Build the stage on the meta device, then adopt the loaded tensors (experts stacked layer by
    layer, so at most one layer's expert weights are held twice)."""
    state = load_stage_state(path, args, spec, dtype, device)
    with torch.device("meta"):
        module = StageModule(args, spec)
    module.load_state_dict(stack_experts_(state), strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer that is not in checkpoints would need its own initialisation here
        raise CheckpointError(f"stage {spec.index} has tensors not stored in checkpoints: {', '.join(left)}")
    return module


# ---------------------------------------------------------------------------------- random weights
def random_tensor(name: str, shape: Sequence[int], seed: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """One tensor of a random model, seeded by name so any subset can be made alone and in any order.

    Drawn on `device`: a GPU writes a 7B model in seconds, but its numbers differ from the CPU's."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return (torch.randn(tuple(shape), generator=gen, device=device) * 0.02).to(dtype)


SAFETENSORS_DTYPES = {  # torch dtype -> safetensors header name
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}  # header name -> torch dtype


def write_safetensors_streaming(
    path: str | Path,
    entries: Iterable[tuple[str, Sequence[int], torch.dtype]],
    make: Callable[[str], torch.Tensor],
) -> None:
    """Write one .safetensors file tensor by tensor: the header is known from shapes, data is appended.

    `make(name)` is called once per entry, in order; only one tensor is alive at a time.
    """
    entries = [(n, tuple(int(s) for s in shape), dt) for n, shape, dt in entries]
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dt in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dt in entries:
            t = make(name)
            if tuple(t.shape) != shape or t.dtype != dt:
                raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, header says {shape} {dt}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
