"""PNG plots of `deepen bench --plot` and `deepen eval --sweep-eta` (matplotlib).

matplotlib comes with the `bench` extra: `pip install 'deepen[bench]'`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def _pyplot(flag: str) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            f"{flag} needs matplotlib: pip install 'deepen[bench]' (or leave out {flag})."
        ) from None
    return plt


def plot_bench(figures: dict[str, Any], path: str) -> None:
    """Ms/token against new tokens: ensemble, re-encoding baseline, sum of members alone."""
    plt = _pyplot("--plot")
    curve = figures["length"]["curve"]
    x = [p["new_tokens"] for p in curve]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label in (
        ("ensemble_ms", "ensemble (incremental sync)"),
        ("reencode_baseline_ms", "re-encoding baseline"),
        ("sum_of_members_ms", "sum of members alone"),
    ):
        ax.plot(x, [p[key] for p in curve], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("new tokens (batch 1)")
    ax.set_ylabel(f"ms per token at that length (mean of {figures['length']['window']} steps)")
    ax.set_title(f"deepen bench: {' + '.join(figures['members'])}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep: dict[str, Any], path: str) -> None:
    """Dev accuracy against eta: one line per (main member, steps), members alone dashed."""
    plt = _pyplot("--sweep-eta")
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    lines: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for row in sweep["rows"]:
        lines.setdefault((row["main"], row["steps"]), []).append((row["eta"], row["accuracy"]))
    for (main, steps), points in lines.items():
        points.sort()
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label=f"main {main}, {steps} steps",
        )
    for member in sweep["members_alone"]:
        ax.axhline(member["accuracy"], linestyle="--", linewidth=1, color="grey")
        # the label sits at the line's right end, clear of the points at small eta
        ax.annotate(
            f"{member['system']} alone",
            (1, member["accuracy"]),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color="grey",
            ha="right",
            xytext=(-2, 2),
            textcoords="offset points",
        )
    ax.set_xlabel("eta (inverse-search rate)")
    ax.set_ylabel(f"dev accuracy ({sweep['dev_questions']} questions)")
    ax.set_title("deepen eval sweep (dev set)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the data
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
