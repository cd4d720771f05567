"""The `launch/batch_infer.py` job: a resumable JSONL-in, JSONL-out generation run over many prompts.

Files (for `output=out.jsonl`; `errors` defaults to `out.jsonl.errors.jsonl`):

- `out.jsonl.part-R`: replica R's results, appended and flushed line by line as sequences finish
  (finishing order). Only replica R's first stage writes it, so no two processes share a file.
- `out.jsonl.errors.jsonl.part-R`: replica R's rejected input lines (line number and reason).
- `out.jsonl.job.json`: what the results were computed from (input size and hash, model, sampling,
  max_new_tokens); a rerun with another input or other settings is refused (`overwrite=true`
  discards the old results instead).
- `out.jsonl.lock`: held by the running job; a second job on the same output stops at once
  (pp_runtime/io/output_files.py; a lock left by a dead job is taken over).
- At the end, rank 0 merges the existing output and every part file into `out.jsonl`, one line per
  input line sorted by input order (written to a temporary file, then renamed), merges the error
  parts into the errors file, writes `out.jsonl.summary.json` and removes the part files.

Restart (kill -9, node loss, SLURM requeue): rank 0 truncates an incomplete last line of each part
file, collects the input line numbers already present in the output and the parts, and every
replica skips those lines. Error lines are not "done": they are checked again on every run and the
errors file describes the latest run. Each replica reports its end (and statistics) through the
rendezvous store; a replica that dies or freezes meanwhile ends the job (pp_runtime/distributed/liveness.py).

Work split: the input's non-blank lines are numbered 0, 1, 2, ... in order (this number is also the
request uid that keys the sampling stream, so results do not depend on the number of replicas) and
replica R takes the lines whose number % data_parallel == R. Each replica's first stage streams the
whole file but parses only its share; nothing is loaded whole. Across nodes the output folder must
be on a shared filesystem (checked at start-up).

A result line: `id`, `line` (1-based input line), then infer's record: `prompt`, `completion`,
`tokens`, `logprobs`, `finish_reason` ("stop" or "length"), `prompt_tokens`, `generated_tokens`.
An error line: `line`, `id` (when it could be read) and `error`. A run whose every line was
rejected exits non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pp_runtime.distributed.liveness import scoped_store
from pp_runtime.distributed.parallel import agree, init_parallel
from pp_runtime.errors import ConfigError, InputError, PPRuntimeError
from pp_runtime.inference.requests import TokenLimit, check_request, make_request, parse_prompt_line
from pp_runtime.io.jsonl import check_input_file
from pp_runtime.io.output_files import OutputLock
from pp_runtime.jobs.settings import BatchSettings, to_settings
from pp_runtime.jobs.batch_identity import bind_identity, check_identity, job_identity
from pp_runtime.jobs.batch_files import (BatchPaths, JsonlAppender, LineSet, ResumeState, error_record, iter_records,
                                         iter_share, merge_results, prepare_resume)
from pp_runtime.inference.batching import Completion, Request


if TYPE_CHECKING:
    from omegaconf import DictConfig


def build_request(uid: int, line_no: int, line: str, tokenizer, cfg: BatchSettings, limit: TokenLimit,
                  source: str) -> Request:
    rec = parse_prompt_line(line, line_no, source=source)
    req = make_request(uid, rec, tokenizer, cfg.max_new_tokens, cfg.sampling)
    check_request(req, limit, rec.where)
    return req


# ---------------------------------------------------------------------------------------- progress


def _fmt_s(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """Rank 0's view of the whole job. It follows every replica's part files (only the bytes
    appended since the last look), so it counts all replicas without any collective. A tqdm bar on a
    terminal; otherwise one plain line every `interval` seconds (SLURM logs)."""

    def __init__(self, paths: BatchPaths, dp_size: int, todo: int, start_offsets: dict[str, int],
                 enabled: bool, interval: float, stream=None) -> None:
        self.paths, self.dp_size, self.todo = paths, dp_size, todo
        self.enabled = enabled
        self.interval = max(float(interval), 0.1)
        self.stream = stream or sys.stderr
        self._offsets = dict(start_offsets)
        self.done = self.errors = self.generated = self.prompt_tokens = 0
        self.t0 = time.perf_counter()
        self._last_poll = 0.0
        self._last_print = self.t0
        self._bar = None
        if enabled and self.stream.isatty():
            import shutil

            from tqdm import tqdm

            # the size from shutil (COLUMNS/LINES, else the terminal): tqdm's own probe of stderr can read
            # a 0 x 0 terminal, and then it draws nothing
            cols, rows = shutil.get_terminal_size((100, 20))
            self._bar = tqdm(total=todo, desc="batch", unit="req", file=self.stream, ncols=max(cols, 40),
                             nrows=max(rows, 5))

    def _follow(self, path: Path) -> list[dict]:
        key = str(path)
        start = self._offsets.get(key, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offsets[key] = start + end
        out = []
        for raw in data[:end].splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass
        return out

    def poll(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last_poll < 0.5):
            return
        self._last_poll = now
        n_before = self.done + self.errors
        for r in range(self.dp_size):
            for rec in self._follow(self.paths.part(r)):
                self.done += 1
                self.generated += int(rec.get("generated_tokens", 0))
                self.prompt_tokens += int(rec.get("prompt_tokens", 0))
            self.errors += len(self._follow(self.paths.error_part(r)))
        elapsed = now - self.t0
        if self._bar is not None:
            self._bar.update(self.done + self.errors - n_before)
            self._bar.set_postfix_str(f"{self.generated / max(elapsed, 1e-9):,.0f} tok/s, {self.errors} errors",
                                      refresh=False)
        elif force or now - self._last_print >= self.interval:
            self._last_print = now
            print(self.line(elapsed), file=self.stream, flush=True)

    def line(self, elapsed: float) -> str:
        n = self.done + self.errors
        rate = n / max(elapsed, 1e-9)
        eta = (self.todo - n) / rate if rate > 0 else float("inf")
        pct = 100.0 * n / self.todo if self.todo else 100.0
        return (f"progress: {n}/{self.todo} ({pct:.1f}%) | {self.errors} errors | {rate:,.2f} req/s | "
                f"{self.generated / max(elapsed, 1e-9):,.1f} generated tok/s | elapsed {_fmt_s(elapsed)} | "
                f"ETA {_fmt_s(eta) if eta != float('inf') else '?'}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------------------------ the job


@dataclass
class ReplicaStats:
    replica: int
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    generate_s: float = 0.0
    stage_busy: list = field(default_factory=list)  # per stage: compute time over loop time


def _broadcast(ctx, obj):
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _validate_share(cfg: BatchSettings, ctx, paths: BatchPaths, done: LineSet, tokenizer, limit) -> None:
    """strict=true: check this replica's share before any generation, so a bad line stops every rank
    at once with the same message instead of killing one pipeline mid-run."""
    for uid, line_no, line in iter_share(paths.input, ctx.dp_rank, ctx.dp_size, done):
        try:
            build_request(uid, line_no, line, tokenizer, cfg, limit, cfg.input)
        except PPRuntimeError as e:
            raise InputError(f"{e} (strict=true; without it bad lines go to {paths.errors})") from None


def run(cfg: "BatchSettings | DictConfig") -> int:
    cfg = to_settings(cfg, "batch_infer")
    t_start = time.perf_counter()
    paths = BatchPaths.from_config(cfg)
    ctx = init_parallel(cfg.pipeline.stages, cfg.pipeline.data_parallel, cfg.device)
    # rank 0 claims the output (lock, same input and settings) before any rank loads the model
    lock = agree(ctx, lambda: _claim_output(cfg, paths) if ctx.rank == 0 else None)
    try:
        return _run(cfg, ctx, paths, t_start)
    finally:
        if lock is not None:
            lock.release()


def _claim_output(cfg: BatchSettings, paths: BatchPaths) -> OutputLock:
    check_input_file(paths.input)
    lock = OutputLock.acquire(paths.lock, f"output {paths.output}")
    try:
        if not cfg.overwrite:
            check_identity(paths.sidecar, job_identity(paths.input, cfg), paths.has_results(), paths.output)
    except BaseException:
        lock.release()
        raise
    return lock


def _prepare_output(cfg: BatchSettings, paths: BatchPaths) -> tuple[ResumeState, Path]:
    """Rank 0, once the model loaded: start over (overwrite=true) or resume, record what the results
    are computed from, and leave a probe file the other first stages must see."""
    if cfg.overwrite:
        paths.discard_results()
    bind_identity(paths.sidecar, job_identity(paths.input, cfg))
    state = prepare_resume(paths)
    probe = paths.output.with_name(f".{paths.output.name}.probe-{os.getpid()}-{time.time_ns()}")
    probe.touch()
    return state, probe


def _run(cfg: BatchSettings, ctx, paths: BatchPaths, t_start: float) -> int:
    from pp_runtime.jobs.infer import completion_record, setup_inference

    strict = cfg.strict
    setup = setup_inference(cfg, ctx)
    source, runner, tokenizer = setup.source, setup.runner, setup.tokenizer
    prepared = agree(ctx, lambda: _prepare_output(cfg, paths) if ctx.rank == 0 else None)
    state, probe = prepared if prepared is not None else (None, None)
    shared = _broadcast(ctx, None if state is None else
                        (bytes(state.done.bits), state.n_done, state.input_lines, str(probe)))
    done, n_done, n_input = LineSet(shared[0]), shared[1], shared[2]
    if ctx.rank == 0:
        msg = f"batch: {n_input} input lines, {n_done} already done"
        if state.repaired_bytes:
            msg += f" (repaired {state.repaired_bytes} bytes of a cut-off write)"
        print(msg + f", {n_input - n_done} to run on {ctx.dp_size} replica(s) x {ctx.pp_size} stage(s)", flush=True)

    limit = TokenLimit.of(source.args, runner.capacity)

    def first_stage_checks() -> None:
        if not ctx.is_first:
            return
        if not Path(shared[3]).exists():
            raise ConfigError(
                f"rank {ctx.rank} cannot see {paths.output.parent} as rank 0 does; every replica writes its "
                "results beside output=, so on several nodes it must be on a shared filesystem"
            )
        if strict:
            _validate_share(cfg, ctx, paths, done, tokenizer, limit)

    try:
        agree(ctx, first_stage_checks)  # can fail on some ranks only: raised on every rank
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)

    progress = None
    if ctx.rank == 0:
        progress = Progress(paths, ctx.dp_size, n_input - n_done, state.offsets, cfg.progress, cfg.progress_interval)

    stats = ReplicaStats(ctx.dp_rank)
    results = errors = None
    line_of: dict[int, int] = {}

    def requests() -> Iterator[Request]:
        for uid, line_no, line in iter_share(paths.input, ctx.dp_rank, ctx.dp_size, done):
            try:
                req = build_request(uid, line_no, line, tokenizer, cfg, limit, cfg.input)
            except PPRuntimeError as e:
                if strict:
                    raise
                errors.write(error_record(line_no, line, str(e)))
                stats.errors += 1
                if progress is not None:
                    progress.poll()
                continue
            line_of[uid] = line_no
            yield req

    def on_complete(c: Completion) -> None:
        rec = completion_record(c, tokenizer)
        rec = {"id": rec.pop("id"), "line": line_of.pop(c.request.uid), **rec}
        results.write(rec)
        stats.requests += 1
        stats.prompt_tokens += rec["prompt_tokens"]
        stats.generated_tokens += rec["generated_tokens"]
        if progress is not None:
            progress.poll()

    from pp_runtime.inference.engine import run_pipeline

    if ctx.is_first:
        results, errors = JsonlAppender(paths.part(ctx.dp_rank)), JsonlAppender(paths.error_part(ctx.dp_rank))
    t_gen = time.perf_counter()
    try:
        _, run_stats = run_pipeline(ctx, runner, requests() if ctx.is_first else None,
                                    tokenizer.eos_id if tokenizer is not None else None, on_complete=on_complete)
        stats.stage_busy = [round(f, 3) for f in run_stats.busy_fraction]
    finally:
        for f in (results, errors):
            if f is not None:
                f.close()
    stats.generate_s = time.perf_counter() - t_gen
    store = scoped_store("batch") if ctx.distributed else None
    if ctx.is_first:
        if errors is not None and stats.errors == 0:
            paths.error_part(ctx.dp_rank).unlink(missing_ok=True)
        if store is not None:
            store.set(f"done/{ctx.dp_rank}", json.dumps(asdict(stats)))
    if ctx.rank != 0:
        return 0
    reps = [stats] if store is None else _wait_for_replicas(store, ctx.dp_size, progress)
    return _finish(ctx, paths, progress, reps, n_input, n_done, t_start)


def _wait_for_replicas(store, dp_size: int, progress: Progress) -> list[ReplicaStats]:
    """Rank 0 follows the other replicas' part files until each reported its end in the store; a
    replica that dies or freezes meanwhile ends this wait through the liveness watchdog."""
    keys = [f"done/{r}" for r in range(dp_size)]
    while not store.check(keys):
        progress.poll()
        time.sleep(0.2)
    return [ReplicaStats(**json.loads(v)) for v in store.multi_get(keys)]


def _finish(ctx, paths: BatchPaths, progress: Progress, reps: list[ReplicaStats], n_input: int, n_done: int,
            t_start: float) -> int:
    progress.poll(force=True)
    progress.close()
    parts = paths.parts()
    sources = ([paths.output] if paths.output.is_file() else []) + parts
    n_results = merge_results(sources, paths.output) if parts or not paths.output.is_file() else \
        sum(1 for _ in iter_records(paths.output))
    err_parts = paths.error_parts()
    n_errors = merge_results(err_parts, paths.errors) if err_parts else 0
    for p in [*parts, *err_parts]:
        p.unlink(missing_ok=True)

    wall = time.perf_counter() - t_start
    gen_s = max((r.generate_s for r in reps), default=0.0)
    requests = sum(r.requests for r in reps)
    prompt_tokens = sum(r.prompt_tokens for r in reps)
    generated = sum(r.generated_tokens for r in reps)
    summary = {
        "input": str(paths.input),
        "output": str(paths.output),
        "errors_file": str(paths.errors) if n_errors else None,
        "input_lines": n_input,
        "skipped_already_done": n_done,
        "requests": requests,
        "errors": n_errors,
        "results_in_output": n_results,
        "complete": n_results + n_errors == n_input,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
        "generate_s": round(gen_s, 3),
        "requests_per_s": round(requests / max(gen_s, 1e-9), 3),
        "generated_tokens_per_s": round(generated / max(gen_s, 1e-9), 2),
        "tokens_per_s": round((prompt_tokens + generated) / max(gen_s, 1e-9), 2),
        "replicas": ctx.dp_size,
        "stages": ctx.pp_size,
        "stage_busy": [r.stage_busy for r in reps],
    }
    tmp = paths.summary.with_name(paths.summary.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(paths.summary)
    print(
        f"batch done: {requests} requests ({n_done} skipped as already done), {n_errors} errors | "
        f"{prompt_tokens} prompt + {generated} generated tokens | {summary['requests_per_s']:.2f} req/s, "
        f"{summary['generated_tokens_per_s']:,.1f} generated tok/s | wall {wall:.1f}s\n"
        f"results: {paths.output} ({n_results} lines)"
        + (f" | errors: {paths.errors}" if n_errors else "") + f" | summary: {paths.summary}",
        flush=True,
    )
    if n_errors and not n_results:
        raise InputError(f"every input line was rejected ({n_errors} errors, see {paths.errors}); nothing was generated")
    return 0
