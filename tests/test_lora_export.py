"""LoRA runs end to end (in-process, one rank): what they save, the merged export, the PEFT folder
(loaded by `peft` on transformers' model), `model.adapter=` in infer and batch_infer, and one-line
errors for adapters that do not fit.

Two short LoRA runs on the tiny (dense) and tiny-moe checkpoints, every projection targeted
(attention, and the dense feed-forward or every expert). Our reference for "base + adapter" is the
base checkpoint with `apply_lora` modules holding the checkpoint's adapters, unmerged.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import _WORDS
from dist_utils import in_one_thread
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.training import checkpoint as tc
from ckpt_helpers import save_hf_checkpoint
from pp_runtime.checkpoints.formats import full_spec, load_stage_module
from pp_runtime.errors import CheckpointError, ConfigError
from pp_runtime.jobs.config import load_config
from pp_runtime.model.partition import plan_for
from pp_runtime.training.lora import LoraConfig, apply_lora, lora_config, merge_lora_
from pp_runtime.training.peft_export import export_peft, write_peft_adapter

ALL = "[wq,wk,wv,wo,w1,w2,w3]"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("lora_data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"text": words} if i % 2 else {"prompt": words, "completion": "seven red boxes"}) + "\n")
    return path


def train_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={ckpt}", f"data.path={data}", "data.seq_len=24", f"out_dir={out}", "train.steps=3",
            "train.batch_size=4", "train.warmup_steps=1", "train.lr=3e-2", "schedule.microbatches=2", "device=cpu",
            "model.dtype=float32", "train.lora.rank=4", "train.lora.alpha=8", f"train.lora.targets={ALL}", *extra]


def _train(ckpt: Path, data: Path, out: Path) -> Path:
    from pp_runtime.jobs.finetune import run

    assert in_one_thread(run, load_config("finetune", train_args(ckpt, data, out))) == 0
    return out


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def lora_run(request, tiny_ckpt, tiny_moe_ckpt, data_file, tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint, finished LoRA run folder: checkpoints/ and export/ merged)."""
    base = tiny_ckpt if request.param == "tiny" else tiny_moe_ckpt
    return base, _train(base, data_file, tmp_path_factory.mktemp(f"lora_{request.param}"))


def _meta(args, lens=((7, 9), (16,))):
    return build_training_meta([list(x) for x in lens], window=args.sliding_window, head_dim=args.head_dim,
                               rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads)


def _tokens(args, n=32):
    return (torch.arange(n) * 7 + 3) % args.vocab_size


def base_plus_adapter(base: Path, ckpt: Path, targets=None, dtype=torch.float32) -> torch.nn.Module:
    """The base model with unmerged LoRA modules holding the checkpoint's adapters (optionally a subset)."""
    manifest = tc.read_manifest(ckpt)
    args = tc.manifest_args(manifest)
    lcfg = LoraConfig.from_json(manifest["run"]["train.lora"])
    if targets is not None:
        lcfg = LoraConfig(lcfg.rank, lcfg.alpha, 0.0, targets)
    model = load_stage_module(base, args, full_spec(args), dtype)
    names = apply_lora(model, lcfg)
    saved = tc.load_tensors(ckpt, names, manifest=manifest)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    return model.eval()


def test_checkpoint_holds_only_the_adapters(lora_run):
    base, out = lora_run
    ckpt = tc.latest_checkpoint(out / "checkpoints")
    manifest = tc.read_manifest(ckpt)
    assert manifest["run"]["train.lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                             "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], "seed": 0}
    names = list(load_file(str(ckpt / "stage000.safetensors")))
    optim = list(load_file(str(ckpt / "stage000.optim.safetensors")))
    args = tc.manifest_args(manifest)
    per_layer = 7 * 2
    assert len(names) == args.n_layers * per_layer and all(".lora_" in n for n in names)
    assert len(optim) == 3 * len(names) and all(".lora_" in n for n in optim)
    lora_B = [load_file(str(ckpt / "stage000.safetensors"))[n] for n in names if n.endswith("lora_B.weight")]
    assert all(float(t.abs().max()) > 1e-3 for t in lora_B)  # trained away from zero


def test_merged_export_equals_base_plus_adapter(lora_run):
    base, out = lora_run
    ckpt = tc.latest_checkpoint(out / "checkpoints")
    args = tc.manifest_args(tc.read_manifest(ckpt))
    export = out / "export"
    assert {p.name for p in export.iterdir()} == {"params.json", "consolidated.safetensors", "tokenizer.model"}
    f64 = torch.float64  # the only difference left: the export's float32 rounding of W + s B A
    with torch.no_grad():
        ours = base_plus_adapter(base, ckpt, dtype=f64)(_tokens(args), _meta(args), logits="all")
        merged = load_stage_module(export, args, full_spec(args), f64).eval()(_tokens(args), _meta(args), logits="all")
        plain = load_stage_module(base, args, full_spec(args), f64).eval()(_tokens(args), _meta(args), logits="all")
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)
    assert float((plain - ours).abs().max()) > 1e-2  # the adapter does change the model
    folded = base_plus_adapter(base, ckpt, dtype=f64)
    merge_lora_(folded)  # in memory: the adapters folded into the weights and removed
    assert not [n for n, _ in folded.named_parameters() if ".lora_" in n]
    with torch.no_grad():
        torch.testing.assert_close(folded(_tokens(args), _meta(args), logits="all"), ours, rtol=1e-9, atol=1e-9)
    # the offline export command merges too
    again = out / "export-again"
    assert tc.main(["export", str(out / "checkpoints"), str(again)]) == 0
    assert torch.equal(load_file(str(again / "consolidated.safetensors"))["layers.1.attention.wq.weight"],
                       load_file(str(export / "consolidated.safetensors"))["layers.1.attention.wq.weight"])


def test_adapter_applied_per_stage_equals_merged_export(lora_run, tmp_path):
    """What model.adapter does on each stage of a 2-stage pipeline chains to the merged export's logits."""
    from pp_runtime.training.peft_export import apply_peft_adapter_

    base, out = lora_run
    ckpt = tc.latest_checkpoint(out / "checkpoints")
    args = tc.manifest_args(tc.read_manifest(ckpt))
    peft_dir = export_peft(ckpt, tmp_path / "peft")
    x = _tokens(args)
    with torch.no_grad():  # both merge W + s B A in float32: the same weights, the same logits
        for spec in plan_for(args, 2).stages:
            module = load_stage_module(base, args, spec)
            assert apply_peft_adapter_(module, peft_dir, args) > 0
            x = module.eval()(x, _meta(args), logits="all")
        merged = load_stage_module(out / "export", args, full_spec(args)).eval()(_tokens(args), _meta(args), logits="all")
    torch.testing.assert_close(x, merged, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- peft on transformers
def test_offline_peft_export_command_writes_the_same_adapter(lora_run, tmp_path, capsys):
    """`python -m pp_runtime.training.peft_export CKPT OUT` (given the checkpoint folder: its latest
    step) writes what export_peft does; a folder with no checkpoint is one error line, exit 2."""
    from pp_runtime.training import peft_export

    _, out = lora_run
    want = export_peft(tc.latest_checkpoint(out / "checkpoints"), tmp_path / "direct")
    assert peft_export.main([str(out / "checkpoints"), str(tmp_path / "offline")]) == 0
    assert "exported the adapter of" in capsys.readouterr().out
    a, b = load_file(str(want / "adapter_model.safetensors")), load_file(str(tmp_path / "offline" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert peft_export.main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_peft_folder_loads_in_peft_with_the_same_logits(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, out = lora_run
    ckpt = tc.latest_checkpoint(out / "checkpoints")
    manifest = tc.read_manifest(ckpt)
    args = tc.manifest_args(manifest)
    if args.is_moe:  # transformers >= 5 fuses the experts into one parameter: PEFT targets attention there
        targets = ("wq", "wk", "wv", "wo")
        adapters = {k: v for k, v in load_file(str(ckpt / "stage000.safetensors")).items() if ".attention." in k}
        peft_dir = write_peft_adapter(tmp_path / "peft", args, LoraConfig(4, 8.0, 0.0, targets), adapters, str(base))
    else:
        targets = None
        peft_dir = export_peft(ckpt, tmp_path / "peft")
    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    keys = list(load_file(str(peft_dir / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    hf_dir = tmp_path / "hf"
    save_hf_checkpoint(hf_dir, args, load_file(str(base / "consolidated.safetensors")))
    cls = transformers.MixtralForCausalLM if args.is_moe else transformers.MistralForCausalLM
    hf = cls.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = _tokens(args, 14)  # one sequence shorter than the window: plain causal attention on both sides
    with torch.no_grad():
        hf_base = hf(tokens[None]).logits[0]
        model = peft.PeftModel.from_pretrained(hf, str(peft_dir)).eval()
        hf_lora = model(tokens[None]).logits[0]
        ours = base_plus_adapter(base, ckpt, targets)(tokens, _meta(args, ((14,),)), logits="all")
    torch.testing.assert_close(hf_lora, ours, rtol=1e-4, atol=1e-4)
    assert float((hf_base - hf_lora).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------- inference
def _infer(job: str, *overrides: str) -> list[dict]:
    from pp_runtime.jobs import batch as batch_job
    from pp_runtime.jobs import infer as infer_job

    run = {"infer": infer_job.run, "batch_infer": batch_job.run}[job]
    assert in_one_thread(run, load_config(job, ["device=cpu", "max_new_tokens=6", "progress=false", *overrides])) == 0
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output="))
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def test_infer_with_adapter_equals_infer_on_merged_export(lora_run, tmp_path):
    base, out = lora_run
    peft_dir = export_peft(tc.latest_checkpoint(out / "checkpoints"), tmp_path / "peft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                               for i, p in enumerate(["the cat sat on", "two dogs ran past seven", "blue kite"])))
    common = [f"input={prompts}", "sampling.temperature=0"]
    adapter = _infer("infer", f"model.path={base}", f"model.adapter={peft_dir}", f"output={tmp_path / 'a.jsonl'}", *common)
    merged = _infer("infer", f"model.path={out / 'export'}", f"output={tmp_path / 'm.jsonl'}", *common)
    plain = _infer("infer", f"model.path={base}", f"output={tmp_path / 'p.jsonl'}", *common)
    assert [r["tokens"] for r in adapter] == [r["tokens"] for r in merged]
    for a, m in zip(adapter, merged):
        assert a["logprobs"] == pytest.approx(m["logprobs"], abs=2e-5)
    assert [r["logprobs"] for r in adapter] != [r["logprobs"] for r in plain]
    batch = _infer("batch_infer", f"model.path={base}", f"model.adapter={peft_dir}", f"output={tmp_path / 'b.jsonl'}",
                   *common)
    assert [r["tokens"] for r in batch] == [r["tokens"] for r in merged]


# ---------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def good_adapter(tiny_ckpt, tmp_path_factory) -> Path:
    """A random rank-4 adapter on every projection of the tiny model, in PEFT format."""
    from pp_runtime.checkpoints.formats import load_model_args

    args = load_model_args(tiny_ckpt)
    lcfg = LoraConfig(4, 8.0, 0.0, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    with torch.device("meta"):
        from pp_runtime.model.transformer import StageModule

        model = StageModule(args, full_spec(args))
    apply_lora(model, lcfg)
    gen = torch.Generator().manual_seed(0)
    adapters = {n: torch.randn(p.shape, generator=gen) * 0.1 for n, p in model.named_parameters() if ".lora_" in n}
    return write_peft_adapter(tmp_path_factory.mktemp("adapter") / "good", args, lcfg, adapters)


def _variant(good: Path, out: Path, *, config=None, tensors=None) -> Path:
    shutil.copytree(good, out)
    if config is not None:
        conf = json.loads((out / "adapter_config.json").read_text())
        conf.update(config)
        (out / "adapter_config.json").write_text(json.dumps(conf))
    if tensors is not None:
        state = load_file(str(out / "adapter_model.safetensors"))
        save_file(tensors(state), str(out / "adapter_model.safetensors"))
    return out


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_ADAPTERS = {
    "missing": (None, r"model\.adapter='.*nothere' does not exist; give a PEFT adapter folder"),
    "no_config": (lambda g, o: (shutil.copytree(g, o), (o / "adapter_config.json").unlink(), o)[-1],
                  r"no adapter_config\.json"),
    "not_lora": (lambda g, o: _variant(g, o, config={"peft_type": "IA3"}), r"peft_type 'IA3'; only LORA"),
    "rank_mismatch": (lambda g, o: _variant(g, o, config={"r": 8}),
                      r"layers\.0\.\S+\.lora_[AB]\.weight has rank 4 but adapter_config\.json says r=8"),
    "wrong_shape": (lambda g, o: _variant(g, o, tensors=lambda s: {**s, f"{Q}.lora_A.weight": torch.zeros(4, 32)}),
                    rf"{re.escape(Q)}\.lora_A\.weight has shape \[4, 32\] but this model's layers\.0\.attention\.wq"),
    "unknown_module": (lambda g, o: _variant(g, o, tensors=lambda s: {
        **s, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}),
        r"layers\.9\.self_attn\.q_proj\.lora_A\.weight names no LoRA-able module of this model \(4 layers\)"),
    "half_pair": (lambda g, o: _variant(g, o, tensors=lambda s: {k: v for k, v in s.items() if k != f"{Q}.lora_B.weight"}),
                  r"layers\.0\.attention\.wq\.weight has only lora_A"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_one_clear_error(case, good_adapter, tiny_ckpt, tmp_path, monkeypatch):
    from pp_runtime.jobs import infer as infer_job

    make, message = BAD_ADAPTERS[case]
    where = tmp_path / "nothere" if make is None else make(good_adapter, tmp_path / case)
    monkeypatch.setattr(infer_job, "run_pipeline", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises((CheckpointError, ConfigError)) as err:
        in_one_thread(infer_job.run, load_config("infer", [f"model.path={tiny_ckpt}", f"model.adapter={where}",
                                                       "prompt=the cat", "device=cpu"]))
    assert "\n" not in str(err.value) and re.search(message, str(err.value)), str(err.value)


def test_good_adapter_is_accepted(good_adapter, tiny_ckpt):
    from pp_runtime.checkpoints.formats import load_model_args
    from pp_runtime.training.peft_export import apply_peft_adapter_

    args = load_model_args(tiny_ckpt)
    module = load_stage_module(tiny_ckpt, args, full_spec(args))
    before = module.layers["0"].attention.wq.weight.clone()
    assert apply_peft_adapter_(module, good_adapter, args) == 4 * 7
    assert not torch.equal(before, module.layers["0"].attention.wq.weight)


@pytest.mark.parametrize("settings, message", [
    ({"rank": -1}, r"train\.lora\.rank=-1 must be a positive integer"),
    ({"rank": 4, "targets": ["wq", "gate"]}, r"train\.lora\.targets=\['wq', 'gate'\] must be distinct names among"),
    ({"rank": 4, "dropout": 1.5}, r"train\.lora\.dropout=1\.5 must be a number in \[0, 1\)"),
    ({"rank": 4, "alpha": 0}, r"train\.lora\.alpha=0 must be a positive number"),
])
def test_bad_lora_setting_is_a_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        lora_config(settings)


def test_lora_config_defaults():
    assert lora_config({"rank": 0}) is None and lora_config({"rank": None}) is None and lora_config(None) is None
    c = lora_config({"rank": 8, "targets": ["w2", "wq"]})
    assert c == LoraConfig(8, 16.0, 0.0, ("wq", "w2"), 0) and c.scale == 2.0
