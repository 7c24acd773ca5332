// Runs the bundle's stored parity inputs through the model's ONNX artifact in onnxruntime-web, or its LiteRT
// artifact in LiteRT.js, on the backend named by the URL (?format=onnx_web|litert_web&backend=wasm|webgpu),
// judges the outputs with compare.js (the check the TF.js page uses, under the tolerance parity.json holds
// for that format), shows the result and sets window.parityResult = {format, backend, runtime, runtime_facts,
// rows, max_abs, passed, error, outputs, ...}.
// Feeding follows the artifact's recorded details (edge/web.py writes them into parity.json): inputs by the
// artifact's own names, outputs in the model's order, rows in the feeds parity.json lists ([start, rows,
// size, signature]): a chunk smaller than its size is filled up by repeating its last row (as
// parity.signature.pad_rows does) and the output trimmed. Nothing is fetched from outside the bundle.
const FORMATS = { onnx_web: ['wasm', 'webgpu'], litert_web: ['wasm', 'webgpu'] };
const TITLES = { onnx_web: 'ONNX Runtime Web', litert_web: 'LiteRT.js' };
const params = new URLSearchParams(window.location.search);
const format = params.get('format') || '';
const backend = params.get('backend') || 'wasm';
let DOC = null;  // this format's section of parity.json, once read
const result = { format, backend, runtime: null, runtime_facts: null, rows: 0, max_abs: null, max_rel: null,
                 n_out_of_tolerance: null, passed: false, error: null, model: null, version: null,
                 load_ms: null, run_ms: null };

const show = T2E.show;

function render(done, doc) {
  show('title', `${TITLES[format] || format} parity check`);
  show('r-model', result.model || '-');
  show('r-artifact', doc ? `${doc.label} (${doc.model_url}, ${doc.size_bytes} bytes)` : '-');
  show('r-runtime', result.runtime || '-');
  const f = result.runtime_facts;
  show('r-ran-on', f ? Object.entries(f).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`).join(', ') : '-');
  show('r-feeds', doc ? doc.feeds.map(([a, n, s, sig]) => `${n}${s !== n ? `+${s - n} pad` : ''}${sig ? ` @${sig}` : ''}`).join(', ') : '-');
  T2E.showOutcome(result, done, done ? `${TITLES[format] || format} ${result.version || '?'} on ${backend}`
                                     : `running on ${backend} ...`);
}

// the model file's bytes, refused when they are not the bytes the bundle recorded (a truncated copy)
async function modelBytes(doc) {
  const resp = await fetch(doc.model_url);
  if (!resp.ok) throw new Error(`${doc.model_url}: HTTP ${resp.status}`);
  const bytes = new Uint8Array(await resp.arrayBuffer());
  if (doc.size_bytes && bytes.byteLength !== doc.size_bytes) {
    throw new Error(`the ${doc.artifact_format} model file ${doc.model_url} has ${bytes.byteLength} bytes, ` +
                    `the bundle recorded ${doc.size_bytes} (truncated or replaced); not loading it`);
  }
  return bytes;
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement('script');
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error(`${src} did not load`));
    document.head.appendChild(s);
  });
}

function firstLine(e) { return String((e && e.message) || e).trim().split('\n')[0]; }

// rows [start, start + rows) of every input, filled up to `size` rows by repeating the last row
function chunk(data, perRow, start, rows, size) {
  const part = data.subarray(start * perRow, (start + rows) * perRow);
  if (size === rows) return part;
  const out = new data.constructor(size * perRow);
  out.set(part);
  const last = data.subarray((start + rows - 1) * perRow, (start + rows) * perRow);
  for (let r = rows; r < size; r++) out.set(last, r * perRow);
  return out;
}

function toNumbers(arr) { return Array.from(arr, (v) => Number(v)); }

// --- onnxruntime-web: an InferenceSession on the wasm (or webgpu) execution provider, one thread
async function onnxRunner(doc, bytes) {
  await loadScript(backend === 'webgpu' ? 'ort/ort.webgpu.min.js' : 'ort/ort.wasm.min.js');
  if (typeof ort === 'undefined') throw new Error('the onnxruntime-web script did not define window.ort');
  result.version = ort.env.versions && (ort.env.versions.web || ort.env.versions.common);
  ort.env.wasm.wasmPaths = new URL(doc.wasm_dir, window.location.href).href;
  ort.env.wasm.numThreads = 1;   // the Python runner's one thread (and no SharedArrayBuffer without COOP/COEP)
  ort.env.wasm.proxy = false;
  ort.env.logLevel = 'error';
  if (backend === 'webgpu') {
    if (!navigator.gpu) throw new Error('this browser has no WebGPU (navigator.gpu is undefined)');
    const a = await navigator.gpu.requestAdapter();
    if (!a) throw new Error('this browser has WebGPU but no adapter (navigator.gpu.requestAdapter() gave null)');
    ort.env.webgpu.adapter = a;
  }
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, { executionProviders: [backend], graphOptimizationLevel: 'all' });
  } catch (e) {
    throw new Error(`onnxruntime-web could not load ${doc.model_url} (${bytes.byteLength} bytes) on ${backend}: ${firstLine(e)}`);
  }
  result.runtime = `onnxruntime-web-${backend}`;
  let adapter = null;
  if (backend === 'webgpu') {  // the adapter and device the session got (headless Chromium: SwiftShader's Vulkan)
    const a = ort.env.webgpu.adapter;
    const dev = await ort.env.webgpu.device;
    if (!dev) throw new Error('onnxruntime-web created no WebGPU device for the webgpu execution provider');
    const info = (a && a.info) || {};
    adapter = { vendor: info.vendor, architecture: info.architecture, device: true };
  }
  const meta = {};
  for (const m of session.inputMetadata || []) meta[m.name] = m;
  result.runtime_facts = { execution_provider: backend, threads: ort.env.wasm.numThreads, adapter,
                           inputs: session.inputNames, outputs: session.outputNames,
                           input_types: Object.fromEntries(Object.entries(meta).map(([k, m]) => [k, m.type])) };
  for (const inp of doc.inputs) {
    if (!session.inputNames.includes(inp.target)) {
      throw new Error(`the ONNX model has no input ${JSON.stringify(inp.target)}; it has ${session.inputNames.join(', ')}`);
    }
  }
  for (const o of doc.outputs) {
    if (!session.outputNames.includes(o)) {
      throw new Error(`the ONNX model has no output ${JSON.stringify(o)}; it has ${session.outputNames.join(', ')}`);
    }
  }
  return {
    dtype: (inp) => (meta[inp.target] && meta[inp.target].type) || inp.dtype,
    async run(feedArrays, shapes) {
      const feed = {};
      doc.inputs.forEach((inp, i) => { feed[inp.target] = new ort.Tensor(this.dtype(inp), feedArrays[i], shapes[i]); });
      const out = await session.run(feed, doc.outputs);
      return doc.outputs.map((o) => out[o].data);
    },
    async close() { await session.release(); },
  };
}

// --- LiteRT.js: the compiled model's signatures on its wasm (XNNPACK) or webgpu accelerator
async function litertRunner(doc, bytes) {
  const litert = await import('./litert/core.js');
  const wasmDir = new URL(doc.wasm_dir, window.location.href).href;
  await litert.loadLiteRt(wasmDir);   // no threads, no JSPI: the plain (relaxed-SIMD, else compat) build
  const relaxed = await litert.supportsFeature('relaxedSimd');
  result.version = doc.package_version;
  const opts = { accelerator: backend };
  if (backend === 'webgpu') {
    if (!(await litert.isWebGPUSupported())) throw new Error('LiteRT.js: this browser has no WebGPU');
  }
  let model;
  try {
    model = await litert.loadAndCompile(bytes, opts);
  } catch (e) {
    throw new Error(`LiteRT.js could not load ${doc.model_url} (${bytes.byteLength} bytes) on ${backend}: ${firstLine(e)}`);
  }
  const sigs = model.signatures;
  const accel = model.options && model.options.accelerator;
  result.runtime = `litertjs-${backend}`;
  result.runtime_facts = { accelerator: accel, fully_accelerated: model.isFullyAccelerated,
                           wasm_build: relaxed ? 'litert_wasm_internal (relaxed SIMD)' : 'litert_wasm_compat_internal',
                           signatures: Object.keys(sigs) };
  if (accel !== backend || (backend !== 'wasm' && !model.isFullyAccelerated)) {
    throw new Error(`asked LiteRT.js for ${backend}, but the model was compiled for ${accel}` +
                    `${model.isFullyAccelerated ? '' : ' (not fully accelerated: some ops fell back to wasm)'}`);
  }
  const created = [];
  return {
    dtype: (inp) => inp.dtype,
    async run(feedArrays, shapes, signature) {
      const runner = signature ? sigs[signature] : model;
      if (!runner) throw new Error(`the LiteRT model has no signature ${JSON.stringify(signature)}; it has ${Object.keys(sigs).join(', ')}`);
      const names = runner.getInputDetails().map((d) => d.name);
      const feed = {};
      doc.inputs.forEach((inp, i) => {
        if (!names.includes(inp.target)) {
          throw new Error(`signature ${JSON.stringify(signature)} has no input ${JSON.stringify(inp.target)}; it has ${names.join(', ')}`);
        }
        feed[inp.target] = new litert.Tensor(feedArrays[i], shapes[i]);
      });
      let out;
      try {
        out = await runner.run(feed);
      } finally {
        for (const t of Object.values(feed)) t.delete();
      }
      try {
        return await Promise.all(doc.outputs.map((o) => {
          if (!(o in out)) throw new Error(`signature ${JSON.stringify(signature)} has no output ${JSON.stringify(o)}; it has ${Object.keys(out).join(', ')}`);
          return out[o];
        }).map(async (t) => {
          if (backend === 'wasm') return t.toTypedArray().slice();
          const host = await t.copyTo('wasm');   // a webgpu output: read back through host memory
          try { return host.toTypedArray().slice(); } finally { host.delete(); }
        }));
      } finally {
        for (const t of Object.values(out)) t.delete();
      }
    },
    async close() { model.delete(); },
  };
}

async function run() {
  if (!(format in FORMATS)) throw new Error(`unknown format ${JSON.stringify(format)}: expected one of ${Object.keys(FORMATS).join(', ')}`);
  if (!FORMATS[format].includes(backend)) throw new Error(`unknown backend ${JSON.stringify(backend)} for ${format}: expected one of ${FORMATS[format].join(', ')}`);
  if (!window.T2E) throw new Error('compare.js did not load');
  const resp = await fetch('parity.json');
  if (!resp.ok) throw new Error(`parity.json: HTTP ${resp.status}`);
  const parity = await resp.json();
  result.model = parity.model;
  const doc = (parity.runtimes || {})[format];
  if (!doc) throw new Error(`the web bundle of ${parity.model} holds no ${format} artifact`);
  DOC = doc;
  render(false, doc);
  const tol = doc.tolerance || {};
  show('r-tol', `atol ${tol.atol} / rtol ${tol.rtol} (rel floor ${tol.rel_floor}), ${doc.tolerance_for}`);

  let t0 = performance.now();
  const bytes = await modelBytes(doc);
  const runner = format === 'onnx_web' ? await onnxRunner(doc, bytes) : await litertRunner(doc, bytes);
  result.load_ms = performance.now() - t0;

  const byName = Object.fromEntries(parity.inputs.map((inp) => [inp.name, inp]));
  const inputs = doc.inputs.map((inp) => {
    const src = byName[inp.name];
    if (!src) throw new Error(`parity.json has no input ${JSON.stringify(inp.name)}`);
    return { values: window.T2E.typed(src.values, runner.dtype(inp)), perRow: src.shape.slice(1).reduce((a, b) => a * b, 1),
             rowShape: src.shape.slice(1) };
  });
  const rows = parity.rows;
  const got = [];
  for (let r = 0; r < rows; r++) got.push([]);
  t0 = performance.now();
  try {
    for (const [start, n, size, signature] of doc.feeds) {
      const arrays = inputs.map((inp) => chunk(inp.values, inp.perRow, start, n, size));
      const shapes = inputs.map((inp) => [size, ...inp.rowShape]);
      const outs = await runner.run(arrays, shapes, signature);
      for (const vals of outs) {
        const per = vals.length / size;
        if (!Number.isInteger(per)) throw new Error(`an output of ${vals.length} values for a batch of ${size} rows`);
        for (let r = 0; r < n; r++) {
          const row = got[start + r];
          for (let k = 0; k < per; k++) row.push(Number(vals[r * per + k]));
        }
      }
    }
  } catch (e) {
    if (doc.unsupported) throw new Error(`UNSUPPORTED: ${doc.unsupported}; it says: ${firstLine(e)}`);
    throw e;
  } finally {
    await runner.close();
  }
  result.run_ms = performance.now() - t0;

  const flat = [].concat(...got);
  const ref = parity.reference.values;
  if (flat.length !== ref.length) {
    throw new Error(`the model gave ${flat.length} output values for ${rows} rows, the reference has ${ref.length}`);
  }
  result.rows = rows;
  result.outputs = flat;
  Object.assign(result, window.T2E.compare(flat, ref, tol));
  if (result.n_nonfinite) result.error = `${result.n_nonfinite} non-finite value(s) in the outputs or the reference`;
}

run().catch((e) => {
  result.passed = false;
  result.error = String((e && e.message) || e);
}).finally(() => {
  render(true, DOC);
  window.parityResult = result;
});
