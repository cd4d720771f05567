"""Inference on one GPU, ours and transformers' side by side in one run, as ratios.

    python benchmarks/bench_infer.py --ckpt DIR --prompts FILE.jsonl [--max-new 64] [--out results.json]

DIR is a Mistral-format checkpoint with its tokenizer.model (`python -m pp_runtime.checkpoints.random_weights
--preset mistral-7b --out DIR --device cuda --tokenizer tokenizer.model`); FILE comes from
`benchmarks/make_prompts.py`. Measures, in this order (each side alone on the GPU):
  device    copy bandwidth (bytes read + written) and bf16 matmul peak
  ours      prefill 1x4096 and 8x1024 (one step each), decode B=1 and B=64 (128-token prompts,
            128 new tokens), graph replay vs eager tokens
  batch     `launch/batch_infer.py` over FILE (a subprocess: the real job, JSONL in and out)
  peer      transformers `generate` with the static cache (compiled) at B=1 and B=64, a prefill
            forward at 1x4096 and 8x1024, and `generate_batch` (continuous batching) over FILE
Prints one `RESULT {json}` line per measurement and a table of ratios last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pp_runtime.checkpoints.model_source import ModelSource  # noqa: E402
from pp_runtime.distributed.comm import KIND_DATA
from pp_runtime.distributed.parallel import init_parallel  # noqa: E402
from pp_runtime.inference.batching import Request  # noqa: E402
from pp_runtime.inference.engine import InferenceConfig, StageRunner, run_pipeline  # noqa: E402
from pp_runtime.inference.sampling import SamplingParams  # noqa: E402
from pp_runtime.inference.step_table import Step, StepChunk  # noqa: E402
from pp_runtime.io.tokenizer import Tokenizer  # noqa: E402
from pp_runtime.model.partition import plan_for  # noqa: E402

RESULTS: dict[str, dict] = {}


def emit(key: str, **kw) -> None:
    RESULTS[key] = kw
    print("RESULT " + json.dumps({"what": key, **kw}), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs after one warm-up, with CUDA events."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def device_ceilings(dev) -> tuple[float, float]:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    bw = 2 * x.numel() / timed(lambda: y.copy_(x), 10)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    flops = 2 * 8192**3 / timed(lambda: a @ b, 10)
    emit("device", copy_tb_s=round(bw / 1e12, 3), matmul_tflops=round(flops / 1e12, 1))
    return bw, flops


def random_requests(n: int, prompt_len: int, max_new: int, vocab: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(i, i, "", [1] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)], max_new,
                    SamplingParams()) for i in range(n)]


def file_prompts(path: str, tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(json.loads(line)["prompt"], bos=True) for line in Path(path).read_text().splitlines()]


def stage_flops_per_token(args, n_params: int, context: int) -> float:
    """Forward FLOPs: 2 x parameters (embedding excluded) + 4 x layers x heads x head_dim x keys attended."""
    return 2 * (n_params - args.vocab_size * args.dim) + 4 * args.n_layers * args.n_heads * args.head_dim * context


def ours(a, dev, bw: float, peak: float) -> None:
    ctx = init_parallel(device="cuda" if dev.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    source = ModelSource.from_path(a.ckpt)
    args = source.args
    module = source.build_stage(plan_for(args, 1).stages[0], dtype, dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    n_params = sum(p.numel() for p in module.parameters())
    emit("weights", gb=round(weight_bytes / 1e9, 2), decode_floor_ms=round(1e3 * weight_bytes / bw, 3))  # reading the weights once

    # prefill: one step of one 4096-token chunk, and of 8 packed 1024-token chunks (fresh sequences)
    cfg = InferenceConfig(microbatches=1, batch_size=8, max_batch_tokens=8192, chunk_size=4096).resolved(args, 1)
    runner = StageRunner(args, module, cfg, dev, dtype)
    for rows, length in ((1, a.prefill_len), (8, a.prefill_len // 4)):
        chunks = tuple(StepChunk(i, i, 0, length, True, SamplingParams()) for i in range(rows))
        step = Step(KIND_DATA, chunks, runner.bucket_for(rows * length))
        toks = [random.randrange(3, args.vocab_size) for _ in range(rows * length)]
        dt = timed(lambda: runner.run(step, tokens=toks), 5)
        tflops = rows * length * stage_flops_per_token(args, n_params, length / 2) / dt / 1e12
        emit(f"ours_prefill_{rows}x{length}", ms=round(1e3 * dt, 2), tok_s=round(rows * length / dt),
             tflops=round(tflops, 1), of_matmul_peak=round(tflops * 1e12 / peak, 3))
    del runner

    def decode(batch: int, graphs: bool, prompt_len: int = 128, max_new: int = 128, n: int = 0):
        cfg = InferenceConfig(microbatches=1, batch_size=batch, max_batch_tokens=max(4096, batch),
                              cuda_graphs=graphs).resolved(args, 1)
        runner = StageRunner(args, module, cfg, dev, dtype)
        run_pipeline(ctx, runner, iter(random_requests(batch, 16, 4, args.vocab_size, 1)))  # capture, warm up
        comps, st = run_pipeline(ctx, runner, iter(random_requests(n or batch, prompt_len, max_new, args.vocab_size)))
        return comps, st, runner.graph_summary()

    for batch in (1, 64):
        _, st, graphs = decode(batch, True)
        ms = 1e3 * st.decode_s / max(st.decode_steps, 1)
        emit(f"ours_decode_b{batch}", ms_per_step=round(ms, 3), tok_s=round(batch * 1e3 / ms, 1),
             busy=round(st.busy_fraction[0], 3), graphs=graphs)
    eager, _, _ = decode(8, False, 300, 32)
    graph, _, _ = decode(8, True, 300, 32)
    same = sum(x.tokens == y.tokens for x, y in zip(sorted(eager, key=lambda c: c.request.uid),
                                                   sorted(graph, key=lambda c: c.request.uid)))
    emit("ours_graph_vs_eager", same_sequences=same, of=len(eager))
    del module
    sync()
    torch.cuda.empty_cache() if dev.type == "cuda" else None


def batch_job(a) -> None:
    out = Path(a.workdir) / "batch_out.jsonl"
    for p in (out, Path(str(out) + ".summary.json"), Path(str(out) + ".errors.jsonl")):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "launch" / "batch_infer.py"), f"model.path={a.ckpt}", f"input={a.prompts}",
           f"output={out}", f"max_new_tokens={a.max_new}", "inference.batch_size=64", "progress=false"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        emit("ours_batch", error=r.stderr[-2000:])
        return
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    emit("ours_batch", tok_s=summary["tokens_per_s"], generate_s=summary["generate_s"], wall_s=round(wall, 1),
         prompt_tokens=summary["prompt_tokens"], generated_tokens=summary["generated_tokens"],
         stdout_tail=r.stdout[-600:])


def peer(a, dev) -> None:
    try:
        from transformers import MistralConfig, MistralForCausalLM
    except ImportError as e:
        emit("peer", error=f"transformers missing: {e}")
        return
    args = ModelSource.from_path(a.ckpt).args
    cfg = MistralConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                        vocab_size=args.vocab_size, sliding_window=args.sliding_window, rope_theta=args.rope_theta,
                        max_position_embeddings=args.max_seq_len)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):
        model = MistralForCausalLM(cfg).to(dtype).eval()
    for rows, length in ((1, a.prefill_len), (8, a.prefill_len // 4)):
        ids = torch.randint(3, args.vocab_size, (rows, length), device=dev)
        try:
            with torch.inference_mode():
                dt = timed(lambda: model(ids, logits_to_keep=1), 3)
            emit(f"peer_prefill_{rows}x{length}", ms=round(1e3 * dt, 2), tok_s=round(rows * length / dt),
                 note="8 separate rows, not packed" if rows > 1 else "")
        except Exception as e:  # noqa: BLE001
            emit(f"peer_prefill_{rows}x{length}", error=f"{type(e).__name__}: {e}"[:500])
    peer_decode(model, args.vocab_size, dev, 128)
    peer_batch(model, file_prompts(a.prompts, Tokenizer.from_dir(a.ckpt)), a.max_new)


def peer_decode(model, vocab: int, dev, new_tokens: int) -> None:
    """transformers' per-step decode time at B=1 and B=64 after 128-token prompts: static cache (compiled),
    (generate N tokens - generate 1 token) / (N - 1), so its prefill drops out."""
    for batch in (1, 64):
        ids = torch.randint(3, vocab, (batch, 128), device=dev)
        kw = dict(do_sample=False, pad_token_id=0, cache_implementation="static")
        try:
            with torch.inference_mode():
                for _ in range(2):  # compiles on the first calls
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                one = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), 3)
                full = timed(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw), 3)
            ms = 1e3 * (full - one) / (new_tokens - 1)
            emit(f"peer_decode_b{batch}", ms_per_step=round(ms, 3), tok_s=round(batch * 1e3 / ms, 1),
                 note="static cache, compiled")
        except Exception as e:  # noqa: BLE001 - the peer's failure is a result to report, not ours
            emit(f"peer_decode_b{batch}", error=f"{type(e).__name__}: {e}"[:500])


def peer_batch(model, prompts: list[list[int]], max_new: int) -> None:
    """transformers' `generate_batch` (continuous batching) over the prompts, its warm-up included."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=0)
    try:
        t = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
        sync()
        dt = time.perf_counter() - t
        failed = [k for k, o in out.items() if not o.generated_tokens]
        if len(out) != len(prompts) or failed:
            raise RuntimeError(f"{len(out)} results for {len(prompts)} prompts, {len(failed)} without tokens")
        generated = sum(len(o.generated_tokens) for o in out.values())
        p_tok = sum(len(p) for p in prompts)
        emit("peer_batch", tok_s=round((p_tok + generated) / dt, 1), wall_s=round(dt, 1), prompt_tokens=p_tok,
             generated_tokens=generated, note="generate_batch, warm-up and capture included")
    except Exception as e:  # noqa: BLE001
        emit("peer_batch", error=f"{type(e).__name__}: {e}"[:500])


def table() -> str:
    r = RESULTS.get
    rows = []

    def ratio(x, y, key, higher=True):
        if x is None or y is None or key not in x or key not in y:
            return "n/a"
        return f"{(x[key] / y[key]) if higher else (y[key] / x[key]):.2f}x"

    floor = (r("weights") or {}).get("decode_floor_ms")
    for b in (1, 64):
        o, p = r(f"ours_decode_b{b}"), r(f"peer_decode_b{b}")
        rows.append((f"decode B={b} ms/step", o and o.get("ms_per_step"), p and p.get("ms_per_step"),
                     ratio(o, p, "tok_s")))
    if floor and r("ours_decode_b1"):
        rows.append(("decode B=1 over floor", f"{r('ours_decode_b1')['ms_per_step'] / floor:.2f}x", f"floor {floor} ms", ""))
    for k in [k for k in RESULTS if k.startswith("ours_prefill")]:
        o, p = r(k), r(k.replace("ours", "peer"))
        rows.append((f"prefill {k.split('_')[-1]} tok/s (of peak)", f"{o['tok_s']} ({100 * o['of_matmul_peak']:.0f}%)",
                     p and p.get("tok_s"), ratio(o, p, "tok_s")))
    o, p = r("ours_batch"), r("peer_batch")
    rows.append(("batch file tok/s (prompt+generated)", o and o.get("tok_s"), p and p.get("tok_s"), ratio(o, p, "tok_s")))
    if r("ours_graph_vs_eager"):
        g = r("ours_graph_vs_eager")
        rows.append(("graph == eager tokens", f"{g['same_sequences']}/{g['of']}", "", ""))
    w = max(len(x[0]) for x in rows)
    lines = [f"{'what':<{w}} | ours | peer | ours/peer"] + [f"{a:<{w}} | {b} | {c} | {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--out", default=None, help="write every result as JSON here")
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "batch", "peer"])
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bw, peak = device_ceilings(dev) if dev.type == "cuda" else (1e11, 1e12)
    for name, fn in (("ours", lambda: ours(a, dev, bw, peak)), ("batch", lambda: batch_job(a)),
                     ("peer", lambda: peer(a, dev))):
        if name not in a.skip:
            fn()
    if a.out:
        Path(a.out).write_text(json.dumps(RESULTS, indent=1))
    print(table(), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
