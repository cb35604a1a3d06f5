"""The report of benchmarks/peers.py: its tables, verdicts and plots, from the rows' results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peer_common import FROM_SCRATCH_ONE_STEP, NFES, ROWS, SPEED_ROWS


def speed_table(speed: dict, rounds: int, steps: int) -> str:
    lines = [f"training steps/s, {rounds} interleaved rounds of {steps} steps (median; each round's value)"]
    for lib, values in speed.items():
        lines.append(f"{ROWS[lib]:<28}{float(np.median(values)):9.2f}   " + " ".join(f"{v:.1f}" for v in values))
    return "\n".join(lines)


def fmt_time(row: dict) -> str:
    if row["time_to_target_s"] is None:
        return "not reached"
    if row.get("one_step"):
        return f"{row['time_to_target_s']:.1f} s pipeline"
    return f"{row['time_to_target_s']:.1f} s @{row['step_to_target']}"


def table(rows: list[dict], spec: dict) -> str:
    nfe_cols = "".join(f"{'NFE ' + str(k):>8}" for k in NFES)
    lines = [f"{'library':<28}{'steps/s':>9}  {'time to W2/floor<=' + format(spec['target'], 'g'):<22}{nfe_cols}"
             f"{'dopri5':>8}{'sample s':>10}",
             f"{'':<28}{'':>9}  {'(training s @step)':<22}{'W2 / floor (4000 samples, own sampler)':^{8 * len(NFES)}}"
             f"{'NFE':>8}{'4000x100':>10}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['row']:<28}  skipped: {r['skipped']}")
            continue
        ratios = "".join(f"{r['nfe'][str(k)]['ratio']:8.3f}" for k in NFES)
        lines.append(f"{r['row']:<28}{r['steps_per_s']:9.2f}  {fmt_time(r):<22}{ratios}{r['dopri5_nfe']:8d}{r['sample_s']:10.3f}")
    return "\n".join(lines)


def sharp_table(rows: list[dict]) -> str:
    """Per row and NFE: % of the 4000 samples off the checkerboard's cells (the data: 0) and
    precision (share of samples inside the data's 5-NN manifold)."""
    nfe_cols = "".join(f"{'NFE ' + str(k):>14}" for k in NFES)
    lines = ["sharpness: % off the cells / precision (4000 samples, own sampler)", f"{'library':<28}{nfe_cols}"]
    for r in rows:
        if "skipped" in r:
            continue
        cells = "".join(f"{100 * r['nfe'][str(k)]['off']:7.2f} / {r['nfe'][str(k)]['precision']:4.2f}" for k in NFES)
        lines.append(f"{r['row']:<28}{cells}")
    return "\n".join(lines)


def ratio_tables(rows: list[dict]) -> str:
    """flowmatch / peer for every pair of rows: steps/s (> 1: flowmatch trains faster; the speed
    rows only, which do the peers' work) and time to the target (< 1: flowmatch gets there sooner)."""
    done = {r["lib"]: r for r in rows if "skipped" not in r and r["lib"] not in FROM_SCRATCH_ONE_STEP}
    fms = [lib for lib in done if lib.startswith("flowmatch")]
    peers = [lib for lib in done if not lib.startswith("flowmatch")]
    if not fms or not peers:
        return ""
    head = f"{'':<28}" + "".join(f"{done[p]['row'][:22]:>24}" for p in peers)
    out = ["steps/s, flowmatch / peer (> 1: flowmatch faster)", head]
    for fm in (f for f in fms if f in SPEED_ROWS):
        out.append(f"{done[fm]['row']:<28}" + "".join(f"{done[fm]['steps_per_s'] / done[p]['steps_per_s']:23.2f}x" for p in peers))
    out += ["", "time to W2/floor <= target, flowmatch / peer (< 1: flowmatch sooner; n/a: one of them never got there)", head]
    for fm in fms:
        cells = []
        for p in peers:
            a, b = done[fm]["time_to_target_s"], done[p]["time_to_target_s"]
            cells.append(f"{a / b:23.2f}x" if a is not None and b is not None else f"{'n/a':>24}")
        out.append(f"{done[fm]['row']:<28}" + "".join(cells))
    return "\n".join(out)


def verdicts(rows: list[dict], spec: dict) -> str:
    """The flow-matching comparisons, each with the numbers it rests on (the one-step generators
    trained from scratch have their own, in :func:`one_step_table`)."""
    done = {r["lib"]: r for r in rows if "skipped" not in r and r["lib"] not in FROM_SCRATCH_ONE_STEP}
    peers = [r for lib, r in done.items() if not lib.startswith("flowmatch")]
    fms = [r for lib, r in done.items() if lib.startswith("flowmatch")]
    if not peers or not fms:
        return ""
    out = []
    fastest = max(peers, key=lambda r: r["steps_per_s"])
    for lib in SPEED_ROWS:
        if lib in done:
            r = done[lib]
            out.append(f"steps/s: {r['row']} {r['steps_per_s']:.1f} = {r['steps_per_s'] / fastest['steps_per_s']:.2f}x the fastest "
                       f"peer ({fastest['row']}, {fastest['steps_per_s']:.1f})")
    timed = [r for r in peers if r["time_to_target_s"] is not None]
    fm_timed = [r for r in fms if r["time_to_target_s"] is not None]
    if fm_timed:
        best = min(fm_timed, key=lambda r: r["time_to_target_s"])
        if timed:
            first = min(timed, key=lambda r: r["time_to_target_s"])
            out.append(f"time to W2/floor <= {spec['target']:g}: {best['row']} {best['time_to_target_s']:.1f} s vs the soonest peer "
                       f"({first['row']}) {first['time_to_target_s']:.1f} s = {best['time_to_target_s'] / first['time_to_target_s']:.2f}x")
        else:
            out.append(f"time to W2/floor <= {spec['target']:g}: {best['row']} {best['time_to_target_s']:.1f} s; no peer got there")
    few = [(r["nfe"][str(k)]["ratio"], k, r["row"]) for r in peers for k in NFES if k <= 8]
    peer_few = min(few)
    if "flowmatch-distilled" in done:
        d = done["flowmatch-distilled"]["nfe"]["1"]["ratio"]
        out.append(f"one step: flowmatch distilled W2/floor {d:.3f} vs the peers' best at NFE <= 8: {peer_few[0]:.3f} "
                   f"({peer_few[2]}, NFE {peer_few[1]})")
    peer_100 = min((r["nfe"]["100"]["ratio"], r["row"]) for r in peers)
    fm_100 = min((r["nfe"]["100"]["ratio"], r["row"]) for r in fms if not r.get("one_step"))
    out.append(f"100 steps: best flowmatch W2/floor {fm_100[0]:.3f} ({fm_100[1]}) vs the peers' best {peer_100[0]:.3f} ({peer_100[1]})")
    for k in (1, 8, 100):  # the sharpness verdicts: at equal training steps, who leaves the cells least
        peer_off = min((r["nfe"][str(k)]["off"], r["row"]) for r in peers)
        fm_off = min((r["nfe"][str(k)]["off"], r["row"]) for r in fms)
        out.append(f"off the cells at NFE {k}: best flowmatch {100 * fm_off[0]:.2f}% ({fm_off[1]}) vs the peers' best "
                   f"{100 * peer_off[0]:.2f}% ({peer_off[1]})" + (" - flowmatch sharper" if fm_off[0] < peer_off[0] else ""))
    return "\n".join(out)


def one_step_table(rows: list[dict]) -> str:
    """The one-step generators side by side: trained from scratch (MeanFlow, shortcut; flowmatch's
    and the peer's) and the distilled pipeline, at NFE 1, 2 and 4, with the verdict at equal steps."""
    done = {r["lib"]: r for r in rows if "skipped" not in r and (r["lib"] in FROM_SCRATCH_ONE_STEP or r.get("one_step"))}
    if not done:
        return ""
    ks = (1, 2, 4)
    head = "".join(f"{'NFE ' + str(k):>26}" for k in ks)
    lines = ["one-step generators: % off the cells / W2/floor / precision / recall (4000 samples, own sampler)",
             f"{'library':<36}{'steps':>7}{'train s':>9}{head}"]
    for r in done.values():
        train_s = r.get("pipeline_s", r["train_s"])
        cells = "".join(f"{100 * r['nfe'][str(k)]['off']:7.2f}% {r['nfe'][str(k)]['ratio']:5.2f} "
                        f"{r['nfe'][str(k)]['precision']:5.3f} {r['nfe'][str(k)]['recall']:5.3f}" for k in ks)
        lines.append(f"{r['row']:<36}{r['steps']:7d}{train_s:9.0f}{cells}"
                     + ("  (whole pipeline's time)" if "pipeline_s" in r else ""))
    ours = [r for lib, r in done.items() if lib.startswith("flowmatch") and lib in FROM_SCRATCH_ONE_STEP]
    for peer in (done[lib] for lib in ("rectified-flow-meanflow", "rectified-flow-meanflow-recipe") if lib in done):
        if not ours:
            break
        best = min(ours, key=lambda r: r["nfe"]["1"]["off"])
        a, b = best["nfe"]["1"], peer["nfe"]["1"]
        sharper = a["off"] < b["off"] and a["ratio"] <= b["ratio"]
        lines.append(f"one step, equal steps ({best['steps']} and {peer['steps']}): {best['row']} {100 * a['off']:.2f}% off, "
                     f"W2/floor {a['ratio']:.2f} vs {peer['row']} {100 * b['off']:.2f}% off, W2/floor {b['ratio']:.2f}"
                     + (" - flowmatch better by both" if sharper else ""))
    return "\n".join(lines)


def sampling_table(jobs: list[dict]) -> str:
    lines = [f"{'flowmatch sample --n':<44}{'wall s':>9}{'samples/s':>12}{'peak RSS MB':>13}"]
    for j in jobs:
        rss = "n/a" if j["max_rss_mb"] is None else f"{j['max_rss_mb']:.0f}"
        lines.append(f"{j['n']} {j['run']} {j['args']:<20}"[:44].ljust(44) + f"{j['wall_s']:9.1f}{j['samples_per_s']:12.0f}{rss:>13}")
    return "\n".join(lines)


def plot(rows: list[dict], spec: dict, folder: Path) -> list[Path]:
    """Quality against NFE and against training wall-clock, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "skipped" not in r]
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in done:
        ks = [k for k in NFES]
        style = dict(lw=2.2) if r["lib"].startswith("flowmatch") else dict(ls="--", lw=1.4)
        ax.plot(ks, [r["nfe"][str(k)]["ratio"] for k in ks], marker="o", label=r["row"], **style)
    ax.axhline(1, color="k", lw=0.8)
    ax.axhline(spec["target"], color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="velocity evaluations (Euler steps)", ylabel="W2 / floor (4000 samples)",
           title="quality against sampling cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [folder / "peers-nfe.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in done:
        if r.get("one_step"):
            ax.scatter([r["pipeline_s"]], [r["nfe"]["1"]["ratio"]], marker="*", s=120, zorder=3, label=r["row"] + " (1 step)")
            continue
        style = dict(lw=2.2) if r["lib"].startswith("flowmatch") else dict(ls="--", lw=1.4)
        label = r["row"] + (" (1 step)" if r.get("eval_nfe") == 1 else "")
        ax.plot([p["train_s"] for p in r["curve"]], [p["ratio"] for p in r["curve"]], marker=".", label=label, **style)
    ax.axhline(1, color="k", lw=0.8)
    ax.axhline(spec["target"], color="grey", lw=0.8, ls=":")
    ax.set(yscale="log", xlabel="training wall-clock (s, evaluations excluded)",
           ylabel=f"W2 / floor ({spec['eval_n']} samples)", title="quality against training time (100 Euler steps; one-step rows: 1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "peers-time.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
