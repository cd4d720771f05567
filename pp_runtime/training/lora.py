"""LoRA: frozen base weights, trainable low-rank adapters (`train.lora.*`, pp_runtime/jobs/settings.py).

A targeted projection y = W x becomes y = W x + (alpha / rank) * B A dropout(x), with A [rank, in]
and B [out, rank]; W stays frozen in the model dtype (no gradient, no optimizer state), A starts
Kaiming-uniform (seeded by the parameter's name, so every split builds the same adapters), B at
zero, so step 0 computes the base model exactly.

- Dense projections (attention wq/wk/wv/wo, a dense model's w1/w2/w3): the `Linear` is replaced by
  a `LoraLinear` holding the same `weight` Parameter (checkpoint names do not move) plus two small
  `Linear`s, `lora_A` and `lora_B` (`layers.3.attention.wq.lora_A.weight`, as PEFT names them).
  Those are `pp_runtime.model.split_linear.Linear`s, so under zero-bubble schedules the adapters' weight
  gradients wait for the `W` action like any other weight gradient, and nothing runs twice.
- MoE experts (w1/w2/w3 of a Mixtral model): one adapter pair per expert, stacked like the experts
  (`experts.lora_w1.lora_A` [E, rank, dim], `lora_B` [E, hidden, rank]), run by the same grouped
  matmul backend as the experts themselves (`moe.experts_forward`). Like the expert weights, their
  gradients are computed in the backward itself (exact under every schedule).

The trainer optimizes what requires a gradient, i.e. only the adapters (float32 master copies with
a half-precision model); checkpoints store only them. Export merges them into the base weights
(`export_merged`) or writes a PEFT adapter folder (`pp_runtime.training.peft_export`).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from pp_runtime.errors import CheckpointError, ConfigError
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.split_linear import Linear

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
FFN_TARGETS = ("w1", "w2", "w3")
TARGETS = ATTENTION_TARGETS + FFN_TARGETS


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "seed": self.seed}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LoraConfig":
        return cls(int(data["rank"]), float(data["alpha"]), float(data.get("dropout", 0.0)),
                   tuple(data.get("targets", ATTENTION_TARGETS)), int(data.get("seed", 0)))


def lora_config(group: Any) -> Optional[LoraConfig]:
    """`train.lora` of the config, checked; None when LoRA is off (no group, rank 0 or null)."""
    if group is None:
        return None
    get = group.get
    rank = get("rank")
    if rank in (None, 0):
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"train.lora.rank={rank!r} must be a positive integer (0 or null: LoRA off)")
    alpha = get("alpha")
    alpha = 2.0 * rank if alpha is None else alpha
    try:
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha <= 0 or isinstance(get("alpha"), bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"train.lora.alpha={get('alpha')!r} must be a positive number (null: 2 x rank)") from None
    dropout = get("dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"train.lora.dropout={dropout!r} must be a number in [0, 1)")
    raw = get("targets")
    raw = ATTENTION_TARGETS if raw is None else ([raw] if isinstance(raw, str) else list(raw))
    targets = tuple(str(t) for t in raw)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ConfigError(f"train.lora.targets={list(targets)} must be distinct names among {', '.join(TARGETS)} "
                          "(w1/w2/w3: the feed-forward, every expert's in a MoE model)")
    seed = get("seed") or 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"train.lora.seed={seed!r} must be an integer")
    return LoraConfig(rank, alpha, float(dropout), tuple(t for t in TARGETS if t in targets), seed)


# ---------------------------------------------------------------------------------- modules
def _seeded(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _kaiming_uniform(shape: tuple[int, ...], name: str, seed: int) -> torch.Tensor:
    """nn.Linear's (and PEFT's) default for A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), seeded by name."""
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=_seeded(name, seed), dtype=torch.float64) * 2 - 1) * bound


def _up(t: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 for merging; float32 / float64 stay."""
    return t.float() if t.element_size() < 4 else t


class LoraLinear(Linear):
    """A frozen `Linear` plus scale * lora_B(lora_A(dropout(x)))."""

    def __init__(self, base: Linear, cfg: LoraConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_A = Linear(self.in_features, cfg.rank, bias=False, device=dev, dtype=dt)
        self.lora_B = Linear(cfg.rank, self.out_features, bias=False, device=dev, dtype=dt)
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B @ A, in float32 or better (what merging adds to the weight)."""
        return self.scale * (_up(self.lora_B.weight) @ _up(self.lora_A.weight))


class ExpertLora(nn.Module):
    """Adapters of one stacked expert weight [E, out, in]: A [E, rank, in], B [E, out, rank]."""

    def __init__(self, weight: nn.Parameter, cfg: LoraConfig) -> None:
        super().__init__()
        n_experts, out_f, in_f = weight.shape
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(n_experts, cfg.rank, in_f, **kw))
        self.lora_B = nn.Parameter(torch.empty(n_experts, out_f, cfg.rank, **kw))
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, a: torch.Tensor, mm) -> torch.Tensor:
        """The adapter's share of mm(a, weight) for the same expert-sorted rows `a`."""
        return mm(mm(self.dropout(a), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        return self.scale * torch.bmm(_up(self.lora_B), _up(self.lora_A))


def _targets(module: nn.Module, cfg: LoraConfig) -> Iterator[tuple[str, nn.Module, str]]:
    """(owner's name, owner module, attribute) of every projection `cfg` targets in a stage."""
    from pp_runtime.model.moe import GroupedExperts
    from pp_runtime.model.transformer import Attention, FeedForward

    for name, m in module.named_modules():
        if isinstance(m, Attention):
            attrs = [t for t in ATTENTION_TARGETS if t in cfg.targets]
        elif isinstance(m, (FeedForward, GroupedExperts)):
            attrs = [t for t in FFN_TARGETS if t in cfg.targets]
        else:
            continue
        for attr in attrs:
            yield name, m, attr


def apply_lora(module: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze every parameter of a stage and add adapters to the targeted projections (initialised:
    A seeded by its global name, B zero). Returns the adapter parameter names."""
    from pp_runtime.model.moe import GroupedExperts

    for p in module.parameters():
        p.requires_grad_(False)
    for owner_name, owner, attr in list(_targets(module, cfg)):
        if isinstance(owner, GroupedExperts):
            lora = ExpertLora(getattr(owner, attr), cfg)
            owner.add_module(f"lora_{attr}", lora)
        else:
            setattr(owner, attr, LoraLinear(getattr(owner, attr), cfg))
    names = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_" not in name:
                continue
            p.requires_grad_(True)
            if p.is_meta:
                pass
            elif name.endswith("lora_A") or name.endswith("lora_A.weight"):
                p.copy_(_kaiming_uniform(tuple(p.shape), name, cfg.seed))
            else:
                p.zero_()
            names.append(name)
    return names


def is_adapter(name: str) -> bool:
    return ".lora_" in name


@torch.no_grad()
def merge_lora_(module: nn.Module) -> None:
    """Fold every adapter into its weight (in float32, then the weight's dtype) and remove the adapters:
    the module computes the same function as plain inference code."""
    from pp_runtime.model.moe import GroupedExperts

    for name, m in list(module.named_modules()):
        for attr, child in list(m.named_children()):
            if isinstance(child, LoraLinear):
                w = child.weight
                w.copy_((_up(w) + child.delta()).to(w.dtype))
                plain = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(m, attr, plain)
            elif isinstance(child, ExpertLora) and isinstance(m, GroupedExperts):
                w = getattr(m, attr.removeprefix("lora_"))
                w.copy_((_up(w) + child.delta()).to(w.dtype))
                delattr(m, attr)


def merged_tensor(base: torch.Tensor, name: str, adapters: Mapping[str, torch.Tensor], cfg: LoraConfig,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """One base tensor (checkpoint name, experts one by one) with its adapter folded in."""
    a, b = adapter_pair(name, adapters)
    if a is None:
        return base.to(out_dtype)
    return (_up(base) + cfg.scale * (_up(b) @ _up(a))).to(out_dtype)


def adapter_pair(name: str, adapters: Mapping[str, torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The (A, B) of checkpoint tensor `name` (`layers.0.attention.wq.weight`, or one expert's
    `layers.0.feed_forward.experts.3.w1.weight`) from adapters under our training names."""
    m = re.match(r"^(.*\.experts)\.(\d+)\.(w[123])\.weight$", name)
    if m is not None:
        prefix = f"{m.group(1)}.lora_{m.group(3)}"
        if f"{prefix}.lora_A" not in adapters:
            return None, None
        e = int(m.group(2))
        return adapters[f"{prefix}.lora_A"][e], adapters[f"{prefix}.lora_B"][e]
    stem = name.removesuffix(".weight")
    if f"{stem}.lora_A.weight" not in adapters:
        return None, None
    return adapters[f"{stem}.lora_A.weight"], adapters[f"{stem}.lora_B.weight"]


# ---------------------------------------------------------------------------------- from a checkpoint
def checkpoint_lora(manifest: Mapping[str, Any]) -> Optional[LoraConfig]:
    """The LoRA settings a training checkpoint was saved under (None: a full fine-tune)."""
    run = manifest.get("run") or {}
    setting = run.get("train.lora")
    return LoraConfig.from_json(setting) if setting else None


def checkpoint_base(manifest: Mapping[str, Any]):
    """Where a LoRA checkpoint's frozen base weights come from (its run's model source)."""
    from pp_runtime.checkpoints.model_source import ModelSource
    from pp_runtime.training import checkpoint as tc

    run = manifest.get("run") or {}
    args = tc.manifest_args(manifest)
    path = run.get("model.path")
    if path is not None:
        if not Path(path).is_dir():
            raise CheckpointError(f"this LoRA checkpoint's base model {path} is gone; the export needs its weights")
        return ModelSource(args, Path(path))
    return ModelSource(args, None, int(run.get("model.seed") or 0))


def load_adapters(path: Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every adapter tensor a LoRA training checkpoint holds, by our training name (float32)."""
    from pp_runtime.checkpoints.formats import open_safetensors

    out = {}
    for f in manifest["files"]["weights"]:
        with open_safetensors(Path(path) / f) as h:
            out.update({k: _up(h.get_tensor(k)) for k in h.keys() if is_adapter(k)})
    if not out:
        raise CheckpointError(f"{path} holds no LoRA adapters although its run trained them; it is damaged")
    return out


def iter_base_tensors(source, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's tensors under checkpoint names, one layer at a time (a checkpoint folder is read
    layer by layer; a from-scratch model is drawn tensor by tensor as training drew it)."""
    from pp_runtime.checkpoints.formats import full_spec, load_stage_state, random_tensor, stage_shapes
    from pp_runtime.model.partition import StageSpec

    args: ModelArgs = source.args
    if source.path is None:
        for name, shape in stage_shapes(args, full_spec(args)).items():
            yield name, random_tensor(name, shape, source.seed, dtype or torch.float32)
        return
    from pp_runtime.model.moe import unstack_experts

    pieces = [StageSpec(0, 0, 0, 0, has_embedding=True, has_head=False)]
    pieces += [StageSpec(0, 0, i, i + 1, has_embedding=False, has_head=False) for i in range(args.n_layers)]
    pieces += [StageSpec(0, 0, args.n_layers, args.n_layers, has_embedding=False, has_head=True)]
    for spec in pieces:
        yield from unstack_experts(load_stage_state(source.path, args, spec, dtype)).items()


def export_merged(path: str | Path, out: str | Path, *, tokenizer: Optional[str | Path] = None,
                  dtype: Optional[torch.dtype] = None) -> Path:
    """A LoRA training checkpoint -> params.json + consolidated.safetensors (+ tokenizer.model) with the
    adapters merged into the base weights, streamed one layer at a time."""
    import os
    import shutil

    from pp_runtime.checkpoints.formats import full_spec, stage_shapes, write_safetensors_streaming
    from pp_runtime.checkpoints.model_source import DTYPES
    from pp_runtime.training import checkpoint as tc

    path, out = Path(path), Path(out)
    manifest = tc.read_manifest(path)
    cfg = checkpoint_lora(manifest)
    if cfg is None:
        raise CheckpointError(f"{path} is not a LoRA checkpoint")
    adapters = load_adapters(path, manifest)
    source = checkpoint_base(manifest)
    model_dtype = DTYPES.get(str((manifest.get("run") or {}).get("model.dtype")), torch.float32)
    out_dtype = dtype or model_dtype
    shapes = stage_shapes(source.args, full_spec(source.args))
    base = iter_base_tensors(source, model_dtype)  # as training saw them: in the model dtype
    out.mkdir(parents=True, exist_ok=True)
    part = out / "consolidated.safetensors.partial"

    def make(name: str) -> torch.Tensor:
        got, t = next(base)
        assert got == name, (got, name)
        return merged_tensor(t, name, adapters, cfg, out_dtype)

    write_safetensors_streaming(part, [(n, s, out_dtype) for n, s in shapes.items()], make)
    os.replace(part, out / "consolidated.safetensors")
    tc._write_json(out / "params.json", source.args.to_params_json())
    tok = tokenizer or manifest.get("tokenizer")
    if tok:
        from pp_runtime.io.tokenizer import Tokenizer

        shutil.copyfile(Tokenizer.from_dir(tok).path, out / "tokenizer.model")
    return out


# ---------------------------------------------------------------------------------- the job's use
EXPORT_FORMATS = ("consolidated", "peft")


def export_format(cfg: Any, lcfg: Optional[LoraConfig]) -> str:
    """`export_format`: consolidated (merged with LoRA) or peft (LoRA only), checked before training."""
    fmt = str(cfg.export_format or "consolidated")
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export_format={fmt!r}: use consolidated (an inference-ready checkpoint, LoRA adapters "
                          "merged) or peft (the LoRA adapter alone, in PEFT's format)")
    if fmt == "peft" and lcfg is None:
        raise ConfigError("export_format=peft writes a LoRA adapter: set train.lora.rank=N (or use "
                          "export_format=consolidated for a full fine-tune)")
    return fmt


def apply_to_stages(stages: Mapping[int, nn.Module], cfg: LoraConfig, args: ModelArgs) -> None:
    """Add adapters to this rank's stages (before the trainer is built: it trains what requires grad)."""
    ffn = [t for t in cfg.targets if t in FFN_TARGETS]
    for m in stages.values():
        p = next(m.parameters())
        if (ffn and args.is_moe and p.is_cuda and p.element_size() == 2 and cfg.rank * 2 % 16):
            raise ConfigError(f"train.lora.rank={cfg.rank}: adapters on MoE experts run through the grouped GEMM "
                              "on GPU, which needs 16-byte rows: use a multiple of 8")
        apply_lora(m, cfg)


def check_resumed_shapes(saved: Mapping[str, torch.Tensor], params, path: Path) -> None:
    """Adapters of a checkpoint resumed with other LoRA settings (resume=DIR) must have this run's shapes."""
    for name, p in params:
        if name in saved and tuple(saved[name].shape) != tuple(p.shape):
            raise CheckpointError(f"checkpoint {path} holds {name} of shape {list(saved[name].shape)} but this run's is "
                                  f"{list(p.shape)}: resume it with its own train.lora.rank (checkpoint: "
                                  f"{saved[name].shape[-2 if name.endswith(('lora_A', 'lora_A.weight')) else -1]})")


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """The MFU count of a LoRA step: the trainer's 6 FLOPs per parameter and token less the frozen
    weights' gradients (2), so 4; the attention's own term unchanged; the adapters' are negligible."""
    from pp_runtime.training.trainer import flops_per_token as full

    attention = 6.0 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return (full(args, seq_len) - attention) * 4.0 / 6.0 + attention


def parameter_counts(args: ModelArgs, cfg: LoraConfig, spec=None) -> tuple[int, int]:
    """(all, trainable) parameters of stage `spec` (default: the whole model) with adapters, counted
    on a meta-device copy (nothing allocated)."""
    from pp_runtime.checkpoints.formats import full_spec
    from pp_runtime.model.transformer import StageModule

    with torch.device("meta"):
        model = StageModule(args, spec if spec is not None else full_spec(args))
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, cfg)
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(cfg: LoraConfig, args: ModelArgs) -> str:
    """Rank 0's start-up line: the adapters and how many parameters they train."""
    total, trainable = parameter_counts(args, cfg)
    where = ", ".join(cfg.targets) + (" (every expert's)" if args.is_moe and set(cfg.targets) & set(FFN_TARGETS)
                                      else "")
    return (f"LoRA: rank {cfg.rank}, alpha {cfg.alpha:g} (scale {cfg.scale:g}), dropout {cfg.dropout:g} on {where}: "
            f"{trainable / 1e6:.3f}M trainable parameters beside {total / 1e6:.2f}M frozen ones "
            f"({100 * trainable / total:.2f}%)")
