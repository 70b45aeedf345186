"""PNG plots of the routing report (``explain.summarise``'s ``figures``): matplotlib Agg, no display.

Every plot draws only numbers stored in summary.json under ``figures`` (so they can be re-plotted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_persona_heatmap(fig_data: dict, path: Path) -> None:
    plt = _plt()
    layers = fig_data["layers"]
    n = max(len(layers), 1)
    users = fig_data["users"]
    size = (2.2 + 0.9 * len(fig_data["experts"]) * n, 1.5 + 0.22 * len(users))
    fig, axes = plt.subplots(1, n, figsize=size, squeeze=False)
    for li, ax in enumerate(axes[0]):
        v = np.asarray(layers[li]) if layers else np.zeros((0, 0))
        vmax = max(float(v.max()) if v.size else 1.0, 1e-6)
        im = ax.imshow(v, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_xticks(range(len(fig_data["experts"])))
        ax.set_xticklabels(fig_data["experts"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(users)))
        ax.set_yticklabels([f"u{u} (n={c})" for u, c in zip(users, fig_data["n_samples"], strict=True)],
                           fontsize=7)  # fmt: skip
        ax.set_title(f"persona MoE layer {li}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05, label="mean router prob.")
    fig.suptitle(f"Persona-expert mix, top {len(users)} users by samples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_function_by_hour(fig_data: dict, names: list[str], path: Path) -> None:
    plt = _plt()
    hours = np.asarray(fig_data["hours"])
    mean = np.asarray(fig_data["mean_prob"])  # [24, E]
    share = np.asarray(fig_data["top1_share"])
    n = np.asarray(fig_data["n_records"])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    a1.stackplot(hours, mean.T, labels=names, alpha=0.85)
    a1.set_ylabel("mean router probability")
    a1.set_ylim(0, 1)
    a1.set_title("Function-expert mix by hour of day (current-window records)", fontsize=10)
    a1.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    a2.stackplot(hours, share.T, labels=names, alpha=0.85)
    a2.set_ylabel("top-1 expert share")
    a2.set_ylim(0, 1)
    a2.set_xlabel("hour of day (cur_hour)")
    tw = a2.twinx()
    tw.plot(hours, n, "k.-", lw=1, label="records")
    tw.set_ylabel("records")
    a2.set_xticks(range(0, 24, 2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(fig_data: dict, persona: list[str], functions: list[str], path: Path) -> None:
    plt = _plt()
    panels = [(f"persona MoE layer {i}", persona, np.asarray(v), fig_data["persona_load_cv"][i])
              for i, v in enumerate(fig_data["persona_layers"])]  # fmt: skip
    if fig_data.get("function") is not None:
        panels.append(("function (semantic) MoE", functions, np.asarray(fig_data["function"]),
                       fig_data["function_load_cv"]))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.5, 3.8), squeeze=False)
    for ax, (title, names, load, cv) in zip(axes[0], panels, strict=True):
        ax.bar(range(len(load)), load, color="tab:blue")
        ax.axhline(1.0 / len(load), color="k", ls="--", lw=1, label="uniform 1/E")
        ax.set_xticks(range(len(load)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, max(1.0 / len(load) * 1.5, float(load.max()) * 1.15))
        ax.set_title(f"{title}\nCV = {cv:.3f}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of selected slots")
    fig.suptitle("Expert load per MoE layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_category_confusion(fig_data: dict, agreement: dict, path: Path) -> None:
    plt = _plt()
    cm = np.asarray(fig_data["counts"], dtype=np.float64)
    rows = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    names = fig_data["names"]
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{rows[i, j]:.2f}\n{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if rows[i, j] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("top function expert")
    ax.set_ylabel("venue function group (true category)")
    a = agreement
    ax.set_title(f"agreement {a['agreement']:.3f} vs random {a['random_uniform_expected']:.2f}, "
                 f"popularity {a['popularity_group']:.3f}", fontsize=9)  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, label="row share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rep: dict, out: Path) -> dict[str, str]:
    """Write every plot the report has figures for; returns {plot name: file name}."""
    figs, done = rep["figures"], {}
    if figs["persona_heatmap"]["layers"]:
        plot_persona_heatmap(figs["persona_heatmap"], out / "persona_heatmap.png")
        done["persona_heatmap"] = "persona_heatmap.png"
    if "function_by_hour" in figs:
        plot_function_by_hour(figs["function_by_hour"], rep["function_experts"], out / "function_by_hour.png")
        done["function_by_hour"] = "function_by_hour.png"
    plot_expert_load(figs["expert_load"], rep["persona_experts"], rep["function_experts"],
                     out / "expert_load.png")  # fmt: skip
    done["expert_load"] = "expert_load.png"
    if "category_confusion" in figs:
        plot_category_confusion(figs["category_confusion"], rep["category_agreement"],
                                out / "category_confusion.png")  # fmt: skip
        done["category_confusion"] = "category_confusion.png"
    return done
