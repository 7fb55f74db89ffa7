"""`report.md` and its plots for `experiments.compare`: what each run (a strategy, maybe with a policy)
costs, and in which currency.

Everything here is computed from the runs' `summary.json` figures and loss curves (plus what
`compare` adds to each summary: `losses`, `policy`, `overrides`, `reference_losses`,
`reference_policy`, `rtol`, `max_rel_diff`); the prose in "What this shows" is generated from the
same numbers, including what each policy costs and saves against the same strategy without it.
"""
from __future__ import annotations

import pathlib

from experiments import offload_report, pipeline_report
from functional_parallel.parallel import Strategy

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p")
PLOTS = {"loss": "loss_curves.png", "memory": "memory.png", "collectives": "collectives.png",
         "step_time": "step_time.png"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mesh(summary: dict) -> str:
    return " × ".join(f"{axis}={size}" for axis, size in summary["mesh"].items() if size > 1) or "1 rank"


def _save_bars(plt, figure, axes, path: pathlib.Path, ylabel: str, title: str, legend: dict | None = None) -> None:
    """Label, grid (y only), lay out and save a bar chart, then free the figure."""
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    if legend is not None:
        axes.legend(**legend)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _rank_figure(rank: dict, name: str):
    """A rank's device-memory figure `name` ("measured"/"predicted"): its device peak where the run
    reports one (under `offload` the host-placed state is not device memory), else its peak."""
    device = rank.get(f"device_peak_bytes_{name}")
    return device if device is not None else rank.get(f"peak_bytes_{name}")


def measured_peak(summary: dict) -> int | None:
    """The largest measured device peak over the ranks (None when a rank has no measurement)."""
    values = [_rank_figure(r, "measured") for r in summary["ranks"]]
    return None if not values or None in values else max(values)


def host_bytes(summary: dict) -> int:
    """The largest host-memory peak over the ranks (0 without offload), measured where there is a measurement."""
    return max((r.get("host_bytes_measured") or r.get("host_bytes_predicted") or 0 for r in summary["ranks"]),
               default=0)


def transfer_bytes(summary: dict) -> int:
    """Device<->host bytes per rank per step (0 without offload)."""
    return sum((summary["cost"].get("transfer_bytes") or {}).values())


def _policy_label(policy: dict) -> str:
    """`fp32` or `bf16, grad_accum=2`: a reference policy in words (its non-default settings)."""
    parts = [policy.get("precision", "fp32")]
    parts += [f"{key}={value}" for key, value in policy.items()
              if key != "precision" and value not in (None, 1)]
    return ", ".join(parts)


# Differences below this are drawn at it: an exactly equal step (0) has no place on a log scale.
DIFFERENCE_FLOOR = 1e-17


def relative_differences(summary: dict) -> list[float]:
    """|loss - reference| / |reference| per step of one run (what the equivalence check bounds)."""
    return [max(abs(loss - ref) / max(abs(ref), 1e-12), DIFFERENCE_FLOOR)
            for loss, ref in zip(summary["losses"], summary["reference_losses"])]


def plot_losses(results: dict, path: pathlib.Path) -> None:
    """Left: every run's curve and each distinct single-process reference dashed (on top of each other
    when all is well). Right: each run's relative difference from its reference per step, log scale,
    with the tolerances it is checked against."""
    plt = _pyplot()
    figure, (axes, diffs) = plt.subplots(1, 2, figsize=(12, 4))
    for name, summary in results.items():
        steps = range(1, len(summary["losses"]) + 1)
        axes.plot(steps, summary["losses"], label=name, alpha=0.8)
        diffs.plot(steps, relative_differences(summary), marker=".", linewidth=1, label=name, alpha=0.8)
    references = {_policy_label(s["reference_policy"]): s["reference_losses"] for s in results.values()}
    styles = ["k--", "k:", "k-.", "k-"]
    for index, (label, losses) in enumerate(references.items()):
        axes.plot(range(1, len(losses) + 1), losses, styles[index % len(styles)], linewidth=1,
                  label=f"reference, 1 process ({label})")
    for rtol in sorted({s["rtol"] for s in results.values() if s.get("rtol")}):
        diffs.axhline(rtol, color="r", linestyle="--", linewidth=1)
        diffs.annotate(f"rtol {rtol:g}", (1, rtol), color="r", fontsize=7, va="bottom")
    axes.set_xlabel("step")
    axes.set_ylabel("train loss (nats/char)")
    axes.set_title("Train loss per step: each run and the single-process reference of its policy", fontsize=10)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    diffs.set_yscale("log")
    diffs.set_xlabel("step")
    diffs.set_ylabel("|loss - reference| / reference")
    diffs.set_title(f"Relative difference from the reference (exactly equal drawn at {DIFFERENCE_FLOOR:g})",
                    fontsize=10)
    diffs.legend(fontsize=7, ncol=2, loc="lower right")
    diffs.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_memory(results: dict, path: pathlib.Path) -> None:
    """Per strategy, one bar per rank (measured) with the predicted peak as a black tick on it."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(results)), 4))
    width = 0.8
    for index, (name, summary) in enumerate(results.items()):
        ranks = summary["ranks"]
        bar = width / len(ranks)
        for rank in ranks:
            x = index - width / 2 + bar * (rank["rank"] + 0.5)
            if _rank_figure(rank, "measured") is not None:
                axes.bar(x, _rank_figure(rank, "measured") / 2**20, bar * 0.9, color="tab:blue",
                         label="measured" if index == 0 and rank["rank"] == 0 else None)
            axes.plot([x - bar * 0.45, x + bar * 0.45], [_rank_figure(rank, "predicted") / 2**20] * 2, "k-",
                      linewidth=2, label="predicted" if index == 0 and rank["rank"] == 0 else None)
    axes.set_xticks(range(len(results)), list(results), rotation=20)
    _save_bars(plt, figure, axes, path, "device peak MiB per rank",
               "Peak device memory per rank, one step: measured (bars), predicted (ticks)", legend={})


def plot_collectives(results: dict, path: pathlib.Path) -> None:
    """Bytes each rank sends per step, stacked by collective kind."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(results)), 4))
    bottom = [0.0] * len(results)
    kinds = list(KINDS) + sorted({k for s in results.values() for k in s["cost"]["bytes_by_kind"]} - set(KINDS))
    for kind in kinds:
        values = [s["cost"]["bytes_by_kind"].get(kind, 0) / 2**10 for s in results.values()]
        axes.bar(list(results), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.tick_params(axis="x", rotation=20)
    _save_bars(plt, figure, axes, path, "KiB per rank per step", "Bytes moved per step by collective kind",
               legend={"loc": "upper left", "fontsize": 8})


def plot_step_time(results: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(results)), 4))
    axes.bar(list(results), [1e3 * s["step_time_s"] for s in results.values()], color="tab:green")
    axes.tick_params(axis="x", rotation=20)
    _save_bars(plt, figure, axes, path, "ms per step (median, slowest rank)", "Step time")


def _bytes(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def predicted_peak(summary: dict) -> int:
    return max(_rank_figure(r, "predicted") for r in summary["ranks"])


def table(results: dict) -> list[str]:
    """One row per run: its strategy, mesh and policy columns, then equivalence, time, traffic, memory."""
    columns = list(dict.fromkeys(key for s in results.values() for key in s.get("policy", {})))
    lines = ["| run | strategy | mesh | " + "".join(f"{key} | " for key in columns)
             + "final loss | max rel. diff (rtol) | step ms | bytes moved / rank / step | " + " | ".join(KINDS)
             + " | device peak predicted (max rank) | device peak measured (max rank) | measured / predicted"
             + " | host bytes (max rank) | host<->device bytes / step |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|---|---|" + "---|" * len(KINDS) + "---|---|---|---|---|"]
    for name, s in results.items():
        predicted, measured = predicted_peak(s), measured_peak(s)
        ratio = "—" if measured is None else f"{measured / predicted:.2f}"
        diff = "FAILED" if s.get("max_rel_diff") is None else f"{s['max_rel_diff']:.1e}"
        policy = "".join(f"{'—' if s['policy'].get(key) is None else s['policy'][key]} | " for key in columns)
        lines.append(f"| {name} | {s['strategy']} | {_mesh(s)} | {policy}{s['final_loss']:.6f} | "
                     f"{diff} ({s.get('rtol', 0):.2g}) | {1e3 * s['step_time_s']:.1f} | {s['cost']['bytes_moved']:,} | "
                     + " | ".join(_bytes(s["cost"]["bytes_by_kind"].get(kind, 0)) for kind in KINDS)
                     + f" | {predicted:,} | {_bytes(measured)} | {ratio} | {host_bytes(s):,} | {transfer_bytes(s):,} |")
    return lines


def what_is_split(strategy_name: str) -> str:
    """In words, what a strategy (conf/strategy/<name>.yaml) splits over which mesh axes."""
    strategy = Strategy.load(strategy_name)
    param_axes, state_axes = strategy.param_mesh_axes(), strategy.state_mesh_axes()
    parts = []
    if param_axes:
        parts.append(f"parameters and gradients over {'/'.join(param_axes)}")
    if state_axes:
        parts.append(f"optimizer state over {'/'.join(state_axes)}")
    if "seq" in strategy.logical:
        parts.append(f"activations' sequence dim over {strategy.logical['seq']}")
    return "splits " + ", ".join(parts) if parts else "replicates parameters, gradients and optimizer state"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _change(new: float, old: float) -> str:
    """`-42%` / `+3%`: the relative change from `old` to `new`."""
    if old == new:
        return "±0%"
    if not old:
        return "new"
    percent = 100 * (new / old - 1)
    return f"{percent:+.0f}%" if abs(percent) >= 1 else f"{percent:+.2g}%"


def _peak(summary: dict) -> int:
    """The measured peak of the fullest rank, else the predicted one."""
    return measured_peak(summary) or predicted_peak(summary)


def equivalence_line(results: dict) -> str:
    """One sentence on equivalence: the worst run per tolerance (a tolerance is a compute dtype)."""
    names = list(results)
    failed = [n for n in names if results[n].get("max_rel_diff") is None]
    if failed:
        return f"- **Not equivalent:** {', '.join(failed)} left the reference loss curve (see the errors below)."
    by_rtol: dict[float, list[str]] = {}
    for name in names:
        by_rtol.setdefault(results[name].get("rtol", 0.0), []).append(name)
    worst = []
    for rtol, group in sorted(by_rtol.items()):
        name = max(group, key=lambda n: results[n]["max_rel_diff"])
        worst.append(f"{results[name]['max_rel_diff']:.1e} ({name}) within {rtol:.2g}")
    return (f"- **Same math:** all {len(names)} runs follow the single-process loss curve of their own policy "
            f"(a reference that casts and accumulates identically); the largest relative difference is "
            f"{'; '.join(worst)}.")


def policy_lines(results: dict) -> list[str]:
    """What each policy run costs and saves against the plain run of the same strategy (when there is one)."""
    lines = []
    for name, s in results.items():
        overrides = s.get("overrides") or {}
        if not overrides:
            continue
        policy = ", ".join(f"{key}={value}" for key, value in overrides.items())
        base = next((n for n, b in results.items() if b["strategy"] == s["strategy"] and not b.get("overrides")), None)
        if base is None:
            lines.append(f"- **{name}** ({s['strategy']} + {policy}): no plain {s['strategy']} run to compare with "
                         f"(add `{s['strategy']}` to `runs`).")
            continue
        b = results[base]
        kinds = sorted(set(s["cost"]["bytes_by_kind"]) | set(b["cost"]["bytes_by_kind"]))
        by_kind = ", ".join(f"{kind} {_change(s['cost']['bytes_by_kind'].get(kind, 0), b['cost']['bytes_by_kind'].get(kind, 0))}"
                            for kind in kinds)
        source = "measured" if measured_peak(s) is not None and measured_peak(b) is not None else "predicted"
        lines.append(f"- **{name}** ({s['strategy']} + {policy}) against {base}: peak memory "
                     f"{_change(_peak(s), _peak(b))} ({_peak(b):,} → {_peak(s):,} B, {source}; predicted "
                     f"{_change(predicted_peak(s), predicted_peak(b))}), bytes moved "
                     f"{_change(s['cost']['bytes_moved'], b['cost']['bytes_moved'])} ({by_kind or 'none'}), "
                     f"collectives {b['cost']['num_collectives']} → {s['cost']['num_collectives']}, "
                     + (f"host memory {host_bytes(b):,} → {host_bytes(s):,} B, host<->device "
                        f"{transfer_bytes(s):,} B per step, " if host_bytes(s) or host_bytes(b) else "")
                     + f"step time {_change(s['step_time_s'], b['step_time_s'])}.")
    if lines:
        lines.insert(0, "- **Policies** (each against the same strategy without it):")
        lines[1:] = ["  " + line for line in lines[1:]]
    return lines


def findings(results: dict) -> list[str]:
    """Generated prose: equivalence; the cheapest and costliest run in memory, traffic and time; what each
    policy costs and saves; the model's fit."""
    names = list(results)
    lines = [equivalence_line(results)]
    if len(names) > 1:
        by_peak = sorted(names, key=lambda n: _peak(results[n]))
        low, high = by_peak[0], by_peak[-1]
        peak_low, peak_high = _peak(results[low]), _peak(results[high])
        source = "measured" if all(measured_peak(results[n]) is not None for n in names) else "predicted"
        lines.append(f"- **Memory:** {low} is cheapest ({peak_low:,} B peak on its fullest rank, {source}; it "
                     f"{what_is_split(results[low]['strategy'])}), {high} the most expensive ({peak_high:,} B, "
                     f"{peak_high / peak_low:.1f}×; it {what_is_split(results[high]['strategy'])}).")

        def moved(name):
            return results[name]["cost"]["bytes_moved"]

        most = [n for n in names if moved(n) == max(map(moved, names))]
        least = [n for n in names if moved(n) == min(map(moved, names))]
        by_kind = results[most[0]]["cost"]["bytes_by_kind"]
        kind = max(by_kind, key=by_kind.get)
        lines.append(f"- **Traffic:** {_join(most)} {'moves' if len(most) == 1 else 'move'} the most bytes per rank "
                     f"per step ({moved(most[0]):,} B, {100 * by_kind[kind] / moved(most[0]):.0f}% of it in {kind}), "
                     f"{_join(least)} the fewest ({moved(least[0]):,} B, in "
                     f"{', '.join(sorted(results[least[0]]['cost']['bytes_by_kind'])) or 'nothing'}).")
        by_time = sorted(names, key=lambda n: results[n]["step_time_s"])
        fast, slow = results[by_time[0]], results[by_time[-1]]
        lines.append(f"- **Time:** {by_time[0]} has the fastest step ({1e3 * fast['step_time_s']:.1f} ms, "
                     f"{fast['cost']['num_collectives']} collectives), {by_time[-1]} the slowest "
                     f"({1e3 * slow['step_time_s']:.1f} ms, {slow['cost']['num_collectives']} collectives); "
                     f"times are from local gloo ranks sharing this machine's cores.")
    lines += policy_lines(results)
    ratios = [measured_peak(results[n]) / predicted_peak(results[n])
              for n in names if measured_peak(results[n]) is not None]
    if ratios:
        lines.append(f"- **Prediction:** measured peak / predicted peak is {min(ratios):.2f}–{max(ratios):.2f} "
                     f"(the prediction walks the lowered graph's liveness; the measurement counts the storages "
                     f"one real step allocates).")
    return lines


def readme_block(results: dict) -> str:
    """The short form for docs/compare.md (`python -m experiments.compare write_readme=true`): equivalence, the
    policies' costs and savings, and a compact table (run, policy, memory, traffic, time)."""
    columns = list(dict.fromkeys(key for s in results.values() for key in s.get("policy", {})))
    offloads = any(host_bytes(s) for s in results.values())  # host columns only where something lives there
    lines = [equivalence_line(results), *policy_lines(results), *offload_report.line(results), "",
             "| run | strategy | mesh | " + "".join(f"{key} | " for key in columns)
             + "max rel. diff | device peak measured (B, max rank) | "
             + ("host peak measured (B, max rank) | host→device / device→host B per step | " if offloads else "")
             + "bytes moved / rank / step | step ms |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|" + "---|---|" * offloads + "---|---|"]
    for name, s in results.items():
        diff = "FAILED" if s.get("max_rel_diff") is None else f"{s['max_rel_diff']:.1e}"
        policy = "".join(f"{'—' if s['policy'].get(key) is None else s['policy'][key]} | " for key in columns)
        moved = s["cost"].get("transfer_bytes") or {}
        host = f"{host_bytes(s):,} | {moved.get('h2d', 0):,} / {moved.get('d2h', 0):,} | " if offloads else ""
        lines.append(f"| {name} | {s['strategy']} | {_mesh(s)} | {policy}{diff} | {_bytes(measured_peak(s))} | "
                     f"{host}{s['cost']['bytes_moved']:,} | {1e3 * s['step_time_s']:.1f} |")
    piped = pipeline_report.lines(results, image=False)
    return "\n".join(lines + ([""] + piped[2:] if piped else [])).rstrip()


def _compute_dtype(summary: dict, model_dtype: str) -> str:
    precision = summary.get("reference_policy", {}).get("precision", "fp32")
    return model_dtype if precision == "fp32" else precision


def write(output_dir: pathlib.Path, cfg: dict, results: dict) -> pathlib.Path:
    """Write the four PNGs and `report.md` into `output_dir`; returns the report's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_losses(results, output_dir / PLOTS["loss"])
    plot_memory(results, output_dir / PLOTS["memory"])
    plot_collectives(results, output_dir / PLOTS["collectives"])
    plot_step_time(results, output_dir / PLOTS["step_time"])
    model = cfg["model"]
    tolerances = sorted({(s.get("rtol", 0.0), _compute_dtype(s, model["dtype"])) for s in results.values()})
    lines = ["# Strategy and policy comparison", "",
             f"`{model['arch']}/{model['size']}` with {model['dtype']} parameters, {cfg['optim']['name']}, corpus "
             f"`{cfg['data']['name']}`, global batch {cfg['data']['global_batch']}, {cfg['steps']} steps, seed "
             f"{cfg['seed']}; every run (a strategy, maybe with a policy) on its own mesh of spawned gloo ranks, "
             f"checked step by step against a single-process run under the same policy (relative tolerance "
             f"{', '.join(f'{rtol:.2g} computing in {dtype}' for rtol, dtype in tolerances)}).", "",
             "## What this shows", "", *findings(results), "",
             "## Numbers", "", *table(results), "",
             "Bytes and predicted peaks come from the lowered step (`Lowered.cost`); measured peaks from "
             "`sharding.memory.MemoryTracker` around one step on each rank. Per-run details are in "
             "`<run>/summary.json` and `<run>/metrics.jsonl`.", ""]
    if pipeline_report.plot_timeline(results, output_dir / pipeline_report.PLOT):
        lines += pipeline_report.lines(results)
    if offload_report.plot_copies(results, output_dir / offload_report.PLOT):
        lines += ["## Offload copies", "", *offload_report.line(results), "", f"![copies]({offload_report.PLOT})", ""]
    errors = [s["error"] for s in results.values() if s.get("error")]
    if errors:
        lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    lines += ["## Plots", "", f"![loss curves]({PLOTS['loss']})", "", f"![peak memory per rank]({PLOTS['memory']})", "",
              f"![bytes per collective kind]({PLOTS['collectives']})", "", f"![step time]({PLOTS['step_time']})", ""]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def publish(results: dict, output_dir: pathlib.Path, docs_dir: pathlib.Path,
            prefix: str = "compare") -> list[pathlib.Path]:
    """What `write_readme=true` adds to docs/: the results the block is rendered from
    (`docs/results/<prefix>.json`, so its currency is checked without rerunning) and the plots
    (`docs/figures/<prefix>_*.png`)."""
    import json
    import shutil

    (docs_dir / "results").mkdir(parents=True, exist_ok=True)
    (docs_dir / "figures").mkdir(parents=True, exist_ok=True)
    results_path = docs_dir / "results" / f"{prefix}.json"
    results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    written = [results_path]
    for name, file in {**PLOTS, "pipeline": pipeline_report.PLOT, "copies": offload_report.PLOT}.items():
        if not (output_dir / file).exists():  # the timelines: only with pipelined or offloaded runs
            continue
        target = docs_dir / "figures" / f"{prefix}_{file}"
        shutil.copyfile(output_dir / file, target)
        written.append(target)
    return written
