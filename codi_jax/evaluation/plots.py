"""Metric-versus-steps plots (matplotlib, headless)."""

from __future__ import annotations

from codi_jax import storage

PLOTTED = (("psnr", "PSNR (higher is better)"), ("swd_mean", "Laplacian SWD (lower is better)"))


def metrics_vs_steps(series: dict, path: str, title: str = "") -> str:
    """series: {label: [(steps, {metric: value}), ...]}; one line per label with >= 2 points
    (a single point is drawn as a marker). Writes a PNG with PSNR and SWD side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 3.8))
    all_steps = sorted({p[0] for points in series.values() for p in points})
    for label, points in sorted(series.items()):
        points = sorted(points, key=lambda p: p[0])
        steps = [p[0] for p in points]
        for ax, (metric, _) in zip(axes, PLOTTED):
            ax.plot(steps, [p[1][metric] for p in points], marker="o", label=label)
    for ax, (_, name) in zip(axes, PLOTTED):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_steps)
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("sampling steps")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    storage.save_with(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
