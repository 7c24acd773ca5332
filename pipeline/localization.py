"""The first diverging layer of a failed artifact: the original model's layer outputs (frameworks/),
the artifact's intermediate tensors in its own runtime (exporters/taps.py), paired and judged by
parity/localize.py. Run only for a failed cell, or on `explain`."""
from __future__ import annotations

import numpy as np

from parity.feeds import n_rows, take

ROWS = 8  # the rows localisation runs: the worst one first, then the first others


def rows_to_run(x, worst: int | None):
    """A few parity rows, the one that failed worst among them."""
    n = n_rows(x)
    picked = list(dict.fromkeys(([int(worst)] if worst is not None and 0 <= int(worst) < n else []) +
                                list(range(min(n, ROWS)))))[:ROWS]
    return take(x, np.asarray(picked))


def localize_artifact(fw, load_model, fmt: str, path: str, x, tolerance) -> dict:
    """The localization of one artifact against its original on rows `x`, as the record keeps it."""
    from exporters.taps import FORMATS_WITH_TAPS, artifact_taps
    from parity.localize import localize
    if fmt not in FORMATS_WITH_TAPS:  # said before the model is loaded: that may need another framework
        return {"note": f"the intermediate tensors of {fmt} artifacts are not read yet "
                        f"(they are for {', '.join(FORMATS_WITH_TAPS)})"}
    model = load_model()
    if not hasattr(fw, "layer_outputs"):
        return {"note": "this framework's layer outputs are not read yet"}
    layers = fw.layer_outputs(model, x)
    if not layers:
        return {"note": "the original model exposes no layers to compare (a subclassed model, say)"}
    loc = localize(layers, artifact_taps(fmt, path, x), atol=tolerance.atol, rtol=tolerance.rtol).to_json()
    groups = fw.output_layers(model) if hasattr(fw, "output_layers") else {}
    if groups:  # a model of several outputs: each one's own first divergence too
        from parity.localize import per_output
        loc["outputs"] = per_output(loc, groups)
    return loc


def localize_failures(records: list, artifacts: list, ref: dict, tolerances: dict, *, framework: str, load_model,
                      log=lambda line: None) -> None:
    """Give each failed record with numbers its first diverging layer (details["localization"]) and
    the one line that names it at the end of its message. `load_model` is called only when one failed."""
    from exporters import precision
    from frameworks import adapter
    from parity.compare import tolerance_for
    from parity.localize import one_line
    failed = [r for r in records if r.failed and r.comparison is not None]
    if not failed:
        return
    fw, loaded = adapter(framework), []

    def model():
        if not loaded:
            loaded.append(load_model())
        return loaded[0]
    by_label = {a.label: a for a in artifacts}
    for rec in failed:
        artifact = by_label.get(rec.label)
        if artifact is None:
            continue
        try:
            loc = localize_artifact(fw, model, rec.format, artifact.path,
                                    rows_to_run(ref["x"], rec.comparison.metrics.get("worst_index")),
                                    tolerance_for(precision(rec.format, rec.variant), rec.format, tolerances))
        except Exception as e:  # noqa: BLE001 - the verdict stands; only the pointer to the layer is missing
            loc = {"note": f"localisation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        rec.details["localization"] = loc
        line = one_line(loc, rec.format)
        rec.message = f"{rec.message}; {line}"
        log(f"{rec.label}: {line}")
