// What every page of the web bundle shares: parity/compare.py's element check and the typed arrays a
// runtime is fed. Loaded as a classic script; sets window.T2E.
//   T2E.compare(flat, refValues, tol) -> {max_abs, max_rel, n_out_of_tolerance, n_nonfinite, passed}
//     a value is out of tolerance when its absolute error exceeds atol AND its relative error
//     |got - ref| / max(|ref|, rel_floor) exceeds rtol; a non-finite value fails (null in JSON = NaN).
//   T2E.typed(values, dtype) -> Float32Array | Int32Array | BigInt64Array | Uint8Array ...
//   T2E.show(id, text); T2E.showOutcome(result, done, sub): the result rows every page's table has (rows,
//     errors, timings, verdict, error line, subtitle)
'use strict';
(function () {
  const ARRAYS = { float32: Float32Array, float64: Float64Array, int32: Int32Array, int16: Int16Array,
                   int8: Int8Array, uint8: Uint8Array, bool: Uint8Array };

  function typed(values, dtype) {
    const clean = values.map((v) => (v === null ? NaN : v));
    if (dtype === 'int64') return BigInt64Array.from(clean, (v) => BigInt(Math.round(v)));
    const A = ARRAYS[dtype];
    if (!A) throw new Error(`unsupported input dtype ${dtype}`);
    return A.from(clean);
  }

  function compare(flat, refValues, tol) {
    tol = tol || {};
    const ref = refValues.map((v) => (v === null ? NaN : v));
    let maxAbs = 0, maxRel = 0, nOut = 0, nBad = 0;
    const floor = tol.rel_floor ? tol.rel_floor : Number.MIN_VALUE;
    for (let i = 0; i < ref.length; i++) {
      const g = flat[i], e = ref[i];
      if (!Number.isFinite(g) || !Number.isFinite(e)) { nBad++; continue; }
      const d = Math.abs(g - e);
      const rel = d / Math.max(Math.abs(e), floor);
      if (d > maxAbs) maxAbs = d;
      if (rel > maxRel) maxRel = rel;
      let beyond = null;
      if (tol.atol !== null && tol.atol !== undefined) beyond = d > tol.atol;
      if (tol.rtol !== null && tol.rtol !== undefined) beyond = (beyond === null ? true : beyond) && rel > tol.rtol;
      if (beyond) nOut++;
    }
    return { max_abs: maxAbs, max_rel: maxRel, n_out_of_tolerance: nOut, n_nonfinite: nBad,
             passed: nOut === 0 && nBad === 0 };
  }

  function show(id, text) { const el = document.getElementById(id); if (el) el.textContent = text; }
  function fmt(v) { return v === null || v === undefined ? '-' : (typeof v === 'number' ? v.toExponential(3) : String(v)); }

  function showOutcome(result, done, sub) {
    show('r-rows', String(result.rows));
    show('r-max-abs', fmt(result.max_abs));
    show('r-max-rel', fmt(result.max_rel));
    show('r-n-out', result.n_out_of_tolerance === null ? '-' : String(result.n_out_of_tolerance));
    show('r-ms', result.load_ms === null ? '-' :
         `${result.load_ms.toFixed(1)} ms / ${result.run_ms === null ? '-' : result.run_ms.toFixed(1) + ' ms'}`);
    const v = document.getElementById('r-verdict');
    const verdict = !done ? 'RUNNING' : (result.passed ? 'PASS' : 'FAIL');
    v.textContent = verdict;
    v.className = verdict;
    show('error', result.error ? 'error: ' + result.error : '');
    show('sub', sub);
  }

  window.T2E = { typed, compare, show, showOutcome };
})();
