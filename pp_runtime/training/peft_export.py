"""LoRA adapters in PEFT's format: write them from a training checkpoint, read and apply them at load.

A PEFT adapter folder is `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...)
plus `adapter_model.safetensors` holding `base_model.model.<HF module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r], e.g. `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
Module names follow `pp_runtime.checkpoints.formats`'s Hugging Face mapping (wq -> self_attn.q_proj, w1 ->
mlp.gate_proj, ...). Hugging Face stores wq/wk with each head's rows permuted for its rotate_half
rotary (`permute_for_hf`); the permutation acts on output rows, so B's rows of wq/wk are permuted
the same way on export (and back on import) while A is unchanged: B_hf A = P (B A).

MoE experts' adapters are written per expert under the per-expert Mixtral layout that
`save_pretrained` of transformers < 5 writes (`block_sparse_moe.experts.E.w1`); transformers >= 5
fuses the experts into one parameter, which PEFT's LoRA layers do not target by these names.

`python -m pp_runtime.training.peft_export CHECKPOINT OUT` converts a LoRA training checkpoint offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file

from pp_runtime.errors import CheckpointError, ConfigError
from pp_runtime.model.args import ModelArgs
from pp_runtime.training.lora import LoraConfig, checkpoint_lora, load_adapters

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_DENSE_FFN = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_OURS = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])\.lora_([AB])\.weight$")
_OURS_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.lora_(w[123])\.lora_([AB])$")
_HF = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
_HF_EXPERT = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.lora_([AB])(?:\.\w+)?\.weight$")


def _heads(args: ModelArgs, w: str) -> Optional[int]:
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(w)


def hf_module(args: ModelArgs, layer: int, w: str, expert: Optional[int] = None) -> str:
    """HF module name (under `model.`) of our projection `w` of `layer` (one expert's for MoE)."""
    if w in _ATTN:
        return f"model.layers.{layer}.self_attn.{_ATTN[w]}"
    if expert is not None:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}"
    return f"model.layers.{layer}.mlp.{_DENSE_FFN[w]}"


def to_peft_state(args: ModelArgs, adapters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our training names -> PEFT names, B rows of wq/wk permuted as HF permutes those weights."""
    from pp_runtime.checkpoints.formats import permute_for_hf

    out: dict[str, torch.Tensor] = {}
    for name, t in adapters.items():
        if (m := _OURS.match(name)) is not None:
            layer, w, ab = int(m.group(1)), m.group(3), m.group(4)
            if ab == "B" and _heads(args, w):
                t = permute_for_hf(t, _heads(args, w))
            out[f"{PREFIX}{hf_module(args, layer, w)}.lora_{ab}.weight"] = t
        elif (m := _OURS_EXPERT.match(name)) is not None:
            layer, w, ab = int(m.group(1)), m.group(2), m.group(3)
            for e, te in enumerate(t.unbind(0)):
                out[f"{PREFIX}{hf_module(args, layer, w, e)}.lora_{ab}.weight"] = te
        else:
            raise CheckpointError(f"cannot map adapter tensor {name!r} to a Hugging Face module name")
    return out


def peft_config(cfg: LoraConfig, args: ModelArgs, base: Optional[str]) -> dict[str, Any]:
    modules = [_ATTN[t] for t in cfg.targets if t in _ATTN]
    modules += [t if args.is_moe else _DENSE_FFN[t] for t in cfg.targets if t in _DENSE_FFN]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": modules,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True,
    }


def write_peft_adapter(out: str | Path, args: ModelArgs, cfg: LoraConfig, adapters: Mapping[str, torch.Tensor],
                       base: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """adapter_config.json + adapter_model.safetensors (float32 unless `dtype`) from adapters by our names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or torch.float32).contiguous().cpu() for k, v in to_peft_state(args, adapters).items()}
    part = out / (WEIGHTS + ".partial")
    save_file(state, str(part), metadata={"format": "pt"})
    os.replace(part, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(peft_config(cfg, args, base), indent=2) + "\n")
    return out


def export_peft(path: str | Path, out: str | Path, dtype: Optional[torch.dtype] = None) -> Path:
    """A LoRA training checkpoint -> a PEFT adapter folder."""
    from pp_runtime.training import checkpoint as tc

    path = Path(path)
    manifest = tc.read_manifest(path)
    cfg = checkpoint_lora(manifest)
    if cfg is None:
        raise CheckpointError(f"{path} is a full fine-tune, not a LoRA run: it has no adapter to export "
                              "(export it as a consolidated checkpoint)")
    base = (manifest.get("run") or {}).get("model.path")
    return write_peft_adapter(out, tc.manifest_args(manifest), cfg, load_adapters(path, manifest), base, dtype)


# ---------------------------------------------------------------------------------- reading
def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"LoRA adapter {path}: {what}")


def read_peft_adapter(path: str | Path, args: ModelArgs, layers: Optional[range] = None
                      ) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(scale, {our checkpoint weight name: (A, B)}) of a PEFT adapter folder, in our layout (B rows of
    wq/wk un-permuted), only for `layers` (default all). Everything is checked against `args` first:
    every tensor must name a module of this model with the right shape and the config's rank."""
    from pp_runtime.checkpoints.formats import open_safetensors, unpermute_from_hf

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model.adapter={str(path)!r} does not exist; give a PEFT adapter folder "
                          f"({CONFIG} + {WEIGHTS})")
    if not (path / CONFIG).is_file():
        raise _fail(path, f"no {CONFIG}; a PEFT LoRA adapter folder holds {CONFIG} and {WEIGHTS}")
    try:
        conf = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise _fail(path, f"{CONFIG} is not valid JSON ({e})") from None
    if not isinstance(conf, dict) or str(conf.get("peft_type", "")).upper() != "LORA":
        raise _fail(path, f"{CONFIG} has peft_type {conf.get('peft_type') if isinstance(conf, dict) else None!r}; "
                    "only LORA adapters can be applied")
    for key, ok in (("use_dora", lambda v: not v), ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v),
                    ("modules_to_save", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                    ("fan_in_fan_out", lambda v: not v)):
        if not ok(conf.get(key)):
            raise _fail(path, f"{CONFIG} sets {key}={conf.get(key)!r}, which is not supported (plain LoRA only)")
    try:
        rank, alpha = int(conf["r"]), float(conf.get("lora_alpha", conf["r"]))
    except (KeyError, TypeError, ValueError):
        raise _fail(path, f"{CONFIG} lacks a valid r / lora_alpha") from None
    if rank < 1:
        raise _fail(path, f"{CONFIG} has r={rank}")
    scale = alpha / (rank ** 0.5) if conf.get("use_rslora") else alpha / rank
    if not (path / WEIGHTS).is_file():
        raise _fail(path, f"no {WEIGHTS} beside {CONFIG}")
    shapes = _our_shapes(args)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with open_safetensors(path / WEIGHTS) as h:
        keys = list(h.keys())
        for key in keys:
            name, ab, heads = _our_name(key, args, path)
            out_f, in_f = shapes[name]
            want = (rank, in_f) if ab == "A" else (out_f, rank)
            got = tuple(h.get_slice(key).get_shape())
            if got != want:
                if len(got) == 2 and (got[0] if ab == "A" else got[1]) != rank and \
                        (got[1] if ab == "A" else got[0]) == (in_f if ab == "A" else out_f):
                    raise _fail(path, f"{key} has rank {got[0] if ab == 'A' else got[1]} but {CONFIG} says r={rank}")
                raise _fail(path, f"{key} has shape {list(got)} but this model's {name} needs {list(want)} "
                            "(an adapter for another model?)")
            layer = int(name.split(".")[1])
            if layers is not None and layer not in layers:
                continue
            t = h.get_tensor(key)
            t = t.float() if t.element_size() < 4 else t
            if ab == "B" and heads:
                t = unpermute_from_hf(t, heads)
            pairs.setdefault(name, {})[ab] = t
    if not keys:
        raise _fail(path, f"{WEIGHTS} holds no tensors")
    half = sorted(n for n, p in pairs.items() if len(p) != 2)
    if half:
        raise _fail(path, f"{half[0]} has only lora_{'A' if 'A' in pairs[half[0]] else 'B'}; each module needs both")
    return scale, {n: (p["A"], p["B"]) for n, p in pairs.items()}


def _our_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    from pp_runtime.checkpoints.formats import full_spec, stage_shapes

    return {n: s for n, s in stage_shapes(args, full_spec(args)).items() if len(s) == 2}


def _our_name(key: str, args: ModelArgs, path: Path) -> tuple[str, str, Optional[int]]:
    """(our checkpoint weight name, "A"/"B", heads to un-permute B by) of a PEFT tensor key."""
    if (m := _HF.match(key)) is not None:
        layer, kind, mod, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        table = _ATTN if kind == "self_attn" else _DENSE_FFN
        ours = {v: k for k, v in table.items()}.get(mod)
        if ours is not None and not (kind == "mlp" and args.is_moe) and layer < args.n_layers:
            part = "attention" if kind == "self_attn" else "feed_forward"
            return f"layers.{layer}.{part}.{ours}.weight", ab, _heads(args, ours)
    elif (m := _HF_EXPERT.match(key)) is not None:
        layer, e, w, ab = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if args.is_moe and layer < args.n_layers and e < args.moe.num_experts:
            return f"layers.{layer}.feed_forward.experts.{e}.{w}.weight", ab, None
    raise _fail(path, f"{key} names no LoRA-able module of this model ({args.n_layers} layers"
                + (f", {args.moe.num_experts} experts" if args.is_moe else "")
                + "); supported: self_attn q/k/v/o_proj, " + ("block_sparse_moe.experts.E.w1/w2/w3" if args.is_moe
                                                               else "mlp gate/up/down_proj"))


@torch.no_grad()
def apply_peft_adapter_(module: torch.nn.Module, path: str | Path, args: ModelArgs) -> int:
    """Merge a PEFT adapter into a loaded stage's weights (W += scale B A, in float32); returns how many
    weights changed. The whole file is checked against the model even though only this stage's layers
    are applied, so every rank of a pipeline accepts or refuses the same adapter."""
    spec = getattr(module, "spec", None)
    layers = spec.layers if spec is not None else None
    scale, pairs = read_peft_adapter(path, args, layers)
    params = dict(module.named_parameters())
    for name, (a, b) in pairs.items():
        m = re.match(r"^(.*\.experts)\.(\d+)\.(w[123])\.weight$", name)
        if m is not None:
            w, e = params[f"{m.group(1)}.{m.group(3)}"], int(m.group(2))
            acc = torch.promote_types(w.dtype, torch.float32)
            w[e].copy_((w[e].to(acc) + scale * (b.to(acc) @ a.to(acc))).to(w.dtype))
        else:
            w = params[name]
            acc = torch.promote_types(w.dtype, torch.float32)
            w.copy_((w.to(acc) + scale * (b.to(acc) @ a.to(acc))).to(w.dtype))
    return len(pairs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m pp_runtime.training.peft_export CHECKPOINT OUT [--dtype bfloat16]`."""
    p = argparse.ArgumentParser(prog="python -m pp_runtime.training.peft_export",
                                description="write a LoRA training checkpoint's adapter as a PEFT adapter folder")
    p.add_argument("checkpoint", help="a step_* folder, or a checkpoint dir (its latest is used)")
    p.add_argument("out")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    a = p.parse_args(argv)
    from pp_runtime.training.checkpoint import export_command

    return export_command(a.checkpoint, a.dtype, lambda ckpt, dtype: export_peft(ckpt, a.out, dtype),
                          "exported the adapter of {ckpt} to {out}")


if __name__ == "__main__":
    sys.exit(main())
