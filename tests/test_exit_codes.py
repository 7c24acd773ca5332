"""The gate's exit codes: 0 passed, 1 a failed or inconclusive verdict, 2 a user's input problem."""
from pipeline.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, exit_code


def test_exit_codes_follow_the_record():
    assert exit_code({"status": "passed"}) == EXIT_OK == 0
    assert exit_code({"status": "failed", "error": "parity failed"}) == EXIT_FAILED == 1
    assert exit_code({"status": "failed", "error": "parity inconclusive", "error_kind": None}) == 1
    assert exit_code({"status": "failed", "error_kind": "usage"}) == EXIT_USAGE == 2
    assert exit_code({"status": "failed", "error_kind": "failed"}) == 1


def test_verdict_errors():
    from pipeline.api import verdict_error
    assert verdict_error({"passed": True, "verdict": "passed"}) is None
    assert verdict_error({"passed": False, "failures": ["FAIL m/onnx: x"]}).startswith("parity failed: 1 ")
    worse = ["FAIL m/onnx on onnxruntime-cpu against production: mse 9.3 against 0.013 in production"]
    assert verdict_error({"passed": False, "failures": worse}).startswith("the comparison with the baseline failed: 1 ")
    assert verdict_error({"passed": False, "failures": worse + ["FAIL m/onnx: x"]}).startswith("parity failed: 2 ")
    assert "no artifact was checked" in verdict_error({"passed": False, "failures": []})
    assert verdict_error({"passed": True, "verdict": "inconclusive", "inconclusive": ["m"]}).startswith(
        "parity inconclusive")
