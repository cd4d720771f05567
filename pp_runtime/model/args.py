"""Model hyper-parameters, read from Mistral `params.json` or Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from pp_runtime.errors import ConfigError


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int = 8
    num_experts_per_tok: int = 2


@dataclass(frozen=True)
class ModelArgs:
    """One description of a Mistral-family decoder; `moe` set means Mixtral."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    max_seq_len: int = 32768
    moe: Optional[MoeArgs] = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window={self.sliding_window} must be positive or null")

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def window(self) -> int:
        """Ring-buffer length: the sliding window, or the whole context when there is none."""
        return self.sliding_window if self.sliding_window is not None else self.max_seq_len

    # ------------------------------------------------------------------ io
    def to_params_json(self) -> dict[str, Any]:
        """Mistral's `params.json` layout."""
        out: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.moe is not None:
            out["moe"] = dataclasses.asdict(self.moe)
        return out

    @classmethod
    def from_params_json(cls, data: dict[str, Any]) -> "ModelArgs":
        try:
            moe = data.get("moe")
            return cls(
                dim=int(data["dim"]),
                n_layers=int(data["n_layers"]),
                head_dim=int(data.get("head_dim") or data["dim"] // data["n_heads"]),
                hidden_dim=int(data["hidden_dim"]),
                n_heads=int(data["n_heads"]),
                n_kv_heads=int(data.get("n_kv_heads", data["n_heads"])),
                vocab_size=int(data["vocab_size"]),
                norm_eps=float(data.get("norm_eps", 1e-5)),
                rope_theta=float(data.get("rope_theta", 10000.0)),
                sliding_window=_opt_int(data.get("sliding_window")),
                max_seq_len=int(data.get("max_seq_len", 32768)),
                moe=MoeArgs(int(moe["num_experts"]), int(moe["num_experts_per_tok"])) if moe else None,
            )
        except KeyError as e:
            raise ConfigError(f"params.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_hf_config(cls, data: dict[str, Any]) -> "ModelArgs":
        arch = (data.get("architectures") or ["MistralForCausalLM"])[0]
        if arch not in ("MistralForCausalLM", "MixtralForCausalLM"):
            raise ConfigError(f"config.json architecture {arch!r} is not MistralForCausalLM or MixtralForCausalLM")
        try:
            n_heads = int(data["num_attention_heads"])
            moe = None
            if arch == "MixtralForCausalLM":
                moe = MoeArgs(int(data["num_local_experts"]), int(data["num_experts_per_tok"]))
            rope_theta = data.get("rope_theta")
            if rope_theta is None:  # newer transformers nest it
                rope_theta = (data.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            return cls(
                dim=int(data["hidden_size"]),
                n_layers=int(data["num_hidden_layers"]),
                head_dim=int(data.get("head_dim") or data["hidden_size"] // n_heads),
                hidden_dim=int(data["intermediate_size"]),
                n_heads=n_heads,
                n_kv_heads=int(data.get("num_key_value_heads", n_heads)),
                vocab_size=int(data["vocab_size"]),
                norm_eps=float(data.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                sliding_window=_opt_int(data.get("sliding_window")),
                max_seq_len=int(data.get("max_position_embeddings", 32768)),
                moe=moe,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None


def _opt_int(v: Any) -> Optional[int]:
    return None if v is None else int(v)


PRESETS: dict[str, ModelArgs] = {
    # A few layers, CPU-fast; window small enough that tests wrap the ring many times.
    "tiny": ModelArgs(dim=64, n_layers=4, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                      vocab_size=256, sliding_window=16, max_seq_len=4096),
    "tiny-moe": ModelArgs(dim=64, n_layers=4, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                          vocab_size=256, sliding_window=16, max_seq_len=4096, moe=MoeArgs(8, 2)),
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                            vocab_size=32000, sliding_window=4096, max_seq_len=32768),
    "mixtral-8x7b": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                              vocab_size=32000, rope_theta=1e6, sliding_window=None, max_seq_len=32768,
                              moe=MoeArgs(8, 2)),
}


def preset(name: str, **overrides: Any) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
