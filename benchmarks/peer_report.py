"""The report of benchmarks/peers.py: its tables and plots, from the rows' results."""

from pathlib import Path

import numpy as np

from peer_adapters import FROM_SCRATCH_ONE_STEP, NFES, ROWS


def speed_table(speed: dict, rounds: int, steps: int) -> str:
    lines = [f"training steps/s, {rounds} interleaved rounds of {steps} steps (median; each round's value)"]
    for lib, values in speed.items():
        lines.append(f"{ROWS[lib]:<28}{float(np.median(values)):9.2f}   " + " ".join(f"{v:.1f}" for v in values))
    return "\n".join(lines)


def table(rows: list[dict], spec: dict) -> str:
    """Per row: steps/s, the time to the target, W2/floor at each NFE, dopri5's NFE, the sampling time."""
    nfe_cols = "".join(f"{'NFE ' + str(k):>8}" for k in NFES)
    lines = [f"{'library':<28}{'steps/s':>9}  {'time to W2/floor<=' + format(spec['target'], 'g'):<22}{nfe_cols}"
             f"{'dopri5':>8}{'sample s':>10}",
             f"{'':<28}{'':>9}  {'(training s @step)':<22}{'W2 / floor (4000 samples, own sampler)':^{8 * len(NFES)}}"
             f"{'NFE':>8}{'4000x100':>10}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['row']:<28}  skipped: {r['skipped']}")
            continue
        hit = ("not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s pipeline" if r.get("one_step")
               else f"{r['time_to_target_s']:.1f} s @{r['step_to_target']}")
        ratios = "".join(f"{r['nfe'][str(k)]['ratio']:8.3f}" for k in NFES)
        lines.append(f"{r['row']:<28}{r['steps_per_s']:9.2f}  {hit:<22}{ratios}{r['dopri5_nfe']:8d}{r['sample_s']:10.3f}")
    return "\n".join(lines)


def sharp_table(rows: list[dict]) -> str:
    """Per row and NFE: % of the 4000 samples off the checkerboard's cells (the data: 0) and precision."""
    lines = ["sharpness: % off the cells / precision (4000 samples, own sampler)",
             f"{'library':<28}" + "".join(f"{'NFE ' + str(k):>14}" for k in NFES)]
    for r in [r for r in rows if "skipped" not in r]:
        lines.append(f"{r['row']:<28}" + "".join(f"{100 * r['nfe'][str(k)]['off']:7.2f} / {r['nfe'][str(k)]['precision']:4.2f}"
                                                 for k in NFES))
    return "\n".join(lines)


def one_step_table(rows: list[dict]) -> str:
    """The one-step generators (MeanFlow, shortcut, the peer's MeanFlow, the distilled pipeline) at NFE 1, 2, 4."""
    rows = {r["lib"]: r for r in rows if "skipped" not in r if r["lib"] in FROM_SCRATCH_ONE_STEP or r.get("one_step")}
    if not rows:
        return ""
    lines = ["one-step generators: % off the cells / W2/floor / precision / recall (4000 samples, own sampler)",
             f"{'library':<36}{'steps':>7}{'train s':>9}" + "".join(f"{'NFE ' + str(k):>26}" for k in (1, 2, 4))]
    for r in rows.values():
        cells = "".join(f"{100 * r['nfe'][str(k)]['off']:7.2f}% {r['nfe'][str(k)]['ratio']:5.2f} "
                        f"{r['nfe'][str(k)]['precision']:5.3f} {r['nfe'][str(k)]['recall']:5.3f}" for k in (1, 2, 4))
        lines.append(f"{r['row']:<36}{r['steps']:7d}{r.get('pipeline_s', r['train_s']):9.0f}{cells}"
                     + ("  (whole pipeline's time)" if "pipeline_s" in r else ""))
    return "\n".join(lines)


def sampling_table(jobs: list[dict]) -> str:
    lines = [f"{'flowmatch sample --n':<44}{'wall s':>9}{'samples/s':>12}{'peak RSS MB':>13}"]
    for j in jobs:
        rss = "n/a" if j["max_rss_mb"] is None else f"{j['max_rss_mb']:.0f}"
        lines.append(f"{j['n']} {j['run']} {j['args']:<20}"[:44].ljust(44) + f"{j['wall_s']:9.1f}{j['samples_per_s']:12.0f}{rss:>13}")
    return "\n".join(lines)


def plot(rows: list[dict], spec: dict, folder: Path) -> list[Path]:
    """peers-nfe.png (quality against NFE) and peers-time.png (against training wall-clock), a line per row."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "peers-nfe.png", folder / "peers-time.png"]
    for path in paths:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in [r for r in rows if "skipped" not in r]:
            style = dict(lw=2.2) if r["lib"].startswith("flowmatch") else dict(ls="--", lw=1.4)
            if path == paths[0]:
                ax.plot(NFES, [r["nfe"][str(k)]["ratio"] for k in NFES], marker="o", label=r["row"], **style)
            elif r.get("one_step"):
                ax.scatter([r["pipeline_s"]], [r["nfe"]["1"]["ratio"]], marker="*", s=120, zorder=3, label=r["row"] + " (1 step)")
            else:
                label = r["row"] + (" (1 step)" if r.get("eval_nfe") == 1 else "")
                ax.plot([p["train_s"] for p in r["curve"]], [p["ratio"] for p in r["curve"]], marker=".", label=label, **style)
        ax.axhline(1, color="k", lw=0.8)
        ax.axhline(spec["target"], color="grey", lw=0.8, ls=":")
        if path == paths[0]:
            ax.set(xscale="log", yscale="log", xlabel="velocity evaluations (Euler steps)", ylabel="W2 / floor (4000 samples)",
                   title="quality against sampling cost")
        else:
            ax.set(yscale="log", xlabel="training wall-clock (s, evaluations excluded)", ylabel=f"W2 / floor ({spec['eval_n']} "
                   "samples)", title="quality against training time (100 Euler steps; one-step rows: 1)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return paths
