// Runs the bundle's stored parity inputs through the TF.js graph model on the backend named by the URL
// (?backend=cpu|wasm|webgl), compares with the stored reference outputs as parity/compare.py does
// (a value is out of tolerance when beyond atol AND beyond rtol, relative to max(|ref|, rel_floor)),
// shows the result and sets window.parityResult = {backend, tf_backend, backend_facts, rows, max_abs, passed,
// error, ...}.
// tf_backend is what the backend object that ran the model says it is (backendFacts), not the name it was
// registered under: a CPU backend under the name 'wasm' reports 'cpu'.
'use strict';
(function () {
  const BACKENDS = ['cpu', 'wasm', 'webgl'];
  const params = new URLSearchParams(window.location.search);
  const backend = params.get('backend') || 'cpu';
  // FAULT INJECTION, for tests only (edge/web.py passes $T2E_TFJS_FAULT; never set in a real run):
  // ?fault=wasm-served-by-cpu registers TF.js' CPU backend and its kernels under the name 'wasm', the
  // silent fallback that backendFacts() must expose.
  const fault = params.get('fault') || '';
  const result = { backend, tf_backend: null, backend_facts: null, fault: fault || null, rows: 0, max_abs: null,
                   max_rel: null, n_out_of_tolerance: null, passed: false, error: null, model: null, tfjs: null,
                   load_ms: null, run_ms: null };

  const show = T2E.show;

  function render(done) {
    show('r-model', result.model || '-');
    show('r-backend', backend);
    const f = result.backend_facts;
    show('r-tf-backend', !f ? (result.tf_backend || '-') :
         `${f.kind} (${f.class}, registered as ${f.registered}${f.threads ? `, ${f.threads} thread(s)` : ''})`);
    T2E.showOutcome(result, done, done ? `TF.js ${result.tfjs || '?'} on ${backend}` : `running on ${backend} ...`);
  }

  function injectFault() {
    if (fault !== 'wasm-served-by-cpu') {
      throw new Error(`unknown fault ${JSON.stringify(fault)}: expected wasm-served-by-cpu`);
    }
    for (const k of tf.getKernelsForBackend('wasm')) tf.unregisterKernel(k.kernelName, 'wasm');
    tf.copyRegisteredKernels('cpu', 'wasm');
    tf.removeBackend('wasm');
    tf.registerBackend('wasm', tf.findBackendFactory('cpu'), 2);
    console.warn(`FAULT INJECTION ${fault}: the 'wasm' backend is TF.js' CPU backend`);
  }

  // What a backend object says it is: its class checked against the classes TF.js exports (the minified
  // builds keep no class names), and the facts only that kind has (the wasm module's XNNPACK thread count,
  // the WebGL context). `b`: the backend holding `outputs` when given, else the active one.
  async function backendFacts(outputs, b) {
    const held = (outputs || []).map((t) => tf.engine().state.tensorInfo.get(t.dataId)).find((i) => i && i.backend);
    b = held ? held.backend : (b || tf.backend());
    const facts = { kind: 'unknown', registered: tf.engine().backendName, class: b.constructor.name,
                    threads: null, simd: null };
    if (tf.wasm && b instanceof tf.wasm.BackendWasm && b.wasm && b.wasm.tfjs) {
      facts.kind = 'wasm';
      facts.threads = b.wasm.tfjs.getThreadsCount();
      facts.simd = Boolean(await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT'));
    } else if (tf.MathBackendWebGL && b instanceof tf.MathBackendWebGL && b.gpgpu && b.gpgpu.gl) {
      facts.kind = 'webgl';
    } else if (b instanceof tf.MathBackendCPU) {
      facts.kind = 'cpu';
    }
    return facts;
  }

  // the page's own check; edge/web.py checks the same facts again (exporters.tfjs.backend_mismatch)
  function checkFacts(facts, did) {
    result.backend_facts = facts;
    result.tf_backend = facts.kind;
    if (facts.kind !== backend || facts.registered !== backend) {
      throw new Error(`asked for the ${backend} backend, but TF.js ${did} on ${JSON.stringify(facts.kind)} ` +
                      `(backend class ${facts.class}, registered as ${JSON.stringify(facts.registered)})`);
    }
  }

  const typed = (values, dtype) => window.T2E.typed(values, dtype);  // compare.js

  // the model's tensor whose name is `want` (graph node names may carry a ":0" suffix)
  function resolve(list, want, what) {
    const hit = list.find((t) => t.name === want || t.name.split(':')[0] === String(want).split(':')[0]);
    if (!hit) throw new Error(`the model has no ${what} ${JSON.stringify(want)}; it has ${list.map((t) => t.name).join(', ')}`);
    return hit.name;
  }

  async function run() {
    if (!BACKENDS.includes(backend)) throw new Error(`unknown backend ${JSON.stringify(backend)}: expected one of ${BACKENDS.join(', ')}`);
    if (typeof tf === 'undefined') throw new Error('tf.min.js did not load: window.tf is undefined');
    result.tfjs = tf.version && tf.version.tfjs;
    const resp = await fetch('parity.json');
    if (!resp.ok) throw new Error(`parity.json: HTTP ${resp.status}`);
    const parity = await resp.json();
    result.model = parity.model;
    render(false);
    const tol = parity.tolerance || {};
    show('r-tol', `atol ${tol.atol} / rtol ${tol.rtol} (rel floor ${tol.rel_floor}), ${parity.tolerance_for}`);

    if (backend === 'wasm') {
      if (!tf.wasm || typeof tf.wasm.setWasmPaths !== 'function') throw new Error('tf-backend-wasm.min.js did not load: tf.wasm is undefined');
      tf.wasm.setWasmPaths(new URL(parity.wasm_dir || './', window.location.href).href);
    }
    if (fault) injectFault();
    const ok = await tf.setBackend(backend);
    await tf.ready();
    if (!ok) throw new Error(`TF.js could not set up the ${backend} backend`);
    checkFacts(await backendFacts([]), 'set up the backend');

    if (backend === 'webgl') {  // which GL implementation ran it (headless Chromium: SwiftShader, in software)
      try {
        const gl = tf.backend().gpgpu.gl;
        const dbg = gl.getExtension('WEBGL_debug_renderer_info');
        result.gl_renderer = String(gl.getParameter(dbg ? dbg.UNMASKED_RENDERER_WEBGL : gl.RENDERER));
      } catch (_) { result.gl_renderer = null; }
    }
    let t0 = performance.now();
    const model = await tf.loadGraphModel(parity.model_url);
    result.load_ms = performance.now() - t0;

    const inputs = parity.inputs;
    const graphInputs = model.inputs.map((t) => ({ name: t.name }));
    if (inputs.length !== graphInputs.length) {
      throw new Error(`the model takes ${graphInputs.length} input(s) (${graphInputs.map((t) => t.name).join(', ')}), parity.json has ${inputs.length}`);
    }
    const feedNames = inputs.map((inp, i) => (inputs.length === 1 ? graphInputs[0].name : resolve(graphInputs, inp.graph_name, 'input')));
    const data = inputs.map((inp) => typed(inp.values, inp.dtype));
    const perRowIn = inputs.map((inp) => inp.shape.slice(1).reduce((a, b) => a * b, 1));
    const graphOutputs = model.outputs.map((t) => ({ name: t.name }));
    const outNames = parity.outputs.length > 1
      ? parity.outputs.map((o) => resolve(graphOutputs, o.graph_name, 'output'))
      : [graphOutputs[0].name];  // one output: the graph's first, as the Node runner returns it
    const perm = inputs.length === 1 ? parity.input_transpose : null;

    const rows = parity.rows;
    const got = [];          // per row, the flattened outputs concatenated in the model's order
    for (let r = 0; r < rows; r++) got.push([]);
    t0 = performance.now();
    for (const [a, b] of parity.feeds) {
      const created = [];
      let outs = [];
      try {
        const feed = {};
        inputs.forEach((inp, i) => {
          const part = data[i].subarray(a * perRowIn[i], b * perRowIn[i]);
          let t = tf.tensor(part, [b - a, ...inp.shape.slice(1)], inp.dtype);
          created.push(t);
          if (perm) { t = tf.transpose(t, perm); created.push(t); }
          feed[feedNames[i]] = t;
        });
        let y;
        try {
          y = model.execute(feed, outNames);
        } catch (e) {
          if (!/executeAsync/.test(String(e && e.message))) throw e;
          y = await model.executeAsync(feed, outNames);
        }
        outs = Array.isArray(y) ? y : [y];
        for (const t of outs) {
          const vals = await t.data();
          const per = vals.length / (b - a);
          for (let r = 0; r < b - a; r++) {
            const row = got[a + r];
            for (let k = 0; k < per; k++) row.push(vals[r * per + k]);
          }
        }
        // read after the model ran, from the backend holding its outputs
        checkFacts(await backendFacts(outs), 'ran the model');
      } finally {
        for (const t of created) t.dispose();
        for (const t of outs) if (t && typeof t.dispose === 'function') t.dispose();
      }
    }
    result.run_ms = performance.now() - t0;

    const ref = parity.reference.values;
    const flat = [].concat(...got);
    if (flat.length !== ref.length) {
      throw new Error(`the model gave ${flat.length} output values for ${rows} rows, the reference has ${ref.length}`);
    }
    result.rows = rows;
    result.outputs = flat;  // the values themselves, so the caller can judge them with its own comparison
    const c = window.T2E.compare(flat, ref, tol);  // compare.js: the check every page of the bundle uses
    Object.assign(result, c);
    const nBad = c.n_nonfinite;
    if (nBad) result.error = `${nBad} non-finite value(s) in the outputs or the reference`;
    model.dispose();
  }

  run().catch((e) => {
    result.passed = false;
    result.error = String((e && e.message) || e);
  }).then(async () => {
    // the facts of the active backend, without starting one (tf.backend() would initialise the best available)
    try {
      const b = typeof tf !== 'undefined' && tf.engine().backendInstance;
      if (b && !result.backend_facts) {
        result.backend_facts = await backendFacts([], b);
        result.tf_backend = result.backend_facts.kind;
      }
    } catch (_) { /* none */ }
  }).finally(() => {
    render(true);
    window.parityResult = result;
  });
})();
