"""PNG plots of `deepen bench --plot` and the `deepen eval` sweep (matplotlib).

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


def plot_method_sweep(sweep: dict[str, Any], path: str) -> None:
    """Dev accuracy by system (members alone, then each setting), one bar per task."""
    plt = _pyplot("the sweep")
    tasks = sweep["tasks"]
    systems: dict[str, dict[str, float]] = {}
    for r in sweep["members_alone"]:
        systems.setdefault(f"{r['system']} alone", {})[r["task"]] = r["accuracy"]
    for r in sweep["rows"]:
        name = r["method"] if r["weighting"] == "fixed" else f"{r['method']}+{r['weighting']}"
        label = f"{name} main={r['main']}"
        if r["method"] == "deepen":
            label += f" steps={r['steps']} eta={r['eta']:g}"
        systems.setdefault(label, {})[r["task"]] = r["accuracy"]
    width = 0.8 / max(1, len(tasks))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(systems) + 2), 4.4))
    for j, task in enumerate(tasks):
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(systems))]
        ax.bar(xs, [v.get(task, 0.0) for v in systems.values()], width, label=task)
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(list(systems), rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("dev accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("deepen eval sweep (dev sets)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
