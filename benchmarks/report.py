"""Results of `benchmarks.strategies`: combine ranks, check targets, write JSON and the markdown table.

The table is a pure function of a results file, so docs/benchmark.md's copy can be checked against the
newest file in `benchmarks/results/` without running the benchmark (tests/test_docs.py).
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOC_BLOCK = "benchmark"  # docs/benchmark.md (experiments.docs)
KINDS = ("all_gather", "reduce_scatter", "all_reduce")
# (ours, torch's, the most ours may take as a fraction of torch's median step time): issues 4 and 15
TARGETS = (("zero3", "fsdp2", 0.6), ("dp", "ddp", 0.9), ("tp", "torch_tp", 0.8), ("tp_sp", "torch_tp_sp", 0.8))
LABELS = {"ddp": "torch DDP", "fsdp2": "torch FSDP2", "torch_tp": "torch TP", "torch_tp_sp": "torch TP+SP"}


def combine(per_rank: list[dict], reference: str = "ddp") -> dict:
    """One entry per contender: rank 0's numbers, the largest peak over ranks, losses vs `reference`."""
    contenders = {}
    for name, first in per_rank[0]["contenders"].items():
        entry = dict(first)
        entry["peak_bytes"] = max(rank["contenders"][name]["peak_bytes"] for rank in per_rank)
        if first.get("timeline"):  # one step's collectives, every rank's
            entry["timeline"] = [rank["contenders"][name]["timeline"] for rank in per_rank]
        contenders[name] = entry
    if reference in contenders:
        ref = contenders[reference]["losses"]
        for entry in contenders.values():
            diffs = [abs(a - b) / abs(b) for a, b in zip(entry["losses"], ref)]
            entry["loss_max_rel_diff_vs_" + reference] = max(diffs) if diffs else None
    return contenders


def collectives_per_step(entry: dict) -> int:
    return sum(entry["count_by_kind"].get(kind, 0) for kind in KINDS + ("all_to_all",))


def targets(contenders: dict) -> list[dict]:
    checks = []
    for ours, theirs, limit in TARGETS:
        if ours in contenders and theirs in contenders:
            ratio = contenders[ours]["step_ms_median"] / contenders[theirs]["step_ms_median"]
            checks.append({"ours": ours, "torch": theirs, "limit": limit, "ratio": ratio, "met": ratio <= limit,
                           "ours_collectives": collectives_per_step(contenders[ours]),
                           "torch_collectives": collectives_per_step(contenders[theirs])})
    return checks


def _bytes(value) -> str:
    return "—" if not value else f"{value:,}"


def table(results: dict) -> str:
    """The markdown table (and target lines) for one results file."""
    machine, cfg = results["machine"], results["config"]
    contenders = results["contenders"]
    lines = [f"Benchmark `{results['date']}`: GPT d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
             f"{cfg['n_heads']} heads, seq {cfg['seq_len']}, vocab {cfg['vocab_size']}, batch {cfg['batch_per_rank']}"
             f"/rank, AdamW; {cfg['world_size']} {machine['backend']} ranks on {machine['device']} "
             f"({machine['cpu_count']} CPUs, load average {machine['loadavg_before'][0]:.1f} before, "
             f"{machine['loadavg_after'][0]:.1f} after; {cfg['threads']} thread(s) per rank"
             f"{', per-rank graph torch.compile' if cfg['compile'] else ''}).", "",
             "| strategy | mesh | median step (ms) | × DDP | collectives / step | peak bytes / rank (measured) | "
             "peak (planned) | "
             + " | ".join(f"{k} bytes" for k in KINDS) + " | loss vs DDP (max rel. diff) |",
             "|---|---|---|---|---|---|---|" + "---|" * len(KINDS) + "---|"]
    ddp_ms = contenders.get("ddp", {}).get("step_ms_median")
    for name, entry in contenders.items():
        label = name if entry["kind"] == "ours" else LABELS.get(name, f"torch {name}")
        mesh = " × ".join(f"{a}={s}" for a, s in entry["mesh"].items())
        ratio = f"{entry['step_ms_median'] / ddp_ms:.2f}" if ddp_ms else "—"
        traffic = [_bytes(entry["measured_bytes_by_kind"].get(k)) for k in KINDS]
        diff = entry.get("loss_max_rel_diff_vs_ddp")
        lines.append(f"| {label} | {mesh} | {entry['step_ms_median']:.1f} | {ratio} | {collectives_per_step(entry)} | "
                     f"{entry['peak_bytes']:,} | "
                     f"{_bytes(entry.get('planned', {}).get('peak_bytes'))} | " + " | ".join(traffic)
                     + f" | {'—' if diff is None else f'{diff:.1e}'} |")
    lines.append("")
    for check in results["targets"]:
        verdict = "**met**" if check["met"] else "**missed**"
        lines.append(f"- Target ours {check['ours']} ≤ {check['limit']}× {LABELS.get(check['torch'], check['torch'])}: "
                     f"{check['ratio']:.2f}× — {verdict} (ours issues {check['ours_collectives']} collectives "
                     f"per step, torch {check['torch_collectives']}).")
    lines.append(f"- One synchronous 4-byte all-reduce over these ranks took "
                 f"{machine['collective_latency_ms']:.2f} ms (median) in this run.")
    return "\n".join(lines)


def newest(results_dir: Path = RESULTS_DIR) -> Path | None:
    files = sorted(results_dir.glob("*.json"))
    return files[-1] if files else None


def write(results: dict, results_dir: Path = RESULTS_DIR, render=None) -> tuple[Path, Path]:
    """`<date>.json` and `<date>.md` (the markdown from `render`, this module's `table` by default)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{results['date']}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text((render or table)(results) + "\n")
    return json_path, md_path
