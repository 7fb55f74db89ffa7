"""Tables of `experiments.plan`'s result: the same rows printed with rich and written as markdown."""
from __future__ import annotations

from typing import Any

GB = 1e9  # the ZeRO paper's GB


def _gb(value: float) -> str:
    return f"{value / GB:,.2f}"


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f}"


def _delta(ours: float, formula: float) -> str:
    return f"{(ours - formula) / GB:+,.2f} ({(ours - formula) / formula:+.1%})" if formula else "—"


def _state(figures: dict) -> int:
    return figures["params"] + figures["grads"] + figures["optimizer"]


def memory_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    cfg = result["model"]["config"]
    title = (f"Per-rank memory, GB (1e9 B): {result['model']['arch']} {cfg['n_layers']} layers, h={cfg['d_model']}, "
             f"Ψ={result['strategies'][0]['figures']['parameters'] / 1e9:.2f}B, mesh "
             + " × ".join(f"{a}={n}" for a, n in result["mesh"].items())
             + f" ({result['ranks']} ranks), {result['precision']['name']}, micro-batch {result['micro_batch']}"
             f" × seq {cfg['seq_len']}"
             + ("" if result.get("remat", "none") == "none" else f", remat={result['remat']}"))
    own = [row for row in result["strategies"] if row.get("mesh", result["mesh"]) != result["mesh"]]
    if own:
        title += "; " + ", ".join(f"{row['strategy']} on " + " × ".join(f"{a}={n}" for a, n in row["mesh"].items())
                                  for row in own)
    headers = ["strategy", "params", "grads", "optimizer", "activations", "gathered params", "total",
               "ZeRO formula (model states)", "ours − formula"]
    rows = []
    for row in result["strategies"]:
        f = row["figures"]
        total = _state(f) + f["activations"] + f.get("gathered_params", 0)
        formula = row.get("zero_formula_bytes")
        rows.append([row["strategy"], _gb(f["params"]), _gb(f["grads"]), _gb(f["optimizer"]), _gb(f["activations"]),
                     _gb(f.get("gathered_params", 0)), _gb(total),
                     _gb(formula) if formula else "—", _delta(_state(f), formula) if formula else "—"])
    return title, headers, rows


def offload_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    """Device, host and disk memory per rank under an offload level (no rows without offload)."""
    title = ("Per-rank memory with the optimizer offloaded (ZeRO-Offload), GB: the optimizer role (fp32 master, "
             "Adam m and v) and the gradients in host memory")
    if result.get("offload") == "params":
        title = ("Per-rank memory with parameters and optimizer offloaded (ZeRO-Infinity), GB: the parameter, "
                 "gradient and optimizer roles in host memory (the device column counts no fetched layer)")
    if result.get("offload") == "disk":
        title = ("Per-rank memory with parameters and optimizer on disk (ZeRO-Infinity's NVMe), GB: the parameter "
                 "and optimizer roles in files, gradients in host memory (the device column counts no fetched layer)")
    headers = ["strategy", "device", "host", "disk", "device without offload"]
    rows = [[row["strategy"], *(_gb(row["memory_by_kind"].get(kind, 0)) for kind in ("device", "host", "disk")),
             _gb(sum(row["memory_by_kind"].values()))]
            for row in result["strategies"] if result.get("offload", "none") != "none"]
    return title, headers, rows


def reproduces_zero_table(result: dict) -> bool:
    """Whether the planned model and mesh are ZeRO Table 1's (Ψ within 2% of 7.5B, N_d = 64, mixed precision)."""
    psi = result["strategies"][0]["figures"]["parameters"]
    return (abs(psi / 7.5e9 - 1) < 0.02 and result["mesh"].get("dp") == 64
            and result["precision"]["name"] == "bf16")


def zero_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    title = "ZeRO Table 1 (Ψ=7.5B, N_d=64, K=12): model states per rank, GB; the formula at our exact Ψ"
    headers = ["strategy", "paper", "formula", "ours (graph)", "ours − paper"]
    rows = []
    for row in result["strategies"] if reproduces_zero_table(result) else []:
        if "zero_table_1_gb" not in row:
            continue
        ours = _state(row["figures"])
        paper = row["zero_table_1_gb"] * GB
        rows.append([row["strategy"], f"{row['zero_table_1_gb']:g}", _gb(row["zero_formula_bytes"]), _gb(ours),
                     _delta(ours, paper)])
    return title, headers, rows


def activation_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    remat = result.get("remat", "none")
    title = ("Activation memory per layer per rank, bytes: ours (graph) vs Korthikanti et al. 2022"
             + ("" if remat == "none" else f", {remat} recompute (remat={remat})"))
    headers = ["strategy", "t", "SP", "ours (graph)", "Korthikanti", "ours − Korthikanti", "explained (notes)",
               "unexplained"]
    rows = []
    for row in result["strategies"]:
        ours = row["per_layer"]["activations"]
        if "korthikanti_layer_bytes" not in row:  # the formula is for GPT layers
            rows.append([row["strategy"], str(row["t"]), "yes" if row["sp"] else "no", f"{ours:,}"] + ["—"] * 4)
            continue
        theirs = row["korthikanti_layer_bytes"]
        explained = sum(value for _, value in row["layer_differences"])
        rows.append([row["strategy"], str(row["t"]), "yes" if row["sp"] else "no", f"{ours:,}", f"{theirs:,.0f}",
                     f"{ours - theirs:+,.0f}", f"{explained:+,.0f}", f"{ours - theirs - explained:+,.0f}"])
    return title, headers, rows


COLLECTIVE_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p")


def sequence_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    """Long sequences: what one layer moves forward on the sequence axis, next to the paper's formula."""
    title = ("Long sequences, per layer per rank: activation memory and forward activation traffic on the "
             "sequence axis, MB, ours (graph) vs Megatron SP's 4Nh, DeepSpeed-Ulysses' 4Nh/P and ring attention's "
             "k, v blocks")
    headers = ["strategy", "mesh", "activations", "moved by", "ours", "formula", "paper", "ours − paper"]
    rows = []
    for row in result["strategies"]:
        sequence = row.get("sequence")
        if sequence is None:
            continue
        ours = sum(value for key, value in row["per_layer"].items() if key.startswith("comm/")
                   and key.endswith("/forward/bytes") and key.split("/")[2] in sequence["kinds"]
                   and key.split("/")[1] in sequence["axes"])
        mesh = " × ".join(f"{axis}={size}" for axis, size in row["mesh"].items())
        rows.append([row["strategy"], mesh, _mb(row["per_layer"]["activations"]), " + ".join(sequence["kinds"]),
                     _mb(ours), sequence["formula"], _mb(sequence["formula_bytes"]),
                     f"{(ours - sequence['formula_bytes']) / 1e6:+,.1f}"])
    return title, headers, rows


def comm_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    title = ("Bytes per step per rank by mesh axis, GB (collective buffer sizes; volume counts an all-reduce "
             "twice, as ZeRO §7)")
    headers = ["strategy", "axis", "all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p", "collectives",
               "volume", "ZeRO volume formula"]
    rows = []
    for row in result["strategies"]:
        f = row["figures"]
        axes = sorted({key.split("/")[1] for key in f if key.startswith("comm/")})
        for axis in axes or ["—"]:
            cells = [_gb(f.get(f"comm/{axis}/{kind}/bytes", 0)) for kind in COLLECTIVE_KINDS]
            count = sum(f.get(f"comm/{axis}/{kind}/count", 0) for kind in COLLECTIVE_KINDS)
            formula = row.get("zero_comm_formula_bytes") if axis == "dp" else None
            rows.append([row["strategy"], axis, *cells, f"{count:,}", _gb(f.get(f"comm/{axis}/volume", 0)),
                         _gb(formula) if formula else "—"])
    return title, headers, rows


def notes(result: dict) -> list[str]:
    depths = {tuple(row["lowered_depths"]) for row in result["strategies"]}
    layers = result["model"]["config"]["n_layers"]
    out = []
    for depth in depths:
        if depth[1] != layers:
            out.append(f"Lowered at {depth[0]} and {depth[1]} layers; every figure extrapolated linearly to {layers} "
                       f"layers (exact: tests/test_plan.py checks it equals a full lowering on a 4-layer model).")
        else:
            out.append(f"Lowered at the full depth ({layers} layers); per-layer figures from {depth[0]} → "
                       f"{depth[1]} layers.")
    out += [
        f"Vocabulary padded to {result['model']['config']['vocab_size']} (a multiple of lcm(128, ranks), as "
        "Megatron pads it) so "
        "embedding rows split over every axis; strategies that do not name an axis replicate over it.",
        "params/grads/optimizer: local shard shapes of the lowered graph's inputs × bytes per role "
        f"({result['precision']['name']}: params {result['precision']['param_bytes']} B, grads "
        f"{result['precision']['grad_bytes']} B, fp32 master {result['precision']['master_bytes']} B, "
        f"Adam m and v {result['precision']['state_bytes']} B each). Grads are the buffer kept between "
        "micro-batches: the optimizer-state layout the step reduces into, or the strategy's `grads` rules "
        "(ZeRO-1 keeps whole gradients; in one step it lowers to the same program as ZeRO-2).",
        "activations: values computed from the batch before the loss and read by backward (what Korthikanti "
        "counts; all alive at the loss, so this is their peak, without backward's transient buffers); "
        "gathered params: values computed without the batch and kept the same way (all-gathered weights, "
        "tables such as RoPE's).",
    ]
    whole = result["precision"]["param_bytes"]
    kept = [row["strategy"] for row in result["strategies"]
            if row["figures"].get("gathered_params", 0) > 0.5 * whole * row["figures"]["parameters"] > 0]
    if kept:
        out.append(f"{', '.join(kept)}: each weight is all-gathered once and kept for backward (no re-gather), "
                   "so the gathered weights stay alive until their gradient, and ZeRO-3 moves 2Ψ instead of "
                   "the paper's 3Ψ (all-gather forward, all-gather backward, reduce-scatter).")
    regathered = [row["strategy"] for row in result["strategies"] if row["strategy"] not in kept
                  and row["figures"].get("gathered_params", 0) > 0 and row["figures"].get("comm/dp/all_gather/bytes")
                  and row["figures"]["params"] < whole * row["figures"]["parameters"]]  # parameters split over dp
    if regathered:
        out.append(f"{', '.join(regathered)}: each weight the backward reads is all-gathered again for it "
                   "(`sharding.schedule.regather`), so ZeRO-3 moves about the paper's 3Ψ; the gathered params "
                   "left are the output head's, whose backward follows its forward at once (its copy is kept).")
    remat = result.get("remat", "none")
    if remat == "full":
        out.append("remat=full: each layer keeps only its input (named with `checkpoint_name`); the rest of its "
                   "forward is recomputed in the backward, after the loss, so it is not in the activations "
                   "column (it is alive for one layer's backward at a time). Korthikanti's formula is 2sbh "
                   "(2sbh/t under SP).")
    elif remat == "selective":
        out.append("remat=selective: the attention core (SDPA, softmax, dropout, the matmuls of two activations "
                   "and the elementwise ops between them) is recomputed in the backward; everything else is kept. "
                   "Korthikanti's formula drops the 5as²b/t term. SDPA (flash) keeps no s² tensors in the first "
                   "place, so with it selective keeps what no recompute keeps; with GPTConfig(attention=\"math\") "
                   "the s² softmax output is what it drops (tests/sharding/test_remat.py measures it).")
    if any(row["sp"] for row in result["strategies"]):
        out.append("Under SP the all-reduces on the model axis are the gradients of the weights that see the "
                   "sequence-split residual stream (embeddings, norms, output biases): each rank holds a "
                   "sequence slice's share. Megatron does the same for norms; its embedding is vocab-parallel.")
    if any("korthikanti_layer_bytes" not in row for row in result["strategies"]):
        out.append("Korthikanti's formula counts a GPT layer (LayerNorm, GeLU MLP); for this model only our "
                   "per-layer activations are shown.")
    if not reproduces_zero_table(result):
        out.append("ZeRO Table 1 itself (Ψ=7.5B, N_d=64): `python -m experiments.plan model=gpt_7_5b`.")
    differences = next((row["layer_differences"] for row in result["strategies"] if row.get("layer_differences")),
                       None)
    if differences:
        out.append("Differences from Korthikanti (the 'explained' column sums them for each strategy's t and SP): "
                   + "; ".join(what for what, _ in
                               max((row["layer_differences"] for row in result["strategies"]
                                    if row.get("layer_differences")), key=len)) + ".")
    return out


def pipeline_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    """Pipelined strategies: the first rank's memory by role and what the formulas give for it."""
    rows = [r for r in result["strategies"] if r.get("pipeline")]
    title = ("Pipelines: the first stage's rank, GB (1e9 B); activations = micro-batches alive there (the "
             "schedule's) x its layers x one layer's (lowered), beside Korthikanti's x the same counts")
    headers = ["strategy", "mesh", "schedule", "m", "layers on rank", "alive", "params", "grads", "optimizer",
               "activations", "formula activations", "L layers' worth", "total", "p2p MB/step", "bubble"]
    body = []
    for row in rows:
        f = row["figures"]
        body.append([row["strategy"], " × ".join(f"{a}={n}" for a, n in row["mesh"].items()), row["schedule"],
                     str(row["microbatches"]), str(row["rank_layers"]), str(row["chunks_alive_first_rank"]),
                     _gb(f["params"]), _gb(f["grads"]), _gb(f["optimizer"]), _gb(f["activations"]),
                     _gb(row["activations_formula_bytes"]), _gb(row["activations_all_layers_bytes"]),
                     _gb(row["total_bytes"]), _mb(f["comm/pp/p2p/bytes"]),
                     f"{row['bubble_formula']:.3f}" if row.get("bubble_formula") is not None else "—"])
    return title, headers, body


def fit_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    """The deepest model of the planned width that fits `fit` per rank, per offload level (no rows without `fit`)."""
    rows = [row for row in result["strategies"] if row.get("fit")]
    fit = result.get("fit") or {}
    host = f", {fit['host_gb']:g} GB host" if fit.get("host_gb") is not None else ", any host memory"
    title = (f"Largest model that fits {fit.get('device_gb') or 0:g} GB of device memory per rank{host}: layers of "
             f"this width (billions of parameters), by offload level")
    levels = list(rows[0]["fit"]) if rows else []
    body = [[row["strategy"]] + [f"{row['fit'][level]['layers']} ({row['fit'][level]['parameters'] / 1e9:,.1f}B)"
                                 for level in levels] for row in rows]
    return title, ["strategy"] + [f"offload={level}" for level in levels], body


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    flat = {**result, "strategies": [r for r in result["strategies"] if not r.get("pipeline")]}
    found = [pipeline_table(result)]
    if flat["strategies"]:
        found = [memory_table(flat), offload_table(flat), fit_table(flat), zero_table(flat), activation_table(flat),
                 sequence_table(flat), comm_table(flat)] + found
    return [t for t in found if t[2]]


def markdown_table(table: tuple[str, list[str], list[list[str]]]) -> str:
    title, headers, rows = table
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def all_notes(result: dict) -> list[str]:
    """The notes of the rows without a pipeline, then the pipelines' own."""
    flat = {**result, "strategies": [r for r in result["strategies"] if not r.get("pipeline")]}
    piped = [r for r in result["strategies"] if r.get("pipeline")]
    out = notes(flat) if flat["strategies"] else []
    for row in piped:
        out.append(f"{row['strategy']}: lowered one stage (the strategy without its pipeline on the mesh without "
                   f"pp) at {row['lowered_depths'][0]} and {row['lowered_depths'][1]} layers with one micro-batch "
                   f"of {result['micro_batch']}; the first rank holds {row['rank_layers']} layers and, under "
                   f"{row['schedule']}, {row['chunks_alive_first_rank']} micro-batches' activations at once "
                   f"(the schedule's simulator), so {row['chunks_alive_first_rank'] * row['rank_layers']} layers' "
                   f"worth: Korthikanti et al.'s first-stage statement (p micro-batches of L/p layers, L layers' "
                   f"worth whatever p). One layer's activations: {row['our_layer_bytes'] / 1e6:,.1f} MB lowered and "
                   f"by `published.our_layer_bytes` (Korthikanti's {row['korthikanti_layer_bytes'] / 1e6:,.1f} MB "
                   f"with the documented differences: flash SDPA, no dropout).")
    return out


def markdown(result: dict) -> str:
    return "\n".join(markdown_table(t) for t in tables(result)) + "\n" + "".join(
        f"- {note}\n" for note in all_notes(result))


def print_tables(result: dict, console: Any) -> None:
    from rich.table import Table

    for title, headers, rows in tables(result):
        table = Table(title=title, title_justify="left")
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in all_notes(result):
        console.print(f"• {note}")
