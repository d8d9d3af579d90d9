"""compare.png: accuracy against tokens/s, one point per configuration.

The marker is the grid's first axis (k), the colour its last (the layer subset; black: the
policy's baseline, which computes every layer); error bars are accuracy ± one standard error
and the tokens/s quartiles of the timed batches. Both axes start at 0, so a gap that looks
small is small; the caption gives n.
"""
from __future__ import annotations

from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
BASELINE_COLOUR = "black"


def plot(rows, path: Path, title: str, axes: tuple[str, ...] = ("k", "subset"), base: str = "k=1") -> Path:
    import matplotlib.pyplot as plt
    fig, extra = figure(rows, title, axes, base)
    fig.savefig(path, bbox_inches="tight", bbox_extra_artists=extra)   # the legends sit outside the axes
    plt.close(fig)
    return path


def styles(rows, axes: tuple[str, ...]) -> tuple[dict, dict]:
    """Marker per value of the first axis and colour per value of the last (in the rows' order)."""
    markers, colours = {}, {}
    for r in rows:
        cell = r.pick.cell
        markers.setdefault(cell.value(axes[0]), MARKERS[len(markers) % len(MARKERS)])
        if len(axes) > 1 and not cell.baseline:
            colours.setdefault(cell.value(axes[-1]), COLOURS[len(colours) % len(COLOURS)])
    return markers, colours


def figure(rows, title: str, axes: tuple[str, ...] = ("k", "subset"), base: str = "k=1"):
    """The figure, and the artists outside its axes (legends, caption) that saving must keep."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a cluster or in CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    markers, colours = styles(rows, axes)
    right, coloured, marked, ns, batches, starred = 0.0, [], [], set(), {}, False
    for r in rows:
        f = r.figures()
        acc, tps = f.get("accuracy"), f.get("tokens_per_second_median")
        if acc is None or tps is None:
            continue
        cell = r.pick.cell
        hue = None if cell.baseline else cell.value(axes[-1]) if len(axes) > 1 else "reuse"
        colour = BASELINE_COLOUR if hue is None else colours.get(hue, COLOURS[0])
        marker = markers[cell.value(axes[0])]
        low, high = f.get("tokens_per_second_p25", tps), f.get("tokens_per_second_p75", tps)
        se = f.get("accuracy_stderr", 0.0)
        ax.errorbar([tps], [acc * 100], xerr=[[tps - low], [high - tps]], yerr=[se * 100], fmt=marker,
                    color=colour, markersize=8, capsize=3, lw=1,
                    markerfacecolor="none" if r.pick.starred else colour)   # hollow: another commit or dirty
        right = max(right, high)
        coloured += [hue] if hue not in coloured else []
        marked += [cell.value(axes[0])] if cell.value(axes[0]) not in marked else []
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
    colour_handles = [Patch(color=BASELINE_COLOUR if h is None else colours.get(h, COLOURS[0]),
                            label=f"{base} baseline (every layer)" if h is None else
                            f"{axes[-1]} {h}" if len(axes) > 1 else "reuse") for h in coloured]
    marker_handles = [Line2D([], [], ls="", marker=markers[v], color="dimgray", markersize=8, label=f"{axes[0]}={v}")
                      for v in marked]
    first = ax.legend(handles=colour_handles, title=f"colour: {axes[-1] if len(axes) > 1 else 'baseline or not'}",
                      loc="upper left", bbox_to_anchor=(1.02, 1.0), alignment="left")
    ax.add_artist(first)
    second = ax.legend(handles=marker_handles, title=f"marker: {axes[0]}", loc="upper left",
                       bbox_to_anchor=(1.02, 0.6), alignment="left")
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
