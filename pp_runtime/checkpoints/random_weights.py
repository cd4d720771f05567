"""Write a randomly initialised Mistral-format checkpoint of any preset, one tensor at a time.

    python -m pp_runtime.checkpoints.random_weights --preset mistral-7b --out DIR [--dtype bfloat16] [--seed 0]
        [--layers N] [--tokenizer PATH | --no-tokenizer]

Only one tensor is in memory at once, so a 7B (14.5 GB in bf16) or 8x7B model can be written on a
machine with little RAM. Each weight is `checkpoint.random_tensor(name, shape, seed, dtype)`, seeded by its name.

The folder is ready for inference: it gets a tokenizer.model (`--tokenizer`, else Mistral's v1
tokenizer from the mistral-common package, a dependency that encodes chat `messages`) and the
model's vocab_size is the tokenizer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from pp_runtime.checkpoints.formats import full_spec, random_tensor, stage_shapes, write_safetensors_streaming
from pp_runtime.checkpoints.model_source import DTYPES
from pp_runtime.errors import PPRuntimeError
from pp_runtime.model.args import PRESETS, ModelArgs, preset



NO_TOKENIZER_NOTE = (
    "no tokenizer written: Mistral's v1 tokenizer comes with mistral-common, which is not installed "
    "(pip install mistral-common, or pass --tokenizer PATH); until then give inference model.tokenizer=PATH"
)


def default_tokenizer(given: Optional[str], wanted: bool = True) -> Optional[Path]:
    """The tokenizer to write: `given`, else mistral-common's v1 model, else None."""
    from pp_runtime.io.tokenizer import find_mistral_v1_tokenizer

    if not wanted:
        return None
    if given is not None:
        src = Path(given)
        if not src.is_file():
            raise PPRuntimeError(f"--tokenizer {given!r} is not a file; give the path of a sentencepiece tokenizer.model")
        return src
    return find_mistral_v1_tokenizer()


def write_random_checkpoint(
    out: str | Path,
    args: ModelArgs,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: Optional[str | Path] = None,
    device: str = "cpu",
) -> Path:
    """params.json + consolidated.safetensors (+ a copy of `tokenizer`) with random weights; returns the folder.

    `args.vocab_size` must already match the tokenizer (see `main`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    shapes = stage_shapes(args, full_spec(args))
    write_safetensors_streaming(
        out / "consolidated.safetensors",
        [(name, shape, dtype) for name, shape in shapes.items()],
        lambda name: random_tensor(name, shapes[name], seed, dtype, device).cpu(),
    )
    (out / "params.json").write_text(json.dumps(args.to_params_json(), indent=2))
    return out


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pp_runtime.checkpoints.random_weights", description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None,
                     help="tokenizer.model to copy into the folder (default: Mistral's v1 from mistral-common, if installed)")
    tok.add_argument("--no-tokenizer", action="store_true", help="write the weights only")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    p.add_argument("--device", default="cpu",
                   help="draw the weights here (cuda: seconds for 7B; other numbers than the cpu default)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = _parse(argv)
    try:
        args = preset(ns.preset, **({"n_layers": ns.layers} if ns.layers is not None else {}))
        if (Path(ns.out) / "consolidated.safetensors").exists() and not ns.force:
            raise PPRuntimeError(
                f"{ns.out} already holds a checkpoint; pass --force to overwrite it or pick another --out"
            )
        tokenizer = default_tokenizer(ns.tokenizer, wanted=not ns.no_tokenizer)
        vocab_note = ""
        if tokenizer is not None:
            from pp_runtime.io.tokenizer import Tokenizer

            vocab = Tokenizer(tokenizer).vocab_size
            if vocab != args.vocab_size:  # inference needs the two to agree
                vocab_note = f", vocab_size {args.vocab_size} -> {vocab} to fit the tokenizer"
                args = dataclasses.replace(args, vocab_size=vocab)
        out = write_random_checkpoint(ns.out, args, ns.seed, DTYPES[ns.dtype], tokenizer, ns.device)
    except PPRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (out / "consolidated.safetensors").stat().st_size
    print(f"wrote {ns.preset} ({args.n_layers} layers, {ns.dtype}, seed {ns.seed}{vocab_note}) to {out}: "
          f"{size / 1e9:.2f} GB" + (f"; tokenizer {tokenizer}" if tokenizer is not None else ""))
    if tokenizer is None and not ns.no_tokenizer:
        print(f"note: {NO_TOKENIZER_NOTE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
