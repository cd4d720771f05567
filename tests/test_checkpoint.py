"""Checkpoint formats, per-stage loading, validation messages, tokenizer and the random-checkpoint CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pp_runtime.checkpoints.formats as ckpt
from pp_runtime.checkpoints import random_weights as random_checkpoint
from pp_runtime.model.args import ModelArgs, preset
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.checkpoints.formats import (detect_format, full_spec, load_model_args, load_stage_module, load_stage_state,
                                   stage_shapes, unpermute_from_hf, permute_for_hf)
from pp_runtime.errors import CheckpointError
from pp_runtime.io.tokenizer import Tokenizer, find_mistral_v1_tokenizer
from pp_runtime.model.moe import unstack_experts
from pp_runtime.model.partition import plan_for
from pp_runtime.model.transformer import StageModule, apply_rope

from ckpt_helpers import random_state_dict, save_hf_checkpoint, save_mistral_checkpoint, to_hf_state_dict

REPO = Path(__file__).resolve().parents[1]


def _weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-unit norm gains, so swapped norms would show."""
    gen = torch.Generator().manual_seed(seed + 100)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=gen) if k.endswith("norm.weight") else v * 6
        for k, v in random_state_dict(args, seed).items()
    }


def _logits(model: StageModule, args: ModelArgs, tokens: torch.Tensor) -> torch.Tensor:
    meta = build_training_meta(
        [[len(tokens)]],
        window=args.sliding_window,
        head_dim=args.head_dim,
        rope_theta=args.rope_theta,
        n_kv_groups=args.n_heads // args.n_kv_heads,
    )
    return model(tokens, meta, logits="all")


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def saved(request, tmp_path_factory):
    """The same weights as Mistral consolidated, HF per-expert and HF fused-expert checkpoints."""
    args = preset(request.param)
    state = _weights(args)
    root = tmp_path_factory.mktemp(request.param)
    save_mistral_checkpoint(root / "mistral", args, state)
    save_hf_checkpoint(root / "hf", args, state, shards=2)
    save_hf_checkpoint(root / "hf_fused", args, state, shards=3, fused_experts=True)
    return args, state, root


# ------------------------------------------------------------------ formats
def test_detect_format_and_args(saved):
    args, _, root = saved
    assert detect_format(root / "mistral") == "mistral"
    assert detect_format(root / "hf") == "hf"
    assert load_model_args(root / "mistral") == args
    assert load_model_args(root / "hf") == args


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["hf", "hf_fused"])
def test_consolidated_and_hf_give_same_weights_and_logits(saved, fmt):
    args, state, root = saved
    a = load_stage_module(root / "mistral", args, full_spec(args))
    b = load_stage_module(root / fmt, args, full_spec(args))
    sa, sb = unstack_experts(a.state_dict()), unstack_experts(b.state_dict())  # checkpoint names
    for k, v in state.items():
        assert torch.equal(sa[k], v) and torch.equal(sb[k], v), k
    tokens = torch.randint(
        0, args.vocab_size, (3 * args.sliding_window + 5,), generator=torch.Generator().manual_seed(0)
    )
    # Same weights; only kernel paths may differ (buffer alignment), hence not bit-exact.
    torch.testing.assert_close(_logits(a, args, tokens), _logits(b, args, tokens), atol=1e-5, rtol=1e-5)


def test_hf_files_really_hold_permuted_rows(saved):
    """Guard against a no-op permutation pair passing the round trip."""
    args, state, root = saved
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.self_attn.q_proj.weight"
    stored = load_file(str(root / "hf" / index[key]))[key]
    assert not torch.equal(stored, state["layers.0.attention.wq.weight"])
    assert torch.equal(unpermute_from_hf(stored, args.n_heads), state["layers.0.attention.wq.weight"])


def test_several_consolidated_files(tmp_path):
    args = preset("tiny")
    state = random_state_dict(args, seed=2)
    keys = list(state)
    (tmp_path / "params.json").write_text(json.dumps(args.to_params_json()))
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, str(tmp_path / "consolidated-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[len(keys) // 2 :]}, str(tmp_path / "consolidated-00002-of-00002.safetensors"))
    loaded = load_stage_state(tmp_path, args, full_spec(args), torch.bfloat16)
    assert loaded.keys() == state.keys()
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], state[k].bfloat16()) for k in keys)


def test_rotary_permutation_turns_interleaved_rope_into_rotate_half():
    """HF's rotate_half on permuted weights == Mistral's interleaved RoPE, up to the same row permutation."""
    heads, head_dim, dim, t = 3, 8, 12, 5
    w = torch.randn(heads * head_dim, dim, dtype=torch.float64)
    assert torch.equal(unpermute_from_hf(permute_for_hf(w, heads), heads), w)
    x = torch.randn(t, dim, dtype=torch.float64)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * (1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))[None]
    ours = apply_rope((x @ w.T).view(t, heads, head_dim).float(), ang.cos().float(), ang.sin().float())
    q = (x @ permute_for_hf(w, heads).T).view(t, heads, head_dim)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rotate_half = torch.cat([-q[..., head_dim // 2 :], q[..., : head_dim // 2]], -1)
    hf = (q * cos + rotate_half * sin).reshape(t, heads * head_dim)
    back = unpermute_from_hf(hf.T, heads).T.reshape(t, heads, head_dim)
    torch.testing.assert_close(back.float(), ours, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ per-stage loading
class _ReadLog:
    """Wraps safetensors' safe_open and records every tensor whose data is read."""

    def __init__(self, real) -> None:
        self.real, self.read = real, []

    def __call__(self, *a, **kw):
        return _LoggedHandle(self.real(*a, **kw), self.read)


class _LoggedHandle:
    def __init__(self, handle, log: list) -> None:
        self.handle, self.log = handle, log

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        self.log.append(key)
        return self.handle.get_tensor(key)

    def get_slice(self, key):
        return _LoggedSlice(self.handle.get_slice(key), key, self.log)


class _LoggedSlice:
    def __init__(self, sl, key: str, log: list) -> None:
        self.sl, self.key, self.log = sl, key, log

    def get_shape(self):
        return self.sl.get_shape()

    def __getitem__(self, item):
        self.log.append(self.key)
        return self.sl[item]


@pytest.mark.parametrize("fmt", ["mistral", "hf", "hf_fused"])
def test_stage_reads_only_its_own_tensors(saved, fmt, monkeypatch):
    args, state, root = saved
    plan = plan_for(args, 2)
    hf_names = set(to_hf_state_dict(args, state, fused_experts=fmt == "hf_fused"))
    for spec in plan.stages:
        log = _ReadLog(ckpt.safe_open)
        monkeypatch.setattr(ckpt, "safe_open", log)
        loaded = load_stage_state(root / fmt, args, spec)
        monkeypatch.undo()
        expected = set(stage_shapes(args, spec))
        assert set(loaded) == expected
        assert ("tok_embeddings.weight" in loaded) == spec.has_embedding and (
            "output.weight" in loaded
        ) == spec.has_head
        assert {int(k.split(".")[1]) for k in loaded if k.startswith("layers.")} == set(spec.layers)
        read_layers = {int(k.split("layers.")[1].split(".")[0]) for k in log.read if "layers." in k}
        assert read_layers == set(spec.layers), f"stage {spec.index} read layers {sorted(read_layers)}"
        assert set(log.read) <= (hf_names if fmt != "mistral" else expected)


@torch.no_grad()
def test_stage_loads_without_the_other_stages_tensors(saved, tmp_path):
    """A folder holding only stage 1's tensors loads stage 1; stage 0 names what is missing."""
    args, state, root = saved
    s0, s1 = plan_for(args, 2).stages
    save_mistral_checkpoint(tmp_path, args, {k: state[k] for k in stage_shapes(args, s1)})
    m1 = load_stage_module(tmp_path, args, s1)
    with pytest.raises(CheckpointError, match="lacks .* tensor.*tok_embeddings.weight"):
        load_stage_state(tmp_path, args, s0)
    # The two stages chained give the whole model's logits.
    m0 = load_stage_module(root / "hf", args, s0)
    full = load_stage_module(root / "mistral", args, full_spec(args))
    tokens = torch.arange(40) % args.vocab_size
    meta = build_training_meta(
        [[40]],
        window=args.sliding_window,
        head_dim=args.head_dim,
        rope_theta=args.rope_theta,
        n_kv_groups=args.n_heads // args.n_kv_heads,
    )
    torch.testing.assert_close(
        m1(m0(tokens, meta), meta, logits="all"), full(tokens, meta, logits="all"), atol=1e-5, rtol=1e-5
    )


def test_module_takes_requested_dtype_and_keeps_grads(saved):
    args, _, root = saved
    m = load_stage_module(root / "hf", args, plan_for(args, 2).stages[1], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad and not p.is_meta for p in m.parameters())


# ------------------------------------------------------------------ bad input
def test_missing_folder():
    with pytest.raises(CheckpointError, match="does not exist.*model.path"):
        load_stage_state("/nonexistent/ckpt", preset("tiny"), full_spec(preset("tiny")))


def test_folder_without_weights(tmp_path):
    args = preset("tiny")
    (tmp_path / "params.json").write_text(json.dumps(args.to_params_json()))
    with pytest.raises(CheckpointError, match=r"no consolidated\*\.safetensors"):
        load_stage_state(tmp_path, args, full_spec(args))
    (tmp_path / "params.json").unlink()
    with pytest.raises(CheckpointError, match="neither params.json"):
        load_model_args(tmp_path)


def test_params_json_that_disagrees_with_shapes(saved, tmp_path):
    args, _, root = saved
    shutil.copytree(root / "mistral", tmp_path, dirs_exist_ok=True)
    params = json.loads((tmp_path / "params.json").read_text())
    params["n_kv_heads"] = 4
    (tmp_path / "params.json").write_text(json.dumps(params))
    bad = load_model_args(tmp_path)
    msg = r"layers\.0\.attention\.wk\.weight has shape \[32, 64\] but params\.json implies \[64, 64\]: the params\.json does not match"
    with pytest.raises(CheckpointError, match=msg):
        load_stage_module(tmp_path, bad, full_spec(bad))


def test_hf_config_that_disagrees_with_shapes(saved, tmp_path):
    args, _, root = saved
    shutil.copytree(root / "hf", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] += 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    bad = load_model_args(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\..* has shape .* but config\.json implies"):
        load_stage_state(tmp_path, bad, full_spec(bad))


def test_missing_tensor(saved, tmp_path):
    args, state, _ = saved
    save_mistral_checkpoint(tmp_path, args, {k: v for k, v in state.items() if k != "layers.1.attention.wk.weight"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*layers\.1\.attention\.wk\.weight.*incomplete"):
        load_stage_state(tmp_path, args, full_spec(args))
    # A stage that does not need the tensor still loads.
    assert load_stage_state(tmp_path, args, plan_for(args, 2).stages[1])


def test_extra_layers(saved, tmp_path):
    args, state, _ = saved
    save_mistral_checkpoint(tmp_path, args, state)
    params = json.loads((tmp_path / "params.json").read_text())
    params["n_layers"] = 2
    (tmp_path / "params.json").write_text(json.dumps(params))
    fewer = load_model_args(tmp_path)
    with pytest.raises(CheckpointError, match=r"layers 0-3 but params\.json says n_layers=2.*should say 4"):
        load_stage_state(tmp_path, fewer, full_spec(fewer))


def test_index_naming_a_missing_shard(saved, tmp_path):
    _, _, root = saved
    shutil.copytree(root / "hf", tmp_path, dirs_exist_ok=True)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    args = load_model_args(tmp_path)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*incomplete"):
        load_stage_state(tmp_path, args, full_spec(args))


# ------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def v1_tokenizer() -> Path:
    path = find_mistral_v1_tokenizer()
    if path is None:
        pytest.skip("mistral-common is not installed")
    return path


def test_mistral_v1_tokenizer_round_trip(v1_tokenizer, tmp_path):
    shutil.copyfile(v1_tokenizer, tmp_path / "tokenizer.model.v1")
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    text = "Hello world! Pipeline parallelism splits 32 layers over 4 GPUs."
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.eos_id not in ids
    assert tok.encode(text, bos=False) == ids[1:]
    assert tok.encode(text, eos=True) == ids + [2]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [2]) == text


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"no tokenizer in '{tmp_path}'")):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer(tmp_path / "tokenizer.model")


# ------------------------------------------------------------------ random checkpoint CLI
def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pp_runtime.checkpoints.random_weights", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_random_checkpoint_cli(tmp_path, v1_tokenizer, capsys):
    out = tmp_path / "ckpt"
    r = _cli("--preset", "tiny", "--out", str(out), "--seed", "3", "--layers", "2", "--tokenizer", str(v1_tokenizer))
    assert r.returncode == 0, r.stderr
    args = load_model_args(out)
    assert args == preset("tiny", n_layers=2, vocab_size=32000)  # the vocabulary follows the tokenizer
    model = load_stage_module(out, args, full_spec(args))
    expected = random_state_dict(args, seed=3, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert Tokenizer.from_dir(out).bos_id == 1
    assert random_checkpoint.main(["--preset", "tiny", "--out", str(out)]) != 0
    assert "--force" in capsys.readouterr().err
