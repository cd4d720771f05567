"""The batch job over one prompt file on 1 GPU, as 2 replicas and as 2 pipeline stages, in one run;
then float32 greedy tokens of 2 stages against 1 GPU.

    python benchmarks/bench_layouts.py --ckpt DIR --prompts FILE.jsonl [--max-new 64] [--gpus 2]

Every layout runs the real entry points (`launch/batch_infer.py`, `launch/infer.py`) as
subprocesses, one after the other, and reads their summaries. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(script: str, ranks: int, overrides: list[str], visible: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible, NCCL_NVLS_ENABLE="0")
    head = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                 f"--nproc_per_node={ranks}"]
    return subprocess.run(head + [str(REPO / "launch" / script), *overrides], env=env, capture_output=True, text=True)


def batch(a, name: str, ranks: int, layout: list[str], visible: str) -> dict:
    out = Path(a.workdir) / f"{name}.jsonl"
    for p in out.parent.glob(out.name + "*"):
        p.unlink()
    t = time.perf_counter()
    r = launch("batch_infer.py", ranks, [f"model.path={a.ckpt}", f"input={a.prompts}", f"output={out}",
                                         f"max_new_tokens={a.max_new}", "inference.batch_size=64", "progress=false",
                                         *layout], visible)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], flush=True)
        return {"layout": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    s = json.loads(Path(str(out) + ".summary.json").read_text())
    res = {"layout": name, "tok_s": s["tokens_per_s"], "generate_s": s["generate_s"], "wall_s": round(wall, 1),
           "busy": s.get("stage_busy"), "tokens": [s["prompt_tokens"], s["generated_tokens"]]}
    print("RESULT " + json.dumps(res), flush=True)
    return res


def greedy_tokens(a, ranks: int, layout: list[str], visible: str, name: str) -> list:
    out = Path(a.workdir) / f"greedy_{name}.jsonl"
    lines = Path(a.prompts).read_text().splitlines()[: a.greedy_prompts]
    src = Path(a.workdir) / "greedy_in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    r = launch("infer.py", ranks, [f"model.path={a.ckpt}", f"input={src}", f"output={out}", "max_new_tokens=32",
                                   "model.dtype=float32", "progress=false", *layout], visible)
    if r.returncode != 0:
        print(r.stderr[-3000:], flush=True)
        return []
    return [json.loads(x)["tokens"] for x in out.read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--greedy-prompts", type=int, default=16)
    p.add_argument("--workdir", default="/tmp")
    a = p.parse_args()
    runs = [batch(a, "one_gpu", 1, [], "0"),
            batch(a, "two_replicas", 2, ["pipeline.stages=1", "pipeline.data_parallel=2"], "0,1"),
            batch(a, "two_stages", 2, ["pipeline.stages=2"], "0,1")]
    one, two = greedy_tokens(a, 1, [], "0", "1"), greedy_tokens(a, 2, ["pipeline.stages=2"], "0,1", "2")
    same = sum(x == y for x, y in zip(one, two))
    print(f"RESULT {json.dumps({'greedy_float32_2_stages_vs_1': same, 'of': len(one)})}", flush=True)
    base = {r["layout"]: r.get("tok_s") for r in runs}
    print("layout | prompt+generated tok/s | vs 1 GPU | busy per stage")
    for r in runs:
        ratio = f"{r['tok_s'] / base['one_gpu']:.2f}x" if r.get("tok_s") and base.get("one_gpu") else "n/a"
        print(f"{r['layout']} | {r.get('tok_s', r.get('error'))} | {ratio} | {r.get('busy')}")
    if base.get("two_stages") and base.get("two_replicas"):
        print(f"2 stages / 2 replicas: {base['two_stages'] / base['two_replicas']:.2f}x")
    print(f"float32 greedy, 2 stages == 1 GPU: {same}/{len(one)} prompts")


if __name__ == "__main__":
    main()
