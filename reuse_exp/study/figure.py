"""compare.png: accuracy against tokens/s, one point per configuration.

Colour is the layer subset (black: the k=1 baseline, which computes every layer), the
marker is k; error bars are accuracy ± one standard error and the tokens/s quartiles of
the timed batches. Both axes start at 0, so a gap that looks small is small; the caption
gives n.
"""
from __future__ import annotations

from pathlib import Path

SUBSET_COLOURS = {"any": "black", "first": "tab:blue", "middle": "tab:orange", "last": "tab:green"}
K_MARKERS = {1: "o", 2: "s", 3: "^", 4: "D", 5: "v", 6: "P"}


def plot(rows, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt
    fig, extra = figure(rows, title)
    fig.savefig(path, bbox_inches="tight", bbox_extra_artists=extra)   # the legends sit outside the axes
    plt.close(fig)
    return path


def figure(rows, title: str):
    """The figure, and the artists outside its axes (legends, caption) that saving must keep."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a cluster or in CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    right, subsets, ks, ns, batches, starred = 0.0, [], [], set(), {}, False
    for r in rows:
        f = r.figures()
        acc, tps = f.get("accuracy"), f.get("tokens_per_second_median")
        if acc is None or tps is None:
            continue
        cell = r.pick.cell
        colour, marker = SUBSET_COLOURS.get(cell.subset, "tab:gray"), K_MARKERS.get(cell.k, "X")
        low, high = f.get("tokens_per_second_p25", tps), f.get("tokens_per_second_p75", tps)
        se = f.get("accuracy_stderr", 0.0)
        ax.errorbar([tps], [acc * 100], xerr=[[tps - low], [high - tps]], yerr=[se * 100], fmt=marker,
                    color=colour, markersize=8, capsize=3, lw=1,
                    markerfacecolor="none" if r.pick.starred else colour)   # hollow: another commit or dirty
        right = max(right, high)
        subsets += [cell.subset] if cell.subset not in subsets else []
        ks += [cell.k] if cell.k not in ks else []
        ns.add(f.get("n_samples"))
        batches[cell.name] = int(f.get("timed_batches", 1))
        starred |= r.pick.starred
    ax.set_xlim(0, right * 1.1 if right > 0 else 1)
    ax.set_ylim(0, 105)                   # room above 100% for a marker and its bar
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("tokens/s (median over timed batches; bars: quartiles)")
    ax.set_ylabel("accuracy, % (bars: ± 1 standard error)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    colour_handles = [Patch(color=SUBSET_COLOURS.get(s, "tab:gray"),
                            label="k=1 baseline (every layer)" if s == "any" else f"subset {s}") for s in subsets]
    marker_handles = [Line2D([], [], ls="", marker=K_MARKERS.get(k, "X"), color="dimgray", markersize=8,
                             label=f"k={k}") for k in sorted(ks)]
    first = ax.legend(handles=colour_handles, title="colour: layer subset", loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), alignment="left")
    ax.add_artist(first)
    second = ax.legend(handles=marker_handles, title="marker: k", loc="upper left", bbox_to_anchor=(1.02, 0.6),
              alignment="left")
    n = (f"n = {int(next(iter(ns)))} documents per configuration" if len(ns) == 1 and None not in ns
         else "n differs between configurations (see compare.txt)")
    timed = sorted(set(batches.values()))
    timing = (f"{timed[0]} timed batch{'es' if timed[0] != 1 else ''} each" if len(timed) == 1
              else f"{timed[0]}-{timed[-1]} timed batches")
    note = " A single timed batch has no spread." if 1 in timed else ""
    note += " Hollow markers: another commit or a dirty tree." if starred else ""
    caption = ax.text(0, -0.13, f"{n}; tokens/s from {timing}.{note}", transform=ax.transAxes, fontsize=9,
                      ha="left", va="top")
    return fig, [first, second, caption]
