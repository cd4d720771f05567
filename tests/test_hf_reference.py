"""Our model, loaded from Hugging Face checkpoints, against transformers' own Mistral / Mixtral.

The prompts are several sliding windows long, so the window mask, the ring buffer wrap-around
and the rotary permutation undone by the loader all have to be right for the logits to agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from pp_runtime.checkpoints.formats import full_spec, load_model_args, load_stage_module, load_stage_state  # noqa: E402
from pp_runtime.model.args import ModelArgs  # noqa: E402
from pp_runtime.model.attention_meta import SeqChunk, build_inference_meta, build_training_meta  # noqa: E402
from pp_runtime.model.kv_cache import RollingKVCache  # noqa: E402
from pp_runtime.model.moe import stack_experts_  # noqa: E402
from pp_runtime.model.transformer import StageModule  # noqa: E402

from ckpt_helpers import random_state_dict, save_hf_checkpoint  # noqa: E402

WINDOW = 16
PROMPT_LENS = (45, 61)  # ~3-4 windows, unequal so packed chunks differ in length
NEW_TOKENS = 24
ATOL = 1e-4


def _hf_config(moe: bool):
    common = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    if moe:
        return transformers.MixtralConfig(
            intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, **common
        )
    return transformers.MistralConfig(intermediate_size=128, **common)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations (not the near-zero default) and non-trivial norm gains."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


_BUILT: dict[str, tuple[torch.nn.Module, Path]] = {}


def _build_hf(kind: str, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """(HF model in eager attention, folder it was saved to with save_pretrained), built once per module."""
    if kind not in _BUILT:
        moe = kind == "mixtral"
        torch.manual_seed(0)
        cls = transformers.MixtralForCausalLM if moe else transformers.MistralForCausalLM
        model = cls(_hf_config(moe))
        _randomise(model, seed=1)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder, max_shard_size="100KB")  # several shards + index
        _BUILT[kind] = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval(), folder
    return _BUILT[kind]


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def hf_pair(request, tmp_path_factory):
    return _build_hf(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mixtral_pair(tmp_path_factory):
    return _build_hf("mixtral", tmp_path_factory)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist() for n in PROMPT_LENS]


def _full_logits(model: StageModule, args: ModelArgs, tokens: list[int], window: int | None) -> torch.Tensor:
    meta = build_training_meta(
        [[len(tokens)]],
        window=window,
        head_dim=args.head_dim,
        rope_theta=args.rope_theta,
        n_kv_groups=args.n_heads // args.n_kv_heads,
    )
    return model(torch.tensor(tokens), meta, logits="all")


def greedy_generate(
    model: StageModule, args: ModelArgs, prompts: list[list[int]], n_new: int, chunk: int
) -> list[list[int]]:
    """Packed chunked prefill then one-token decode steps through the rolling cache; greedy."""
    cache = RollingKVCache(
        list(model.spec.layers), len(prompts), args.window, args.n_kv_heads, args.head_dim, torch.float32
    )
    seqs = [list(p) for p in prompts]
    fed = [0] * len(prompts)  # tokens of each sequence already in the cache
    out: list[list[int]] = [[] for _ in prompts]
    while any(len(o) < n_new for o in out):
        chunks, tokens, active = [], [], []
        for s, seq in enumerate(seqs):
            if len(out[s]) >= n_new:
                continue
            take = min(chunk, len(seq) - fed[s])
            chunks.append(SeqChunk(s, fed[s], take))
            tokens += seq[fed[s] : fed[s] + take]
            active.append(s)
            fed[s] += take
        meta = build_inference_meta(
            chunks,
            capacity=args.window,
            window=args.sliding_window,
            head_dim=args.head_dim,
            rope_theta=args.rope_theta,
            n_kv_groups=args.n_heads // args.n_kv_heads,
        )
        logits = model(torch.tensor(tokens), meta, cache, logits="last")
        for row, s in enumerate(active):
            if fed[s] == len(seqs[s]):  # the chunk reached the end: its last logits pick the next token
                tok = int(logits[row].argmax())
                seqs[s].append(tok)
                out[s].append(tok)
    return out


@torch.no_grad()
def test_full_sequence_logits_match_transformers(hf_pair):
    hf, folder = hf_pair
    args = load_model_args(folder)
    assert args.sliding_window == WINDOW and args.is_moe == isinstance(hf, transformers.MixtralForCausalLM)
    ours = load_stage_module(folder, args, full_spec(args), torch.float32).eval()
    for tokens in _prompts(args.vocab_size):
        expected = hf(torch.tensor([tokens])).logits[0]
        got = _full_logits(ours, args, tokens, args.sliding_window)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)
        # The comparison only means something if the window changes the result this far in.
        no_window = _full_logits(ours, args, tokens, None)
        assert (no_window[2 * WINDOW :] - expected[2 * WINDOW :]).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("chunk", [WINDOW, 7])
def test_greedy_decoding_with_rolling_cache_matches_generate(hf_pair, chunk):
    hf, folder = hf_pair
    args = load_model_args(folder)
    ours = load_stage_module(folder, args, full_spec(args), torch.float32).eval()
    prompts = _prompts(args.vocab_size)
    got = greedy_generate(ours, args, prompts, NEW_TOKENS, chunk)
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert tokens == expected[0, len(prompt) :].tolist()


@torch.no_grad()
def test_fused_expert_layout_loads_like_per_expert_layout(mixtral_pair, tmp_path):
    """transformers >= 5 keeps experts fused in memory (`mlp.experts.gate_up_proj`); such files load too."""
    hf, folder = mixtral_pair
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if not any(k.endswith("experts.gate_up_proj") for k in state):
        pytest.skip("installed transformers keeps per-expert tensors in memory")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    args = load_model_args(folder)
    fused = load_stage_state(tmp_path, args, full_spec(args))
    legacy = load_stage_state(folder, args, full_spec(args))
    assert fused.keys() == legacy.keys()
    for k in legacy:
        assert torch.equal(fused[k], legacy[k]), k


@torch.no_grad()
@pytest.mark.parametrize("moe", [False, True], ids=["mistral", "mixtral"])
def test_our_hf_writer_loads_in_transformers(moe, tmp_path):
    """save_hf_checkpoint writes what transformers reads: same logits as our model on the same weights."""
    cls = transformers.MixtralForCausalLM if moe else transformers.MistralForCausalLM
    cfg = _hf_config(moe)
    args = ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": [cls.__name__]})
    state = {
        k: v * 8 if v.dim() == 2 else v + 0.1 * torch.randn(v.shape) for k, v in random_state_dict(args, seed=3).items()
    }
    save_hf_checkpoint(tmp_path, args, state, shards=3)
    hf = cls.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    ours = StageModule(args, full_spec(args))
    ours.load_state_dict(stack_experts_(state))  # checkpoint layout -> stacked experts
    tokens = _prompts(args.vocab_size)[1]
    torch.testing.assert_close(
        _full_logits(ours, args, tokens, WINDOW), hf(torch.tensor([tokens])).logits[0], atol=ATOL, rtol=ATOL
    )
