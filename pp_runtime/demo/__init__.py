"""The demo model that ships inside the package (`pp_runtime/demo/model/`, loaded by
`launch/infer.py` when no model is given): a 4-layer Mistral-shaped decoder trained from scratch
by `launch/finetune.py` to add two numbers ("48+75=" -> "123").

- `task`: the question generator (training / held-out split) and the answer checker;
- `make_demo`: the one command that rebuilds the model and its EVAL.json;
- `prompts.jsonl`: example questions (`launch/infer.py input=pp_runtime/demo/prompts.jsonl`).
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
PROMPTS = DEMO_DIR / "prompts.jsonl"
