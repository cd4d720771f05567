"""Training checkpoints: one shard per stage, a manifest, atomic commits, re-split on load, export.

Layout of ``CHECKPOINT_DIR/step_00000120/``::

    manifest.json                 step, data position, model args, plan, config, file list
    stage000.safetensors          weights of stage 0 under their global names (layers.3.attention.wq.weight, ...)
    stage000.optim.safetensors    AdamW state of those weights: NAME.exp_avg, NAME.exp_avg_sq, NAME.step
    ...
    rank000.json                  RNG state of pipeline rank 0 (and the stages it held)

Weights and optimizer state are stored under global parameter names, so loading under another
split (2 stages saved, 4 or 1 loading, or other virtual stages) is a key lookup across shards.
Experts are stored one by one under Mistral's names (``layers.3.feed_forward.experts.5.w1.weight``,
its AdamW state beside it), however the model stacks them in memory.
With a bfloat16 model the weights stored are the float32 master weights the optimizer updates,
so a resume continues bit for bit. Data-parallel replicas hold the same state, so only replica 0
writes.

Atomic: every rank writes into ``.tmp-step_XXXXXXXX/`` (each file under a temporary name, fsynced,
then renamed), all ranks meet at a barrier, rank 0 writes the manifest last and renames the folder
to ``step_XXXXXXXX`` (one atomic rename). A kill at any moment leaves either the new complete
checkpoint or none, so the previous one stays the latest; stale temporary folders are removed by
the next save. Only folders with a manifest count as checkpoints. Across nodes, the checkpoint
folder must be on a filesystem every node sees (rank 0 creates and commits what the others write).

Offline export: ``python -m pp_runtime.training.checkpoint export CHECKPOINT OUT [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pp_runtime.checkpoints.formats import (TORCH_DTYPES, check_finite, full_spec, open_safetensors, stage_shapes,
                                           write_safetensors_streaming)
from pp_runtime.errors import CheckpointError, PPRuntimeError
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.moe import per_expert_names, stack_experts_, unstack_experts
from pp_runtime.model.partition import StageSpec

FORMAT = "pp_runtime-train-v1"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def weights_file(stage: int) -> str:
    return f"stage{stage:03d}.safetensors"


def optim_file(stage: int) -> str:
    return f"stage{stage:03d}.optim.safetensors"


def rank_file(pp_rank: int) -> str:
    return f"rank{pp_rank:03d}.json"


# ---------------------------------------------------------------------------------- small io
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """safetensors under a temporary name, fsynced, then renamed into place."""
    part = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(part), metadata={"format": "pt"})
    _fsync_file(part)
    os.replace(part, path)


def _write_json(path: Path, data: Any) -> None:
    part = path.with_name(path.name + ".partial")
    part.write_text(json.dumps(data, indent=2, sort_keys=False))
    _fsync_file(part)
    os.replace(part, path)


def _write_shard(tmp: Path, stage: int, weights: Mapping[str, torch.Tensor], optim: Mapping[str, torch.Tensor]) -> None:
    """One stage's weights and optimizer state (a separate function so tests can interrupt it)."""
    _write_tensors(tmp / weights_file(stage), weights)
    _write_tensors(tmp / optim_file(stage), optim)


def _commit(tmp: Path, final: Path) -> None:
    """Make the checkpoint visible in one rename (replacing an older one of the same step)."""
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f"{_TMP_PREFIX}old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------- rng
def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
    }
    if device is not None and device.type == "cuda":
        state["torch_cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
    if "torch_cpu" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8))
    if "python" in state:
        random.setstate(_tupled(state["python"]))
    if device is not None and device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cuda"])), dtype=torch.uint8), device)


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------- saving
def spec_json(spec: StageSpec) -> dict[str, Any]:
    return {"index": spec.index, "rank": spec.rank, "first": spec.first, "last": spec.last,
            "has_embedding": spec.has_embedding, "has_head": spec.has_head}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_train_checkpoint(
    root: str | Path,
    *,
    step: int,
    shards: Mapping[int, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    stages: Sequence[StageSpec],
    args: ModelArgs,
    rank: int = 0,
    pp_rank: int = 0,
    dp_rank: int = 0,
    position: int = 0,
    data: Optional[Mapping[str, Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
    tokenizer: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
    keep: int = 0,
    device: Optional[torch.device] = None,
) -> Path:
    """Collective over all ranks (barriers on the default group when distributed).

    `shards` maps each local stage index to (weights, optimizer state) by global name; `stages`
    is the whole plan (every stage, for the manifest); stacked experts are written one by one. Returns the committed folder. `keep` > 0
    deletes all but the newest `keep` checkpoints afterwards.
    """
    root = Path(root)
    name = checkpoint_name(step)
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    if dp_rank == 0:
        for s, (weights, optim) in sorted(shards.items()):
            n_experts = args.moe.num_experts if args.moe else None
            _write_shard(tmp, s, unstack_experts(weights), unstack_experts(optim, n_experts))
        _write_json(tmp / rank_file(pp_rank), {"pp_rank": pp_rank, "stages": sorted(shards), "rng": rng_state(device)})
    _barrier()
    if rank == 0:
        missing = [f for s in stages for f in (weights_file(s.index), optim_file(s.index)) if not (tmp / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {name}: shard files {', '.join(missing)} were not written; not committing it")
        manifest = {
            "format": FORMAT,
            "step": int(step),
            "model_args": args.to_params_json(),
            "stages": [spec_json(s) for s in stages],
            "n_ranks": max(s.rank for s in stages) + 1,
            "files": {"weights": [weights_file(s.index) for s in stages], "optim": [optim_file(s.index) for s in stages]},
            "data": {"position": int(position), **dict(data or {})},
            "tokenizer": tokenizer,
            "config": dict(config or {}),
            **dict(extra or {}),
        }
        _write_json(tmp / MANIFEST, manifest)
        _commit(tmp, final)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# ---------------------------------------------------------------------------------- finding & reading
def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a folder counts once its manifest exists)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: Optional[str], root: Path) -> Optional[Path]:
    """`resume`: None/"" (fresh start), "auto" (latest under `root`, else fresh) or a folder.

    A folder holding step_* checkpoints (rather than one checkpoint) means its latest one.
    """
    if resume in (None, "", False):
        return None
    if str(resume) == "auto":
        return latest_checkpoint(root)
    path = Path(str(resume)).expanduser().resolve()
    if (path / MANIFEST).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise CheckpointError(
        f"resume={resume}: {path} is not a training checkpoint (no {MANIFEST}) and holds none; "
        "point it at a step_* folder written by launch/finetune.py, or use resume=auto"
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint: it has no {MANIFEST}")
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is damaged, use an older one") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{f} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def manifest_args(manifest: Mapping[str, Any]) -> ModelArgs:
    return ModelArgs.from_params_json(manifest["model_args"])


def check_same_model(manifest: Mapping[str, Any], args: ModelArgs, path: str | Path) -> None:
    """A checkpoint of another architecture cannot be resumed: say which fields differ."""
    saved = manifest_args(manifest).to_params_json()
    want = args.to_params_json()
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {want.get(k)!r}" for k in sorted(set(saved) | set(want))
            if saved.get(k) != want.get(k)]
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model ({'; '.join(diff)}); resume it with the same "
            "model config, or start fresh (resume=null, or another checkpoint.dir)"
        )


def _shard_paths(path: Path, manifest: Mapping[str, Any], kind: str) -> list[Path]:
    return [path / f for f in manifest["files"][kind]]


def load_tensors(
    path: str | Path,
    names: Iterable[str],
    *,
    kind: str = "weights",
    manifest: Optional[Mapping[str, Any]] = None,
    device: torch.device | str = "cpu",
    required: bool = True,
) -> dict[str, torch.Tensor]:
    """Tensors `names` from whichever stage shards hold them (`kind`: "weights" or "optim").

    Only headers are read to find them, then only the wanted tensors: any split loads any other.
    A stacked expert name (`...experts.w1`, `...experts.w1.exp_avg`) is read expert by expert and
    returned stacked.
    """
    path = Path(path)
    manifest = manifest or read_manifest(path)
    moe = manifest_args(manifest).moe
    wanted = {n for name in names for n in per_expert_names(name, moe.num_experts if moe else 0)}
    out: dict[str, torch.Tensor] = {}
    for f in _shard_paths(path, manifest, kind):
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {f.name}; it is incomplete, use an older one")
        with open_safetensors(f) as h:
            for key in wanted.intersection(h.keys()):
                out[key] = check_finite(h.get_tensor(key).to(device), key, f)
    missing = sorted(wanted - set(out))
    if missing and required:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} {kind} tensor(s): {shown}")
    return stack_experts_(out)


def optim_keys(param_names: Iterable[str]) -> list[str]:
    return [f"{n}.{k}" for n in param_names for k in ("exp_avg", "exp_avg_sq", "step")]


def load_rng(path: str | Path, pp_rank: int, device: Optional[torch.device] = None) -> bool:
    """Restore this pipeline rank's RNG state if the checkpoint has one for it."""
    f = Path(path) / rank_file(pp_rank)
    if not f.is_file():
        return False
    set_rng_state(json.loads(f.read_text()).get("rng", {}), device)
    return True


# ---------------------------------------------------------------------------------- export
def export_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    tokenizer: Optional[str | Path] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write `params.json` + `consolidated.safetensors` (+ `tokenizer.model`) for inference.

    Tensors are streamed one at a time from the stage shards, whatever split wrote them.
    `tokenizer` defaults to the one recorded in the manifest.
    """
    path, out = Path(path), Path(out)
    manifest = read_manifest(path)
    if (manifest.get("run") or {}).get("train.lora"):  # adapters only: merged into the run's base weights
        from pp_runtime.training.lora import export_merged

        return export_merged(path, out, tokenizer=tokenizer, dtype=dtype)
    args = manifest_args(manifest)
    shapes = stage_shapes(args, full_spec(args))
    with ExitStack() as stack:
        where: dict[str, Any] = {}
        for f in _shard_paths(path, manifest, "weights"):
            h = stack.enter_context(open_safetensors(f))
            where.update({k: h for k in h.keys()})
        missing = [n for n in shapes if n not in where]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {len(missing)} weight(s), e.g. {missing[0]}; cannot export it")
        stored = {n: where[n].get_slice(n).get_dtype() for n in shapes}
        dtypes = {n: dtype or TORCH_DTYPES[stored[n]] for n in shapes}
        out.mkdir(parents=True, exist_ok=True)
        part = out / "consolidated.safetensors.partial"
        write_safetensors_streaming(part, [(n, shapes[n], dtypes[n]) for n in shapes],
                                    lambda n: where[n].get_tensor(n).to(dtypes[n]))
        _fsync_file(part)
        os.replace(part, out / "consolidated.safetensors")
    _write_json(out / "params.json", args.to_params_json())
    tok = tokenizer or manifest.get("tokenizer")
    if tok:
        from pp_runtime.io.tokenizer import Tokenizer

        src = Tokenizer.from_dir(tok).path
        shutil.copyfile(src, out / "tokenizer.model")
    return out



def export_command(checkpoint: str, dtype: Optional[str], export: Callable[[Path, Optional[torch.dtype]], Path],
                   done: str) -> int:
    """What the export commands share: the checkpoint (a step_* folder or the latest in a folder),
    `--dtype`, then `export(ckpt, dtype)`; a user error is one line and exit 2. `done` is the success
    line, formatted with `ckpt` and `out`."""
    from pp_runtime.checkpoints.model_source import resolve_dtype

    try:
        ckpt = resolve_resume(checkpoint, Path(checkpoint))
        out = export(ckpt, resolve_dtype(dtype, torch.device("cpu")) if dtype else None)
    except PPRuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(done.format(ckpt=ckpt, out=out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m pp_runtime.training.checkpoint export CKPT OUT [--dtype bfloat16] [--tokenizer DIR]`."""
    p = argparse.ArgumentParser(prog="python -m pp_runtime.training.checkpoint", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write an inference-ready Mistral consolidated folder")
    e.add_argument("checkpoint", help="a step_* folder, or a checkpoint dir (its latest is used)")
    e.add_argument("out")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)")
    e.add_argument("--tokenizer", default=None, help="tokenizer.model or its folder (default: the one in the manifest)")
    a = p.parse_args(argv)
    return export_command(a.checkpoint, a.dtype,
                          lambda ckpt, dtype: export_checkpoint(ckpt, a.out, tokenizer=a.tokenizer, dtype=dtype),
                          "exported {ckpt} to {out}")


if __name__ == "__main__":
    sys.exit(main())
