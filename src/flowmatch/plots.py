"""Pictures of a run (matplotlib, Agg backend): samples beside data, trajectories, the
learned field at several times, the loss curve, an animated GIF of the flow, and
quality against NFE. Every function writes one file atomically and returns its path.

Vectors of two or more dimensions are drawn as point clouds of their first two coordinates;
one-dimensional data as histograms (samples beside data, the flow over time) and
trajectories as lines against t."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402

from .runs import atomic_path, read_metrics  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
    plt.close(fig)
    return path


def _limits(*clouds, margin=0.5):
    pts = torch.cat([c[:, :2] for c in clouds])
    lo, hi = pts.quantile(0.001, dim=0), pts.quantile(0.999, dim=0)
    lo, hi = lo - margin, hi + margin
    return (lo[0].item(), hi[0].item()), (lo[1].item(), hi[1].item())


def _scatter_figure(samples: torch.Tensor, title: str, reference: torch.Tensor | None = None):
    panels = [("data", reference), (title, samples)] if reference is not None else [(title, samples)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    if samples.shape[1] == 1:
        bins = _bins(*[p for _, p in panels])
        for ax, (name, pts) in zip(axes[0], panels):
            ax.hist(pts[:, 0].numpy(), bins=bins.numpy(), density=True, color="C0" if name == "data" else "C1", alpha=0.8)
            ax.set(title=name, xlabel="x", ylabel="density")
        return fig
    xl, yl = _limits(*[p for _, p in panels if p is not None])
    for ax, (name, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="C0" if name == "data" else "C1")
        ax.set(title=name, xlim=xl, ylim=yl, aspect="equal")
    return fig


def scatter(samples: torch.Tensor, path, title: str = "samples", reference: torch.Tensor | None = None) -> Path:
    """Samples (first two dimensions; a histogram for 1-D data), beside the data when
    ``reference`` is given."""
    return _save(_scatter_figure(samples, title, reference), path)


def figure_array(samples: torch.Tensor, title: str = "samples"):
    """:func:`scatter`'s picture as an RGB array (H, W, 3), uint8: for experiment trackers."""
    import numpy as np

    fig = _scatter_figure(samples, title)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def _bins(*clouds, n: int = 60) -> torch.Tensor:
    """Shared histogram bins over the central 99.8% of 1-D clouds (N, 1)."""
    pts = torch.cat([c[:, 0] for c in clouds]).float()
    lo, hi = pts.quantile(0.001).item(), pts.quantile(0.999).item()
    pad = 0.05 * (hi - lo) or 0.5
    return torch.linspace(lo - pad, hi + pad, n + 1)


def _draw_trajectories(ax, traj: torch.Tensor, times: torch.Tensor, title: str, legend: bool = True) -> None:
    """Paths (T, n, D): in the plane of the first two coordinates, or for 1-D data as x against t."""
    n = traj.shape[1]
    if traj.shape[2] == 1:
        t = times.cpu().numpy()
        for i in range(n):
            ax.plot(t, traj[:, i, 0], lw=0.5, alpha=0.35, color="C0")
        ax.scatter([t[0]] * n, traj[0, :, 0], s=3, color="grey", label="noise, t=0")
        ax.scatter([t[-1]] * n, traj[-1, :, 0], s=3, color="C1", label="sample, t=1")
        ax.set(xlabel="t", ylabel="x", title=title)
    else:
        for i in range(n):
            ax.plot(traj[:, i, 0], traj[:, i, 1], lw=0.5, alpha=0.35, color="C0")
        ax.scatter(traj[0, :, 0], traj[0, :, 1], s=3, color="grey", label="noise, t=0")
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=3, color="C1", label="sample, t=1")
        ax.set(aspect="equal", title=title)
    if legend:
        ax.legend(loc="upper right", fontsize=7)


def _paths(run, n: int, nfe: int, seed: int):
    """Euler paths of ``n`` samples from the noise of ``seed``, with ``nfe`` steps: the
    :meth:`~flowmatch.runs.Run.flow` result, whose ``trajectory`` (T, n, ...) is in data units."""
    from .seeding import noise

    return run.flow(noise(seed, 0, n, run.shape, run.device), nfe, trajectory=True)


def trajectories(run, path, n: int = 300, nfe: int = 100, seed: int = 0, title: str | None = None) -> Path:
    """Paths from noise (t = 0, grey) to data (t = 1, orange) under Euler with ``nfe`` steps."""
    res = _paths(run, n, nfe, seed)
    traj = res.trajectory.cpu()
    fig, ax = plt.subplots(figsize=(5, 5))
    _draw_trajectories(ax, traj, res.times, title or f"trajectories ({nfe} Euler steps)")
    return _save(fig, path)


def vector_field(run, path, times=(0.0, 0.25, 0.5, 0.75, 0.95), grid: int = 21, extent: float = 4.5) -> Path:
    """The learned field v(x, t) on a grid (model space), arrows coloured by speed."""
    lin = torch.linspace(-extent, extent, grid)
    xx, yy = torch.meshgrid(lin, lin, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], dim=1).to(run.device)
    fig, axes = plt.subplots(1, len(times), figsize=(3.3 * len(times), 3.4))
    for ax, t in zip(axes, times):
        with torch.inference_mode():
            v = run.velocity(pts, torch.full((len(pts),), t, device=run.device)).cpu()
        speed = v.norm(dim=1)
        ax.quiver(pts[:, 0].cpu(), pts[:, 1].cpu(), v[:, 0], v[:, 1], speed, cmap="viridis", angles="xy")
        ax.set(title=f"v(x, t={t:g})", aspect="equal", xticks=[], yticks=[])
    return _save(fig, path)


def loss_curve(rows: list[dict], path) -> Path:
    """The loss against the step, from the rows of metrics.jsonl (:func:`~flowmatch.runs.read_metrics`)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def eval_curve(rows: list[dict], path) -> Path:
    """``train --eval-every``'s measures against the step (RUN/eval.jsonl): the ratio to the
    floor (W2, or the Fréchet distance for digits), and the precision and recall beside it."""
    ratio = "fd_ratio" if "fd_ratio" in rows[0] else "ratio"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r[ratio] for r in rows], marker="o")
    axes[0].axhline(1.0, color="grey", ls="--", lw=1, label="floor (real against real)")
    axes[0].set(xlabel="step", ylabel=f"{'FD' if ratio == 'fd_ratio' else 'W2'} / floor", yscale="log",
                title=f"EMA samples ({rows[0]['n']}, {rows[0]['nfe']} Euler steps)")
    axes[0].legend()
    for key in ("precision", "recall", "off_support"):
        if key in rows[0]:
            axes[1].plot(steps, [r[key] for r in rows], marker="o", label=key)
    axes[1].set(xlabel="step", ylim=(0, 1.02), title="sharpness")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path)


def flow_gif(run, path, n: int = 1500, frames: int = 40, seed: int = 0) -> Path:
    """An animation of samples flowing from noise to data (Euler, one frame per step)."""
    res = _paths(run, n, frames, seed)
    traj = res.trajectory.cpu()
    fig, ax = plt.subplots(figsize=(4, 4))
    title = ax.set_title("t = 0.00")
    if traj.shape[2] == 1:  # 1-D: the histogram of x_t
        bins = _bins(traj[0], traj[-1]).numpy()
        top = max(torch.histogram(traj[k, :, 0].float(), torch.from_numpy(bins), density=True).hist.max().item()
                  for k in range(len(traj)))

        def update(k):
            ax.clear()
            ax.hist(traj[k, :, 0].numpy(), bins=bins, density=True, color="C1")
            ax.set(ylim=(0, 1.05 * top), yticks=[], title=f"t = {res.times[k].item():.2f}")
            return ()
    else:
        xl, yl = _limits(traj[0], traj[-1])
        dots = ax.scatter(traj[0, :, 0], traj[0, :, 1], s=2, color="C1")
        ax.set(xlim=xl, ylim=yl, aspect="equal", xticks=[], yticks=[])

        def update(k):
            dots.set_offsets(traj[k, :, :2])
            title.set_text(f"t = {res.times[k].item():.2f}")
            return dots, title

    anim = FuncAnimation(fig, update, frames=list(range(len(traj))) + [len(traj) - 1] * 8, blit=False)
    path = Path(path)
    with atomic_path(path) as tmp:
        anim.save(tmp, writer=PillowWriter(fps=12))
    plt.close(fig)
    return path


def quality_vs_nfe(results: dict, path, title: str = "quality against NFE") -> Path:
    """``results``: label -> :func:`flowmatch.metrics.evaluate` result. W2/floor against NFE."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, res in results.items():
        ks = [int(k) for k in res["nfe"]]
        ax.plot(ks, [res["nfe"][str(k)]["ratio"] for k in ks], marker="o", label=label)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="floor")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="W2 / floor", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def image_grid(x: torch.Tensor, path, nrow: int | None = None, title: str | None = None) -> Path:
    """A grid of images ``x`` (N, C, H, W) in [0, 1]; ``nrow`` images per row."""
    import math

    x = x.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = x[i]
    img = canvas[0] if c == 1 else canvas.permute(1, 2, 0)
    scale = max(1.0, 320 / canvas.shape[-1])
    fig, ax = plt.subplots(figsize=(canvas.shape[-1] * scale / 80, canvas.shape[-2] * scale / 80 + (0.3 if title else 0)))
    ax.imshow(img.numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def image_flow(run, path, n: int = 8, steps: int = 8, nfe: int = 64, seed: int = 0) -> Path:
    """Rows: samples; columns: x_t from noise (t = 0) to data (t = 1)."""
    res = _paths(run, n, nfe, seed)
    idx = torch.linspace(0, nfe, steps + 1).round().long()
    frames = res.trajectory[idx].clamp(0, 1)  # (steps+1, n, C, H, W)
    grid = frames.permute(1, 0, 2, 3, 4).reshape(-1, *frames.shape[2:])
    return image_grid(grid, path, nrow=steps + 1, title="noise (t=0) -> data (t=1)")


def plot_image_run(run, run_dir: Path, seed: int = 0, metrics: list[dict] | None = None) -> list[Path]:
    from .seeding import seed_of

    k = run.default_nfe  # a one-step generator's pictures at its one step, as the 2-D plots
    steps = f"{k} Euler step{'s' if k > 1 else ''}"
    written = [image_grid(run.sample(64, nfe=k, seed=seed).clamp(0, 1), run_dir / "samples.png",
                          title=f"samples ({steps})")]
    if run.num_classes:
        per = 10
        rows = [run.sample(per, nfe=k, seed=seed_of(seed, "classes", c), label=c, guidance=2.0) for c in range(run.num_classes)]
        written.append(image_grid(torch.cat(rows).clamp(0, 1), run_dir / "samples_by_class.png", nrow=per,
                                  title=f"one row per class (guidance 2, {steps})"))
    written.append(image_flow(run, run_dir / "trajectories.png"))
    if metrics:
        written.append(loss_curve(metrics, run_dir / "loss.png"))
    return written + _eval_picture(run_dir)


def _eval_picture(run_dir: Path) -> list[Path]:
    rows = read_metrics(run_dir / "eval.jsonl", value=None) if (run_dir / "eval.jsonl").exists() else []
    return [eval_curve(rows, run_dir / "eval.png")] if rows else []


def plot_run(run_dir, n: int = 4000, seed: int = 0) -> list[Path]:
    """Write every picture of a run into its directory; returns the paths written."""
    from .runs import load_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")  # checked before any picture is redrawn
    if len(run.shape) == 3:
        return plot_image_run(run, run_dir, seed, metrics)
    written = []
    from .seeding import generator

    ref = run.dataset.reference(n, generator(seed, "reference", 0, device=run.device)).cpu()
    k = run.default_nfe
    x = run.sample(n, nfe=k, solver="euler", seed=seed)
    title = f"samples ({k} Euler step{'s' if k > 1 else ''})"
    from .metrics import off_support, toy_name

    if (toy := toy_name(run.dataset)) is not None:  # every picture with its number
        title += f"\n{100 * off_support(toy, x):.1f}% off the support (data: {100 * off_support(toy, ref):.1f}%)"
    written.append(scatter(x, run_dir / "samples.png", title, reference=ref))
    if metrics:
        written.append(loss_curve(metrics, run_dir / "loss.png"))
    written.append(trajectories(run, run_dir / "trajectories.png"))
    if run.shape == (2,):
        written.append(vector_field(run, run_dir / "field.png"))
    written.append(flow_gif(run, run_dir / "flow.gif"))
    return written + _eval_picture(run_dir)


def compare_trajectories(runs: dict, path, n: int = 300, nfe: int = 100, seed: int = 0) -> Path:
    """Trajectories of several runs from the same noise, side by side (e.g. 1-RF against 2-RF)."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4.5), squeeze=False)
    for ax, (label, run) in zip(axes[0], runs.items()):
        res = _paths(run, n, nfe, seed)
        traj = res.trajectory.cpu()
        _draw_trajectories(ax, traj, res.times, f"{label} trajectories", legend=False)
    return _save(fig, path)
