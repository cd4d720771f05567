"""Build the demo model that `launch/infer.py` loads by default, from nothing, in one command:

    python -m pp_runtime.demo.make_demo [--out pp_runtime/demo/model] [--steps N] [--nproc 2]

1. generate the task's training questions and held-out questions (`pp_runtime.demo.task`);
2. train a character-level sentencepiece tokenizer on them (BOS=1, EOS=2 as Mistral's);
3. write a from-scratch model config (Mistral `params.json`, vocabulary sized to the tokenizer);
4. train it with `launch/finetune.py` under torchrun (`--nproc` pipeline stages, 1F1B on CPU)
   and export an inference-ready folder;
5. answer the held-out questions with pipelined `launch/infer.py` (`--eval-nproc` stages),
   check every answer, and install the folder (+ EVAL.json) at `--out` only if the accuracy
   reaches `--min-accuracy`.

With the defaults (1200 steps of 16 x 64 tokens, 2 stages) the whole rebuild takes about 3 minutes
on 2 CPU cores and the model answers ~98% of held-out questions; the numbers of the
run that made the committed model are in its EVAL.json. `--eval-only` re-scores an installed model.
`evaluate` answers any task questions with any model folder; tests/test_demo_model.py uses it.

Try the result (quote the prompt: Hydra does not accept a bare `=` in a value):

    python launch/infer.py 'prompt="48+75="' max_new_tokens=5
    torchrun --nproc_per_node=2 launch/infer.py input=pp_runtime/demo/prompts.jsonl
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from pp_runtime.demo import task
from pp_runtime.distributed.threads import per_process

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path(__file__).resolve().parent / "model"
MODEL_FILES = ("params.json", "consolidated.safetensors", "tokenizer.model")

# A 4-layer Mistral-shaped decoder (GQA, RoPE, sliding window), 0.79M parameters: 2 layers per stage.
MODEL = {
    "dim": 128,
    "n_layers": 4,
    "head_dim": 32,
    "hidden_dim": 384,
    "n_heads": 4,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 64,
    "max_seq_len": 1024,
}

# Training recipe (launch/finetune.py overrides); chosen to pass 90% on CPU in a few CPU-minutes.
TRAIN = {
    "train.steps": 1200,
    "train.batch_size": 16,  # rows of seq_len tokens, ~5 questions per row
    "data.seq_len": 64,
    "train.lr": 2e-3,
    "train.min_lr": 2e-4,
    "train.warmup_steps": 20,
    "train.weight_decay": 0.1,
    "train.grad_clip": 1.0,
    "schedule": "1f1b",
    "schedule.microbatches": 4,
}


# ------------------------------------------------------------------------------------ pieces
def train_tokenizer(out_dir: Path, seed: int = 0) -> Path:
    """Character-level sentencepiece model over the task's characters: every digit, '+' and '='
    is its own piece, no dummy-prefix space, so prompt and answer tokens line up as written."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(task.tokenizer_corpus(seed=seed)), model_writer=model,
        vocab_size=len(task.CHARS) + 3, model_type="char", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        byte_fallback=False, character_coverage=1.0, add_dummy_prefix=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def launcher(nproc: int) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N` (as a module of this interpreter), or plain python for 1."""
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def child_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(per_process(nproc)))  # also keeps torchrun from forcing 1
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_logged(cmd: list[str], env: dict[str, str], timeout: Optional[float] = None,
               echo: bool = True) -> tuple[str, float, float]:
    """Run `cmd`; return (output, wall seconds, CPU seconds of it and its children). Raises on failure."""
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print("  " + line, end="", flush=True)
        proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    out = "".join(lines)
    if proc.returncode != 0:
        tail = "".join(lines[-30:])
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return out, wall, cpu


def evaluate(model_dir: str | Path, examples: Sequence[task.Example], nproc: int = 2, work: Optional[Path] = None,
             timeout: float = 600.0, echo: bool = False) -> dict:
    """Answer `examples` with pipelined `launch/infer.py` (greedy, `nproc` stages) and check them.

    Returns {"questions", "correct", "accuracy", "wall_s", "cpu_s", "results": [{prompt, expected,
    completion, ok}]}.
    """
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="demo_eval_")) if own else Path(work)
    try:
        prompts = write_jsonl(work / "questions.jsonl", [{"id": i, "prompt": e.prompt} for i, e in enumerate(examples)])
        answers = work / "answers.jsonl"
        max_new = len(str(2 * (10 ** task.MAX_DIGITS - 1))) + 2  # the longest answer, EOS, one to spare
        cmd = launcher(nproc) + [str(REPO / "launch" / "infer.py"), f"model.path={Path(model_dir).resolve()}",
                                 f"input={prompts}", f"output={answers}", f"max_new_tokens={max_new}",
                                 "device=cpu", "progress=false"]
        _, wall, cpu = run_logged(cmd, child_env(nproc), timeout=timeout, echo=echo)
        got = {}
        with open(answers, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                got[int(r["id"])] = r
        results = []
        for i, e in enumerate(examples):
            r = got.get(i, {})
            completion = r.get("completion")
            ok = task.check(e.prompt, completion) and r.get("finish_reason") == "stop"
            results.append({"prompt": e.prompt, "expected": e.answer, "completion": completion,
                            "finish_reason": r.get("finish_reason"), "ok": bool(ok)})
        correct = sum(r["ok"] for r in results)
        return {"questions": len(examples), "correct": correct, "accuracy": correct / max(1, len(examples)),
                "stages": nproc, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "results": results}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _final_metrics(metrics_path: Path) -> dict:
    last: dict = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                last = json.loads(line)
    return last


# ------------------------------------------------------------------------------------ main
def train(work: Path, steps: int, nproc: int, n_train: int, seed: int) -> tuple[Path, dict]:
    """Data, tokenizer, config, `launch/finetune.py`; returns the exported folder and what was done."""
    data_dir = work / "data"
    examples = task.train_examples(n_train, seed=seed)
    train_file = write_jsonl(data_dir / "train.jsonl", [e.to_train_json() for e in examples])
    tok_path = train_tokenizer(work / "tokenizer", seed=seed)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok_path)).vocab_size()
    params = dict(MODEL, vocab_size=vocab)
    params_file = work / "params.json"
    params_file.write_text(json.dumps(params, indent=2) + "\n")
    print(f"task: {task.DESCRIPTION}\ndata: {len(examples)} training questions; tokenizer: {vocab} pieces", flush=True)

    export = work / "export"
    overrides = dict(TRAIN)
    overrides["train.steps"] = steps
    cmd = launcher(nproc) + [
        str(REPO / "launch" / "finetune.py"),
        f"data.path={train_file}", f"data.tokenizer={tok_path}", f"data.seed={seed}",
        f"model.params={params_file}", f"model.seed={seed}", "model.dtype=float32", "device=cpu",
        f"out_dir={work / 'run'}", f"export={export}", "export_dtype=float32", "metrics.log_every=100",
    ] + [f"{k}={v}" for k, v in overrides.items()]
    print(f"training ({nproc} pipeline stage(s)):\n  {' '.join(cmd)}", flush=True)
    _, wall, cpu = run_logged(cmd, child_env(nproc))
    final = _final_metrics(work / "run" / "metrics.jsonl")
    print(f"trained in {wall:.1f} s wall, {cpu:.1f} s CPU (all processes); "
          f"final loss {final.get('loss', float('nan')):.4f}", flush=True)
    return export, {
        "processes": nproc, "pipeline_stages": nproc, "steps": steps, "train_questions": len(examples), "seed": seed,
        "overrides": overrides, "final_loss": final.get("loss"), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
    }


def report(model_dir: Path, ev: dict, training: Optional[dict]) -> dict:
    size = sum((model_dir / f).stat().st_size for f in MODEL_FILES)
    return {
        "task": task.DESCRIPTION,
        "heldout": {k: ev[k] for k in ("questions", "correct", "accuracy", "stages")},
        "examples": ev["results"][:10],
        "failures": [r for r in ev["results"] if not r["ok"]][:20],
        "model": {"params": json.loads((model_dir / "params.json").read_text()), "parameters": _count_params(model_dir),
                  "bytes": size, "dtype": "float32"},
        "training": training,
        "rebuild": "python -m pp_runtime.demo.make_demo",
    }


def score(model_dir: Path, n_eval: int, seed: int, nproc: int, work: Path) -> dict:
    heldout = task.heldout_examples(n_eval, seed=seed)
    print(f"evaluating {len(heldout)} held-out questions with pipelined inference ({nproc} stages) ...", flush=True)
    ev = evaluate(model_dir, heldout, nproc=nproc, work=work)
    print(f"held-out accuracy: {ev['correct']}/{ev['questions']} = {100 * ev['accuracy']:.1f}% "
          f"({ev['wall_s']:.1f} s)", flush=True)
    for r in ev["results"][:8]:
        print(f"  {r['prompt']}{r['completion']!s:6} {'ok' if r['ok'] else 'WRONG, expected ' + r['expected']}")
    return ev


def build(out: Path, work: Path, steps: int, nproc: int, eval_nproc: int, n_eval: int, n_train: int, seed: int,
          min_accuracy: float, force: bool) -> int:
    print(f"work folder: {work}", flush=True)
    export, training = train(work, steps, nproc, n_train, seed)
    ev = score(export, n_eval, seed, eval_nproc, work / "eval")
    rep = report(export, ev, training)
    if ev["accuracy"] < min_accuracy and not force:
        print(f"accuracy {100 * ev['accuracy']:.1f}% is below {100 * min_accuracy:.0f}%: {out} left unchanged "
              f"(the model is in {export}; --force installs it anyway)", file=sys.stderr, flush=True)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for f in MODEL_FILES:
        shutil.copyfile(export / f, out / f)
    (out / "EVAL.json").write_text(json.dumps(rep, indent=2) + "\n")
    print(f"installed {out} ({rep['model']['bytes'] / 1e6:.2f} MB, {rep['model']['parameters'] / 1e6:.2f}M parameters) "
          "with EVAL.json", flush=True)
    return 0


def eval_only(out: Path, work: Path, eval_nproc: int, n_eval: int, seed: int) -> int:
    """Re-score the installed model and rewrite its EVAL.json (the training record is kept)."""
    old = json.loads((out / "EVAL.json").read_text()) if (out / "EVAL.json").is_file() else {}
    ev = score(out, n_eval, seed, eval_nproc, work)
    (out / "EVAL.json").write_text(json.dumps(report(out, ev, old.get("training")), indent=2) + "\n")
    print(f"rewrote {out / 'EVAL.json'}", flush=True)
    return 0


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "consolidated.safetensors"), framework="pt") as f:
        total = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
    return total


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pp_runtime.demo.make_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the model goes (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="keep data, checkpoints and logs here (default: a temporary folder, removed)")
    p.add_argument("--steps", type=int, default=TRAIN["train.steps"], help="optimizer steps (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="training processes = pipeline stages (default: %(default)s)")
    p.add_argument("--eval-nproc", type=int, default=2, help="pipeline stages for the evaluation (default: %(default)s)")
    p.add_argument("--eval", type=int, default=500, help="held-out questions to check (default: %(default)s)")
    p.add_argument("--train-examples", type=int, default=40000, help="training questions generated (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.9, help="install only at or above this (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="install even below --min-accuracy")
    p.add_argument("--eval-only", action="store_true", help="only re-score the model at --out and rewrite its EVAL.json")
    a = p.parse_args(argv)

    def go(work: Path) -> int:
        if a.eval_only:
            return eval_only(a.out.resolve(), work, a.eval_nproc, a.eval, a.seed)
        return build(a.out.resolve(), work, a.steps, a.nproc, a.eval_nproc, a.eval, a.train_examples,
                     a.seed, a.min_accuracy, a.force)

    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
        return go(a.work.resolve())
    with tempfile.TemporaryDirectory(prefix="demo_build_") as work:
        return go(Path(work))


if __name__ == "__main__":
    sys.exit(main())
