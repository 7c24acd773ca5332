"""parity.report (JSON round trip, Markdown, JUnit XML, terminal table) and pipeline.plots (PNG files)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from parity.compare import ParityRecord, compare, discrimination, tolerance_for
from parity.report import SCHEMA_VERSION, ParityReport, merge_reports, print_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def report() -> ParityReport:
    """A digits-like run: two models, passing fp32 cells, an int8 cell within budget, a tampered fp32
    artifact, an artifact that would not load, and two skipped cells."""
    rng = np.random.default_rng(0)
    ref = softmax(rng.normal(0, 3, (194, 10)))
    labels = np.r_[ref[:128].argmax(1), -np.ones(66, int)]
    kinds = np.r_[np.zeros(128), np.ones(64), [2, 2]].astype(np.int8)
    rep = ParityReport(spec="digits", run_id="run-123", metadata={"parity_rows": 194})

    def check(model, fmt, variant, runtime, got, **kw):
        c = compare(ref, got, tolerance=tolerance_for(variant, fmt), task="classification", labels=labels,
                    kinds=kinds)
        return rep.add(ParityRecord.checked(model, fmt, variant, runtime, f"/runs/{model}/{fmt}-{variant}", c, **kw))

    for model in ("keras", "torch"):
        check(model, "onnx", "fp32", "onnxruntime-cpu", ref + rng.normal(0, 1e-7, ref.shape), elapsed_s=0.05)
        check(model, "litert", "int8", "litert-interpreter", ref + rng.normal(0, 3e-3, ref.shape), elapsed_s=0.02)
    tampered = ref.copy()
    tampered[42, 3] += 0.05
    check("keras", "tfjs", "fp32", "tfjs-node-wasm", tampered, elapsed_s=1.5)
    rep.add(ParityRecord.failed_to_load("torch", "litert", "fp16", "litert-interpreter", "/runs/torch/litert-fp16",
                                        "ArtifactLoadError: torch/litert-fp16: file truncated at 1024 of 90112 bytes"))
    rep.add(ParityRecord.skipped("keras", "torchscript", "fp32", "TorchScript is made from torch models only",
                                 skip="not-produced"))
    rep.add(ParityRecord.skipped("torch", "tfjs", "int8", "spec excludes tfjs int8"))
    pert = ref * (1 + 1e-3 * rng.normal(size=ref.shape))
    rep.discrimination["keras"] = discrimination(ref, pert, task="classification", perturbation="weights x (1 + 1e-3 N)")
    rep.discrimination["torch"] = discrimination(np.full((194, 10), 0.1), task="classification")
    return rep


def test_verdicts_and_summary(report):
    assert not report.passed
    assert [r.label for r in report.failed_records] == ["keras/tfjs", "torch/litert-fp16"]
    assert report.counts == {"total": 8, "passed": 4, "failed": 2, "skipped": 2, "errors": 1}
    assert report.summary_line() == "parity: 4 passed, 2 failed, 2 skipped"
    assert any("torch is not discriminative" in w for w in report.warnings)


def test_passed_needs_a_checked_record_and_no_failure():
    y = np.arange(4.0).reshape(4, 1)
    ok = ParityReport([ParityRecord.checked("m", "onnx", "fp32", "onnxruntime-cpu", "m.onnx", compare(y, y))])
    assert ok.passed
    assert not ParityReport([ParityRecord.skipped("m", "onnx", "fp32", "excluded by spec")]).passed
    assert not ParityReport().passed


def test_json_round_trip(report, tmp_path):
    path = report.write_json(tmp_path / "sub" / "parity.json")
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == "1"
    assert raw["passed"] is False and raw["summary"] == report.summary_line()
    assert [r["status"] for r in raw["records"]].count("skipped") == 2
    back = ParityReport.from_json(path)
    assert back.to_json() == report.to_json()
    assert back.created == report.created and back.run_id == "run-123"
    assert [r.message for r in back.records] == [r.message for r in report.records]
    assert back.records[0].comparison.tolerance == report.records[0].comparison.tolerance
    # no temp files left beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["parity.json"]


def test_from_json_refuses_another_schema_version(report, tmp_path):
    d = report.to_json()
    d["schema_version"] = "2"
    p = tmp_path / "p.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="schema_version '2'"):
        ParityReport.from_json(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ParityReport.from_json(p)


def test_junit_xml_parses_and_counts_match(report, tmp_path):
    path = report.write_junit(tmp_path / "parity.xml")
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["keras", "torch"]
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        cases = s.findall("testcase")
        counted = {"tests": len(cases), "failures": sum(c.find("failure") is not None for c in cases),
                   "errors": sum(c.find("error") is not None for c in cases),
                   "skipped": sum(c.find("skipped") is not None for c in cases)}
        for k, v in counted.items():
            assert int(s.get(k)) == v, (s.get("name"), k)
            total[k] += v
        assert float(s.get("time")) == pytest.approx(sum(float(c.get("time")) for c in cases), abs=2e-3)
    for k, v in total.items():
        assert int(root.get(k)) == v
    assert total == {"tests": 8, "failures": 1, "errors": 1, "skipped": 2}
    assert float(root.get("time")) == pytest.approx(0.05 * 2 + 0.02 * 2 + 1.5, abs=1e-3)

    case = root.find(".//testcase[@classname='keras.tfjs']")
    assert case.get("name") == "fp32@tfjs-node-wasm"
    failure = case.find("failure")
    assert "on input 42 (held-out), output 3" in failure.get("message")
    assert "metrics:" in failure.text
    skipped = root.find(".//testcase[@classname='torch.tfjs']/skipped")
    assert skipped.get("message") == "spec excludes tfjs int8"
    assert root.find(".//testcase[@classname='torch.litert']/error") is not None


def test_markdown_lists_every_record_failure_and_discrimination(report):
    md = report.to_markdown()
    assert md.startswith("# Parity report: digits")
    assert "| model | format | variant | runtime | max abs | max rel | cosine | top-1 | tolerance | verdict |" in md
    rows = [line for line in md.splitlines() if line.startswith("| keras") or line.startswith("| torch")]
    assert len(rows) == len(report.records)
    for r, line in zip(report.records, rows):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[:4] == [r.model, r.format, r.variant, r.runtime or "-"]
        assert cells[-1].startswith({"passed": "PASS", "failed": "FAIL", "skipped": "SKIPPED"}[r.status])
    assert "SKIPPED (spec excludes tfjs int8)" in md
    assert "## Failures" in md and "FAIL keras/tfjs on tfjs-node-wasm" in md and "file truncated" in md
    assert "## Discrimination of the parity set" in md
    assert "keras: discriminative" in md and "torch: NOT discriminative: reference outputs barely vary" in md


def test_terminal_table(report, capsys):
    import sys
    text = print_table(report, file=sys.stdout, width=120)
    assert capsys.readouterr().out == text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["model", "format", "variant", "runtime"]
    assert len(lines) == 2 + len(report.records) + len(report.discrimination) + 1
    assert lines[-1] == report.summary_line()
    assert all(len(line) <= 120 for line in lines[: 2 + len(report.records)])


def test_merge_reports(report):
    a = ParityReport(report.records[:3], {"keras": report.discrimination["keras"]}, spec="digits")
    b = ParityReport(report.records[3:], {"torch": report.discrimination["torch"]}, run_id="r")
    m = merge_reports([a, b])
    assert len(m.records) == len(report.records) and set(m.discrimination) == {"keras", "torch"}
    assert m.spec == "digits" and m.run_id == "r"


# --------------------------------------------------------------------------- plots

def test_model_parity_plot_writes_a_png(tmp_path):
    from pipeline.plots import _atol_for, plot_model_parity
    assert _atol_for("keras/litert-int8@litert-interpreter", None) == 0.1
    assert _atol_for("keras/litert-fp16@litert-interpreter", None) == 0.02
    assert _atol_for("keras/onnx@onnxruntime-cpu", None) == 1e-5
    rng = np.random.default_rng(1)
    ref = softmax(rng.normal(0, 3, (60, 10)))
    outputs = {"keras/onnx@onnxruntime-cpu": ref + rng.normal(0, 1e-7, ref.shape),
               "keras/saved_model@tensorflow": ref.copy(),
               "keras/litert-fp16@litert-interpreter": ref + rng.normal(0, 1e-3, ref.shape),
               "keras/litert-int8@litert-interpreter": ref + rng.normal(0, 1e-2, ref.shape),
               "keras/tfjs@tfjs-node-wasm": ref[:, :3]}
    path = plot_model_parity("keras", ref, outputs, tmp_path / "plots" / "keras.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_training_curve_plot_writes_a_png(tmp_path):
    from pipeline.plots import plot_training_curve
    h = {"loss": list(np.exp(-np.arange(40) / 8)), "val_loss": list(np.exp(-np.arange(40) / 9)),
         "accuracy": list(1 - np.exp(-np.arange(40) / 10))}
    path = plot_training_curve(h, tmp_path / "curve.png", "digits/keras")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000
    path = plot_training_curve([1.0, 0.5, 0.2], tmp_path / "bare.png", "a bare loss list")
    assert path.stat().st_size > 5_000


def test_each_junit_case_matches_its_record(report, tmp_path):
    root = ET.parse(report.write_junit(tmp_path / "parity.xml")).getroot()
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert len(cases) == len(report.records)
    for r in report.records:
        case = cases[(f"{r.model}.{r.format}", f"{r.variant}@{r.runtime or 'none'}")]
        kind = next((k for k in ("failure", "error", "skipped") if case.find(k) is not None), "passed")
        expected = {"passed": "passed", "skipped": "skipped"}.get(r.status, "error" if r.error else "failure")
        assert kind == expected, r.label
        if kind in ("failure", "error"):
            assert case.find(kind).get("message") == r.message
        if kind == "skipped":
            assert case.find("skipped").get("message") == r.reason


def test_a_non_discriminative_parity_set_makes_the_verdict_inconclusive(report, tmp_path):
    ok = ParityReport(spec="s", records=[r for r in report.records if r.passed], discrimination=report.discrimination)
    assert ok.passed and ok.verdict == "inconclusive" and ok.inconclusive == ["torch"]
    assert json.loads(json.dumps(ok.to_json()))["verdict"] == "inconclusive"
    assert "verdict **INCONCLUSIVE**" in ok.to_markdown() and "INCONCLUSIVE, not discriminative" in ok.to_markdown()
    assert "INCONCLUSIVE: the parity set of torch does not discriminate" in print_table(ok)
    props = {p.get("name"): p.get("value") for s in ok.to_junit().iter("testsuite") if s.get("name") == "torch"
             for p in s.iter("property")}
    assert props["verdict"] == "inconclusive" and props["discriminative"] == "false"
    ok.discrimination = {"keras": report.discrimination["keras"]}
    assert ok.verdict == "passed"
