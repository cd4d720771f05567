"""The committed demo model (pp_runtime/demo/model/): pipelined inference on 2 CPU ranks answers
held-out questions of its task (never in any training set) exactly, and the default
`launch/infer.py` run (no model given) loads it."""

from __future__ import annotations

import json
import subprocess
import sys


from conftest import REPO
from pp_runtime.checkpoints.formats import load_model_args
from pp_runtime.demo import MODEL_DIR, PROMPTS, task
from pp_runtime.demo.make_demo import MODEL_FILES, evaluate

def test_demo_folder_is_small_and_consistent():
    import sentencepiece

    assert all((MODEL_DIR / f).is_file() for f in MODEL_FILES)
    assert sum((MODEL_DIR / f).stat().st_size for f in MODEL_FILES) < 8e6
    args = load_model_args(MODEL_DIR)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(MODEL_DIR / "tokenizer.model"))
    assert sp.vocab_size() == args.vocab_size and sp.bos_id() == 1 and sp.eos_id() == 2
    ev = json.loads((MODEL_DIR / "EVAL.json").read_text())
    assert ev["heldout"]["accuracy"] >= 0.9 and ev["heldout"]["stages"] == 2


def test_heldout_questions_never_appear_in_training():
    train = task.train_examples(20000, seed=0)
    held = task.heldout_examples(200, seed=1)
    assert not {(e.a, e.b) for e in train} & {(e.a, e.b) for e in held}
    assert all(not task.is_heldout(e.a, e.b) for e in train) and all(task.is_heldout(e.a, e.b) for e in held)
    assert task.check("48+75=", "123") and not task.check("48+75=", "124") and not task.check("48+75", "123")


def test_pipelined_demo_answers_heldout_questions(tmp_path):
    # seed 1: not the questions make_demo scored (seed 0); all held out from every training set
    questions = task.heldout_examples(50, seed=1)
    ev = evaluate(MODEL_DIR, questions, nproc=2, work=tmp_path, timeout=120)
    wrong = [f"{r['prompt']}{r['completion']} (expected {r['expected']})" for r in ev["results"] if not r["ok"]]
    assert ev["accuracy"] >= 0.9, f"{ev['correct']}/{ev['questions']} right; wrong: {wrong}"


def test_default_infer_run_uses_the_demo(tmp_path):
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, str(REPO / "launch" / "infer.py"), f"input={PROMPTS}", f"output={out}",
                        "max_new_tokens=6", "device=cpu", "progress=false"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    prompts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines() if x.strip()]
    assert [x["prompt"] for x in rows] == prompts
    assert sum(task.check(x["prompt"], x["completion"]) for x in rows) >= 0.75 * len(rows)
