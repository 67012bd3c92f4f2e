"""Pictures people would rather look at than read: sample grids, schedules and FID curves (PNG)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .atomic import write_atomic
from .metrics import to_uint8


def image_grid(images: Tensor, nrow: int | None = None, scale: int = 1, pad: int = 1) -> Tensor:
    """[B, C, H, W] in [-1, 1] -> one uint8 image [H', W', C] (C = 1 or 3), nearest upscaling."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    x = to_uint8(images).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0)


def grid_scale(images: Tensor) -> int:
    """Pixels per image pixel in a grid: small images (8x8 digits) are drawn 4x larger."""
    return 4 if images.shape[-1] <= 16 else 1


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write ``image_grid`` as a PNG (temporary file, then rename); ``scale`` default ``grid_scale``."""
    from PIL import Image
    scale = scale or grid_scale(images)
    grid = image_grid(images, nrow, scale).numpy()
    return write_atomic(path, lambda tmp: Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(tmp))


def _save_figure(fig, path: str | Path) -> Path:
    """Render a matplotlib figure with the Agg canvas (no GUI, no global backend) to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _lambdas(timesteps: Tensor, noise_schedule) -> Tensor:
    t = timesteps.detach().cpu().double()
    return noise_schedule.marginal_lambda(t).double()


def plot_schedules(schedules: dict[str, Tensor], noise_schedule, path: str | Path, title: str | None = None,
                   cond: dict[str, Tensor] | None = None) -> Path:
    """Each method's global schedule [N+1] as lambda = log(alpha/sigma) against the step index;
    ``cond``: conditioning times where the network is called elsewhere (TimeTuner, LD3's xi),
    drawn dotted in the same colour with open markers, so a method whose solver times equal a
    baseline's stays visible."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for i, (name, ts) in enumerate(schedules.items()):
        lam = _lambdas(ts, noise_schedule)
        ax.plot(range(len(lam)), lam.numpy(), marker="o", markersize=3, label=name, color=f"C{i % 10}")
        if cond and name in cond:
            c = _lambdas(cond[name], noise_schedule)
            ax.plot(range(len(c)), c.numpy(), marker="o", markersize=5, linestyle=":", color=f"C{i % 10}",
                    markerfacecolor="none", label=f"{name}: network times")
    ax.set_xlabel("step")
    ax.set_ylabel("lambda = log(alpha / sigma)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def plot_schedule_spread(per_sample: Tensor, noise_schedule, path: str | Path, reference: Tensor | None = None) -> Path:
    """Per-sample schedules [B, N+1] in lambda: the median and the 10-90 % band over samples,
    with an optional global schedule ``reference`` [N+1] on top."""
    from matplotlib.figure import Figure
    if per_sample.ndim != 2:
        raise ValueError(f"expected per-sample schedules [B, N+1], got shape {tuple(per_sample.shape)}")
    lam = _lambdas(per_sample, noise_schedule)
    low, mid, high = torch.quantile(lam, torch.tensor([0.1, 0.5, 0.9], dtype=lam.dtype), dim=0).numpy()
    steps = range(lam.shape[1])
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.fill_between(steps, low, high, alpha=0.3, label="10-90 % of samples")
    ax.plot(steps, mid, marker="o", markersize=3, label=f"median of {lam.shape[0]} samples")
    if reference is not None:
        ax.plot(steps, _lambdas(reference, noise_schedule).numpy(), "k--", marker="x", markersize=4, label="global")
    ax.set_xlabel("step")
    ax.set_ylabel("lambda = log(alpha / sigma)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def plot_fid_vs_nfe(rows: Sequence, path: str | Path) -> Path:
    """FID against NFE with 95 % error bars, one line per schedule (``ats.report.Row``s),
    log-scale FID; methods solid, baselines dashed."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name in dict.fromkeys(r.name for r in rows):
        mine = sorted((r for r in rows if r.name == name), key=lambda r: r.nfe)
        fid = np.array([r.fid.fid for r in mine])
        err = np.array([[r.fid.fid - r.fid.low for r in mine], [r.fid.high - r.fid.fid for r in mine]])
        ax.errorbar([r.nfe for r in mine], fid, yerr=np.clip(np.nan_to_num(err), 0, None), marker="o", capsize=3,
                    label=mine[0].label, linestyle="--" if mine[0].kind == "baseline" else "-")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r.nfe for r in rows}))
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"{rows[0].fid.metric if rows else 'FID'} (95 % interval)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def plot_fid_intervals(rows: Sequence, path: str | Path) -> Path:
    """One NFE: each schedule's FID as a dot with its 95 % interval, best at the top; methods
    in a second colour, the reference baseline's interval shaded across the chart."""
    from matplotlib.figure import Figure
    rows = sorted([r for r in rows if np.isfinite(r.fid.fid)], key=lambda r: -r.fid.fid)
    fig = Figure(figsize=(6, 0.9 + 0.35 * len(rows)))
    ax = fig.add_subplot()
    ref = next((r for r in rows if r.reference == r.name), None)
    if ref is not None:
        ax.axvspan(ref.fid.low, ref.fid.high, color="0.85", label=f"{ref.name} (reference) 95 %")
    for i, r in enumerate(rows):
        color = "C1" if r.kind == "method" else "C0"
        ax.errorbar([r.fid.fid], [i], xerr=[[r.fid.fid - r.fid.low], [r.fid.high - r.fid.fid]], fmt="o",
                    color=color, capsize=3)
    ax.set_yticks(range(len(rows)), [r.label for r in rows])
    if rows:
        ax.set_title(f"{rows[0].solver}, NFE {rows[0].nfe}: {rows[0].fid.metric} on {max(r.fid.n for r in rows)} samples, "
                     "95 % intervals", fontsize="small")
    ax.set_xlabel(rows[0].fid.metric if rows else "FID")
    ax.grid(alpha=0.3, axis="x")
    if ref is not None:
        ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    return _save_figure(fig, path)


def save_side_by_side(images: dict[str, Tensor], path: str | Path, scale: int | None = None, gap: int = 8) -> Path:
    """One ``image_grid`` per entry ([B, C, H, W] in [-1, 1], the same seeds under several
    schedules), left to right, each under its name; a PNG (temporary file, then rename);
    ``scale`` default ``grid_scale``."""
    scale = scale or grid_scale(next(iter(images.values())))
    return save_grids_side_by_side({name: image_grid(x, scale=scale).numpy() for name, x in images.items()}, path,
                                   gap)


def save_grids_side_by_side(pictures: dict[str, np.ndarray], path: str | Path, gap: int = 8) -> Path:
    """Pictures (uint8 [H, W, C], C = 1 or 3: image grids) left to right, each under its name; a PNG."""
    from PIL import Image, ImageDraw
    grids = [g if g.ndim == 3 else g[:, :, None] for g in pictures.values()]
    label_h = 14
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    height = max(g.shape[0] for g in grids) + label_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, grid in zip(pictures, grids):
        canvas.paste(Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).convert("RGB"), (x, label_h))
        draw.text((x + 2, 1), name, fill="black")
        x += grid.shape[1] + gap
    return write_atomic(path, lambda tmp: canvas.save(tmp, format="png"))


def plot_points(points: dict[str, Tensor], path: str | Path, reference: Tensor | None = None) -> Path:
    """Scatter plots of samples [B, D] (the first two coordinates), one panel per entry side
    by side on shared axes, over ``reference`` points (e.g. exact samples) in grey."""
    from matplotlib.figure import Figure
    if any(p.ndim != 2 or p.shape[1] < 2 for p in points.values()):
        raise ValueError("expected points [B, D] with D >= 2")
    fig = Figure(figsize=(4 * len(points), 4))
    axes = fig.subplots(1, len(points), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, p) in zip(axes, points.items()):
        if reference is not None:
            ref = reference.detach().cpu().double()
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.8", label="exact samples")
        p = p.detach().cpu().double()
        ax.scatter(p[:, 0], p[:, 1], s=6, label=f"{len(p)} samples")
        ax.set_title(name)
        ax.set_xlabel("x[0]")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("x[1]")
    axes[0].legend(fontsize="small", loc="upper right")
    return _save_figure(fig, path)
