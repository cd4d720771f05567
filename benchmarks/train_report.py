"""The markdown summary and results.json of `bench_train.py`: every configuration in one table,
each against the best peer (the fastest torch.distributed.pipelining or DeepSpeed configuration
of the run), then ours against the peer schedule of the same shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

PAIRS = [  # (what is compared, ours, the peer of the same shape)
    ("1F1B", "ours-1f1b", "torch-1f1b"),
    ("1F1B (DeepSpeed)", "ours-1f1b", "deepspeed-1f1b"),
    ("GPipe", "ours-gpipe", "torch-gpipe"),
    ("interleaved 1F1B", "ours-interleaved", "torch-interleaved"),
    ("interleaved zero bubble", "ours-interleaved-zb", "torch-interleaved-zb"),
    ("ZB-V", "ours-zbv", "torch-zbv"),
]


def _ok(r: Optional[dict]) -> bool:
    return r is not None and r.get("status") == "ok"


def _fmt_list(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return " / ".join("n/a" if x is None else f"{x:.1f}" for x in v)
    return f"{v:.1f}"


def _max_memory(r: dict) -> Optional[float]:
    mem = r.get("peak_memory_gb")
    return max(mem) if mem and None not in mem else None


def _ratio(a: dict, b: dict) -> tuple[str, str]:
    """tokens/s of a over b, and peak memory (max over GPUs) of a over b."""
    speed = f"{a['tokens_per_s'] / b['tokens_per_s']:.3f}"
    ma, mb = _max_memory(a), _max_memory(b)
    return speed, (f"{ma / mb:.2f}" if ma and mb else "")


def summary(header: str, configs: list, results: list[dict], note: str = "") -> str:
    """`configs`: the Config objects in run order; `results`: their RESULT records."""
    by = {r["config"]: r for r in results}
    peers = [by[c.name] for c in configs if c.impl != "pp_runtime" and _ok(by.get(c.name))]
    best = max(peers, key=lambda r: r["tokens_per_s"], default=None)
    lines = ["", "## Summary", "", header, ""]
    lines += ["| configuration | tokens/s | vs best peer | MFU | step (s) | outside the schedule (s) | "
              "peak memory per GPU (GB, 1e9 B) | measured bubble per rank | bubble on paper | loss (first, last) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        r = by.get(c.name)
        if r is None:
            lines.append(f"| {c.label} | not run | | | | | | | | |")
            continue
        if r.get("status") != "ok":
            why = r.get("reason") or r.get("error") or ""
            lines.append(f"| {c.label} | {r['status']}: {why[:160]} | | | | | {_fmt_list(r.get('peak_memory_gb'))} | | | |")
            continue
        vs = _ratio(r, best)[0] if best else ""
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        outside = f"{r['outside_schedule_s']:.3f}" if "outside_schedule_s" in r else "n/a"
        bub = ", ".join(f"{100 * b:.1f}%" for b in r["bubble_measured"]) if "bubble_measured" in r else "n/a"
        form = "n/a" if r.get("bubble_formula") is None else f"{100 * r['bubble_formula']:.1f}%"
        losses = r.get("losses") or []
        lossr = f"{losses[0]:.4f}, {losses[-1]:.4f}" if losses else ""
        lines.append(f"| {c.label} | {r['tokens_per_s']:,.0f} | {vs} | {mfu} | {r['step_time_s']:.3f} | {outside} | "
                     f"{_fmt_list(r.get('peak_memory_gb'))} | {bub} | {form} | {lossr} |")
    ours = [by[c.name] for c in configs if c.impl == "pp_runtime" and _ok(by.get(c.name))]
    if best and ours:
        top = max(ours, key=lambda r: r["tokens_per_s"])
        speed, mem = _ratio(top, best)
        lines += ["", f"Best of ours: {top['config']} at {top['tokens_per_s']:,.0f} tokens/s = {speed} x the best peer, "
                      f"{best['config']} ({best['tokens_per_s']:,.0f} tokens/s); peak memory ratio {mem or 'n/a'}."]
    pair_lines = [f"| {what} | {ours_name} / {peer} | {' | '.join(_ratio(by[ours_name], by[peer]))} |"
                  for what, ours_name, peer in PAIRS if _ok(by.get(ours_name)) and _ok(by.get(peer))]
    if pair_lines:
        lines += ["", "| schedule | configurations | tokens/s ratio | peak memory ratio (max over GPUs) |",
                  "|---|---|---|---|", *pair_lines]
    if note:
        lines += ["", f"Stopped early: {note}"]
    return "\n".join(lines)


def write_json(out: Optional[str], header: str, results: list[dict], note: str) -> None:
    if not out:
        return
    path = Path(out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header, "results": results, "note": note}, indent=1))
