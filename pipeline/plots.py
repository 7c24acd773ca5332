"""Parity and training plots (PNG). matplotlib is imported inside each function, with the Agg backend,
so importing this module costs nothing and needs no display."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from parity.compare import DEFAULT_TOLERANCES, VARIANTS, Tolerance

DPI = 110
ZERO_FLOOR = 1e-12  # exact matches (error 0) are drawn at this value on the log axis


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path) -> Path:
    """Lay the figure out, write it as a PNG (its folder made if need be) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _variant_of(label: str) -> str:
    """'keras/litert-int8@litert-interpreter' -> 'int8'; no variant suffix -> 'fp32'."""
    tail = label.split("@", 1)[0].rsplit("/", 1)[-1].rsplit("-", 1)[-1]
    return tail if tail in VARIANTS else "fp32"


def plot_model_parity(model_name: str, reference, outputs_by_label: Mapping[str, np.ndarray], path,
                      tolerances: Mapping[str, Tolerance | float] | None = None, max_points: int = 4000) -> Path:
    """One PNG for one model. Left: reference vs each artifact's outputs (identity line). Right: the
    distribution of log10 |artifact - reference| per artifact (box plot plus points), with each
    artifact's atol drawn as a red tick. `tolerances` maps labels to a Tolerance or an atol; a label
    without one uses the default of the variant its name ends with ('-fp16', '-int8'; else fp32).
    Artifacts whose outputs have another shape than the reference are listed, not drawn."""
    plt = _pyplot()
    ref = np.asarray(reference, dtype=np.float64).ravel()
    labels, errors, skipped = [], [], []  # labels as given, e.g. "keras/litert-fp16@litert-interpreter"
    for label, out in outputs_by_label.items():
        got = np.asarray(out, dtype=np.float64)
        if got.size != ref.size:
            skipped.append(f"{label}: shape {tuple(got.shape)}")
            continue
        labels.append(label)
        errors.append(np.abs(got.ravel() - ref))
    rng = np.random.default_rng(0)
    pick = np.arange(ref.size) if ref.size <= max_points else np.sort(rng.choice(ref.size, max_points, replace=False))

    prefix = f"{model_name}/"
    shown = [lb[len(prefix):] if lb.startswith(prefix) else lb for lb in labels]  # drop the model's name
    n = max(len(labels), 1)
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, max(1.2, 0.35 * n)]})
    cmap = plt.get_cmap("tab10")
    markers = "os^Dv<>pPX"
    for i, label in enumerate(labels):
        got = np.asarray(outputs_by_label[label], dtype=np.float64).ravel()
        ax_l.scatter(ref[pick], got[pick], s=14, alpha=0.55, color=cmap(i % 10), marker=markers[i % len(markers)],
                     label=shown[i], edgecolors="none")
    finite = ref[np.isfinite(ref)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax_l.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=1, ls="--", label="identity", zorder=0)
        ax_l.set_xlim(lo - pad, hi + pad)
        ax_l.set_ylim(lo - pad, hi + pad)
    ax_l.set_xlabel("reference output")
    ax_l.set_ylabel("artifact output")
    ax_l.set_title("artifact vs reference")
    ax_l.grid(alpha=0.3)
    if labels:
        ax_l.legend(fontsize=8, loc="upper left", framealpha=0.85)

    if labels:
        logs = [np.log10(np.maximum(np.nan_to_num(e, nan=1e6, posinf=1e6), ZERO_FLOOR)) for e in errors]
        pos = np.arange(1, len(labels) + 1)
        ax_r.boxplot(logs, positions=pos, widths=0.55, showfliers=False,
                     medianprops={"color": "black"}, boxprops={"color": "0.4"}, whiskerprops={"color": "0.4"},
                     capprops={"color": "0.4"})
        for i, lg in enumerate(logs):
            sub = lg[pick] if lg.size == ref.size else lg
            jitter = rng.uniform(-0.18, 0.18, sub.size)
            ax_r.scatter(pos[i] + jitter, sub, s=6, alpha=0.35, color=cmap(i % 10), edgecolors="none")
            atol = _atol_for(labels[i], tolerances)
            if atol:
                ax_r.hlines(np.log10(atol), pos[i] - 0.33, pos[i] + 0.33, color="red", lw=2,
                            label="atol" if i == 0 else None)
                ax_r.annotate(f"atol {atol:g}", (pos[i] + 0.33, np.log10(atol)), fontsize=7, color="red",
                             ha="right", va="bottom", xytext=(0, 2), textcoords="offset points")
            mx = float(np.max(errors[i])) if errors[i].size else 0.0
            ax_r.annotate(f"max {mx:.1e}", (pos[i], 1.0), xycoords=ax_r.get_xaxis_transform(), fontsize=7,
                          ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
        ax_r.set_xticks(pos)
        ax_r.set_xticklabels(shown, rotation=30, ha="right", fontsize=8)
        ax_r.set_xlim(0.4, len(labels) + 0.8)
        lo = min(float(min(lg.min() for lg in logs)), -8.0)
        ax_r.set_ylim(lo - 0.5, max(float(max(lg.max() for lg in logs)), 0.0) + 0.8)
        ax_r.axhline(np.log10(ZERO_FLOOR), color="0.7", lw=0.8, ls=":")
        ax_r.legend(fontsize=8, loc="upper left")
    else:
        ax_r.text(0.5, 0.5, "no artifact outputs to compare", ha="center", va="center", transform=ax_r.transAxes)
    ax_r.set_ylabel(f"log10 |artifact - reference|  (0 drawn at {ZERO_FLOOR:g})")
    ax_r.set_title("absolute error per artifact", pad=14)
    ax_r.grid(axis="y", alpha=0.3)

    title = f"Parity of {model_name}: {len(labels)} artifact(s), {ref.size} output values"
    if skipped:
        title += "\nnot drawn (shape differs from reference): " + "; ".join(skipped)
    fig.suptitle(title, fontsize=12)
    return _save(plt, fig, path)


def _atol_for(label: str, tolerances) -> float | None:
    tol = (tolerances or {}).get(label)
    if tol is None:
        tol = DEFAULT_TOLERANCES[_variant_of(label)]
    if isinstance(tol, Tolerance):
        return tol.atol
    return float(tol) if tol else None


def plot_training_curve(history: Mapping[str, Sequence[float]], path, title: str = "Training") -> Path:
    """One PNG of training curves: one panel per metric, its 'val_' twin drawn beside it. A loss panel
    uses a log y axis when its values are positive and span more than a factor of 20."""
    plt = _pyplot()
    if not isinstance(history, Mapping):  # a bare list of losses
        history = {"loss": list(history)}
    groups: dict[str, list[str]] = {}
    for key in history:
        base = key[4:] if key.startswith("val_") else key
        groups.setdefault(base, []).append(key)
    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    for ax, (base, keys) in zip(axes[0], groups.items()):
        allv = []
        for key in keys:
            vals = np.asarray(history[key], dtype=np.float64)
            allv.append(vals)
            epochs = np.arange(1, len(vals) + 1)
            ax.plot(epochs, vals, lw=1.6, marker="o" if len(vals) <= 30 else None, ms=3,
                    ls="--" if key.startswith("val_") else "-", label=f"{key} (last {vals[-1]:.4g})" if len(vals) else key)
        v = np.concatenate(allv) if allv else np.array([])
        v = v[np.isfinite(v)]
        if "loss" in base and v.size and v.min() > 0 and v.max() / v.min() > 20:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(base)
        ax.set_title(base)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no history", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle(title, fontsize=12)
    return _save(plt, fig, path)


def plot_layer_errors(localized: Mapping[str, Mapping], path, title: str = "Error per layer") -> Path:
    """One PNG: for each failed artifact (label -> its record's localization), the max abs error of
    every paired layer in the original model's order on a log axis, what its tolerance allows dashed,
    and the first diverging layer marked."""
    plt = _pyplot()
    layers: list[str] = []
    for loc in localized.values():
        for p in loc.get("layers", []):
            if p["layer"] not in layers:
                layers.append(p["layer"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 3), 4.4))
    for label, loc in localized.items():
        xs = [layers.index(p["layer"]) for p in loc.get("layers", []) if "max_abs" in p]
        ys = [max(p["max_abs"], ZERO_FLOOR) for p in loc.get("layers", []) if "max_abs" in p]
        line, = ax.plot(xs, ys, marker="o", ms=4, lw=1.5, label=label)
        allowed = [max(p["allowed"], ZERO_FLOOR) for p in loc.get("layers", []) if "max_abs" in p]
        ax.plot(xs, allowed, ls="--", lw=1, color=line.get_color(), alpha=0.6)
        if loc.get("layer") in layers:
            x = layers.index(loc["layer"])
            ax.scatter([x], [max(loc["max_abs"], ZERO_FLOOR)], s=120, facecolors="none", edgecolors="red", zorder=5)
            ax.annotate(f"first diverges: {loc['layer']}", (x, max(loc["max_abs"], ZERO_FLOOR)),
                        textcoords="offset points", xytext=(6, 8), fontsize=8, color="red")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("max abs error (dashed: allowed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_profiles(profiles: Mapping[str, Mapping], path, title: str = "Artifacts: latency and size") -> Path:
    """One PNG of every profiled artifact (label@runtime -> its record's profile): latency p50 with its
    p99 at batch 1 and at the largest batch, and file size, side by side on log axes."""
    plt = _pyplot()
    labels = list(profiles)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.5 * len(labels) + 4), 4.8))
    x = np.arange(len(labels))
    for offset, key in ((-0.2, "batch_1"), (0.2, "max_batch")):
        p50 = np.array([profiles[k][key]["p50_ms"] for k in labels])
        p99 = np.array([profiles[k][key]["p99_ms"] for k in labels])
        rows = profiles[labels[0]][key]["rows"] if labels else 1
        axes[0].bar(x + offset, p50, width=0.4, label=f"batch {rows}: p50 (bar), p99 (tick)")
        axes[0].errorbar(x + offset, p50, yerr=[np.zeros_like(p50), p99 - p50], fmt="none", ecolor="black",
                         capsize=2, lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("latency, ms")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [(profiles[k].get("size_bytes") or 0) / 1024 for k in labels], color="tab:gray")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("size, KiB")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=12)
    return _save(plt, fig, path)
