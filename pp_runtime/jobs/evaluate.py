"""Exact-match evaluation: answer questions greedily with pipelined generation over a model folder
and compare with the expected answers. A fine-tuning run scores its export this way at the end
(`eval.path`, or the demo task's held-out questions)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.distributed.parallel import ParallelContext, agree
from pp_runtime.errors import InputError
from pp_runtime.inference.batching import Completion, Request
from pp_runtime.inference.engine import InferenceConfig, StageRunner, run_pipeline
from pp_runtime.inference.sampling import SamplingParams
from pp_runtime.model.partition import plan_for


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: str


@dataclass
class EvalResult:
    results: list[dict]  # per question, in order: prompt, expected, completion, finish_reason, ok

    @property
    def correct(self) -> int:
        return sum(r["ok"] for r in self.results)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, len(self.results))

    def summary(self) -> str:
        return f"{self.correct}/{len(self.results)} = {100 * self.accuracy:.1f}%"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in self.results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_questions(path: Path) -> list[Question]:
    """`{"prompt": ..., "completion": ...}` lines (the training format); InputError with the line number."""
    if not path.is_file():
        raise InputError(f"eval file {str(path)!r} does not exist; set eval.path to a JSONL file or eval.path=null")
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {no}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str)):
                raise InputError(f"{path} line {no}: expected {{\"prompt\": \"...\", \"completion\": \"...\"}}")
            out.append(Question(obj["prompt"], obj["completion"]))
    if not out:
        raise InputError(f"eval file {path} has no questions")
    return out


def demo_questions(n: int, seed: int = 0) -> list[Question]:
    """`n` held-out questions of the demo task (never in any of its training sets)."""
    from pp_runtime.demo import task

    return [Question(e.prompt, e.answer) for e in task.heldout_examples(n, seed=seed)]


def evaluate(ctx: ParallelContext, model_dir: Path, questions: Sequence[Question], dtype: torch.dtype,
             adapter: Optional[Path] = None) -> Optional[EvalResult]:
    """Every rank serves its stage of `model_dir` (split like an inference run over this job's
    ranks), with a LoRA `adapter` folder merged in; each replica answers every dp_size-th question. Rank 0 returns the result, others None.

    An answer is right when the completion, stripped, equals the expected one and generation
    stopped at EOS (at most the answer's length + 2 tokens are generated)."""
    from pp_runtime.checkpoints.formats import load_model_args
    from pp_runtime.jobs.infer import load_tokenizer

    def build() -> tuple[StageRunner, object]:
        source = ModelSource(load_model_args(model_dir), model_dir)
        spec = plan_for(source.args, ctx.pp_size).stages[ctx.pp_rank]
        module = source.build_stage(spec, dtype, ctx.device)
        if adapter is not None:  # a PEFT LoRA adapter, merged at load as inference does
            from pp_runtime.training.peft_export import apply_peft_adapter_

            apply_peft_adapter_(module, adapter, source.args)
        icfg = InferenceConfig().resolved(source.args, ctx.pp_size)
        tokenizer = load_tokenizer(source) if ctx.is_first else None
        return StageRunner(source.args, module, icfg, ctx.device, dtype), tokenizer

    runner, tokenizer = agree(ctx, build)
    requests = None
    if ctx.is_first:
        greedy = SamplingParams(0.0, 1.0, 0, 0)
        requests = iter([
            Request(uid=i, id=i, prompt=q.prompt, prompt_tokens=tokenizer.encode(q.prompt, bos=True),
                    max_new_tokens=len(tokenizer.encode(q.answer, bos=False)) + 2, sampling=greedy)
            for i, q in enumerate(questions) if i % ctx.dp_size == ctx.dp_rank
        ])
    done: list[tuple[int, str, str]] = []

    def on_complete(c: Completion) -> None:
        done.append((c.request.uid, tokenizer.decode(c.tokens), c.finish_reason))

    run_pipeline(ctx, runner, requests, tokenizer.eos_id if tokenizer else None, on_complete)
    if ctx.distributed:
        gathered: Optional[list] = [None] * ctx.world_size if ctx.rank == 0 else None
        dist.gather_object(done, gathered, dst=0)
        done = [d for part in (gathered or []) for d in part]
    if ctx.rank != 0:
        return None
    answers = {uid: (text, reason) for uid, text, reason in done}
    results = []
    for i, q in enumerate(questions):
        text, reason = answers[i]
        results.append({"prompt": q.prompt, "expected": q.answer, "completion": text, "finish_reason": reason,
                        "ok": text.strip() == q.answer.strip() and reason == "stop"})
    return EvalResult(results)
