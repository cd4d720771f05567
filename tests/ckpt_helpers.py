"""Checkpoint writers and whole random models that only the tests use: Mistral consolidated and
Hugging Face folders from a state dict under our names (the library only reads these formats; its
own writers are the fine-tuning export, pp_runtime.training.checkpoint, and the streaming random
checkpoint, pp_runtime.checkpoints.random_weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file

from pp_runtime.model.args import ModelArgs
from pp_runtime.checkpoints.formats import (_EXPERT_RE, _HF_LAYER_NAMES, _HF_TOP_NAMES, _LAYER_RE, HF_INDEX, full_spec, permute_for_hf,
                                   random_tensor, stage_shapes)
from pp_runtime.errors import CheckpointError
from pp_runtime.model.moe import unstack_experts
from pp_runtime.model.partition import StageSpec


def save_mistral_checkpoint(path: str | Path, args: ModelArgs, state_dict: dict[str, torch.Tensor]) -> None:
    """Write `params.json` + `consolidated.safetensors` (our names are Mistral's; experts one by one)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(args.to_params_json(), indent=2))
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in unstack_experts(state_dict).items()},
        str(path / "consolidated.safetensors"),
        metadata={"format": "pt"},
    )


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """`config.json` in Hugging Face form for MistralForCausalLM / MixtralForCausalLM."""
    cfg = {
        "architectures": ["MixtralForCausalLM" if args.is_moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.is_moe else "mistral",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "sliding_window": args.sliding_window,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if args.moe is not None:
        cfg.update(
            num_local_experts=args.moe.num_experts,
            num_experts_per_tok=args.moe.num_experts_per_tok,
            router_jitter_noise=0.0,
        )
    return cfg


def to_hf_state_dict(
    args: ModelArgs, state_dict: dict[str, torch.Tensor], fused_experts: bool = False
) -> dict[str, torch.Tensor]:
    """Our names -> HF names, with the rotary permutation applied to wq/wk.

    MoE experts use the per-expert `block_sparse_moe` layout that `save_pretrained` writes, or with
    `fused_experts` the in-memory layout of transformers >= 5 (`mlp.experts.gate_up_proj` / `down_proj`).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in unstack_experts(state_dict).items():
        if name in _HF_TOP_NAMES:
            out[_HF_TOP_NAMES[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if m is None:
            raise CheckpointError(f"cannot map tensor {name!r} to a Hugging Face name")
        base, rest = f"model.layers.{m.group(1)}", m.group(2)
        if rest in ("attention.wq", "attention.wk"):
            t = permute_for_hf(t, args.n_heads if rest == "attention.wq" else args.n_kv_heads)
        if rest in _HF_LAYER_NAMES:
            out[f"{base}.{_HF_LAYER_NAMES[rest]}.weight"] = t
        elif rest == "feed_forward.gate":
            out[f"{base}.{'mlp' if fused_experts else 'block_sparse_moe'}.gate.weight"] = t
        elif (e := _EXPERT_RE.match(rest)) and not fused_experts:
            out[f"{base}.block_sparse_moe.experts.{e.group(1)}.{e.group(2)}.weight"] = t
        elif e:
            fused.setdefault(base, {}).setdefault(e.group(2), {})[int(e.group(1))] = t
        else:
            raise CheckpointError(f"cannot map tensor {name!r} to a Hugging Face name")
    for base, ws in fused.items():
        out[f"{base}.mlp.experts.gate_up_proj"] = torch.cat([_stack_experts(ws["w1"]), _stack_experts(ws["w3"])], dim=1)
        out[f"{base}.mlp.experts.down_proj"] = _stack_experts(ws["w2"])
    return out


def _stack_experts(per_expert: dict[int, torch.Tensor]) -> torch.Tensor:
    """[n_experts, ...] in expert order, as the fused layout stores them."""
    return torch.stack([per_expert[i] for i in sorted(per_expert)])


def save_hf_checkpoint(
    path: str | Path,
    args: ModelArgs,
    state_dict: dict[str, torch.Tensor],
    shards: int = 2,
    fused_experts: bool = False,
) -> None:
    """Write config.json + `model-0000i-of-0000n.safetensors` + index, as Hugging Face lays them out."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = {k: v.detach().contiguous().cpu() for k, v in to_hf_state_dict(args, state_dict, fused_experts).items()}
    dtype = next(iter(hf.values())).dtype
    (path / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2))
    keys = list(hf)
    shards = max(1, min(shards, len(keys)))
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: hf[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    (path / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def iter_random_tensors(
    args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32, spec: Optional[StageSpec] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights (normal std 0.02, norms 1) one tensor at a time, so big models never sit in memory."""
    for name, shape in stage_shapes(args, spec or full_spec(args)).items():
        yield name, random_tensor(name, shape, seed, dtype)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A whole random model under our names (small models / tests)."""
    return dict(iter_random_tensors(args, seed, dtype))
