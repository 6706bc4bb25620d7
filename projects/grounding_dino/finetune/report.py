"""The WiSE-FT table (markdown) and trade-off curve (matplotlib PNG)."""

from typing import Mapping

from ..io.atomic import atomic_file

__all__ = ["table", "draw_curve"]


def table(summary: Mapping) -> str:
    """A markdown table: one row per alpha, target and retention scores, the chosen alpha."""
    metric = summary["metric"]
    sets = summary["retention_sets"]
    header = ["alpha", f"target {metric}", f"retention {metric} (mean)"] + list(sets)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        cells = [f"{row['alpha']:.2f}", f"{row['target']:.1f}", f"{row['retention']:.1f}"]
        cells += [f"{row['per_set'][name]:.1f}" for name in sets]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = summary["chosen"]
    loss = summary["max_target_loss"]
    if chosen is None:
        lines.append(f"\nNo alpha keeps the target within {loss:g} points of the fine-tuned model.")
    else:
        lines.append(
            f"\nFor a target loss of at most {loss:g} points, alpha {chosen['alpha']:.2f} keeps "
            f"the most retention {metric}: {chosen['retention']:.1f} "
            f"(target {chosen['target']:.1f})."
        )
    return "\n".join(lines)


def draw_curve(summary: Mapping, path: str) -> None:
    """Target score against retention score, one labelled point per alpha; written to the new
    file ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    metric = summary["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    ax.plot(
        [r["retention"] for r in rows],
        [r["target"] for r in rows],
        "-o",
        color="tab:blue",
        label="WiSE-FT: (1 - α) · base + α · fine-tuned",
    )
    for row in rows:
        ax.annotate(
            f"α={row['alpha']:.2f}",
            (row["retention"], row["target"]),
            textcoords="offset points",
            xytext=(6, -10),
            fontsize=8,
        )
    chosen = summary["chosen"]
    if chosen is not None:
        ax.plot(
            [chosen["retention"]],
            [chosen["target"]],
            "o",
            ms=12,
            mfc="none",
            color="tab:red",
            label=f"chosen α (target loss ≤ {summary['max_target_loss']:g})",
        )
    extras = summary.get("extra_points", [])
    for index, extra in enumerate(extras):
        ax.plot(
            [extra["retention"]],
            [extra["target"]],
            "s",
            color="tab:gray",
            label="other recipes" if index == 0 else None,
        )
        ax.annotate(  # alternate above and below: recipes often land close together
            extra["label"],
            (extra["retention"], extra["target"]),
            textcoords="offset points",
            xytext=(5, 6 if index % 2 == 0 else -13),
            fontsize=8,
            color="dimgray",
        )
    ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel(f"retention {metric} ({', '.join(summary['retention_sets'])})")
    ax.set_ylabel(f"target {metric}")
    ax.set_title("Target against retention")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb", replace=False) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
