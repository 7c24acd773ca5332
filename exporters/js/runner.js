#!/usr/bin/env node
// Warm TF.js runner: loads TF.js graph models from disk and runs them on the pure-JS `cpu` backend or the
// `wasm` backend, for exporters/tfjs.py. One process serves many models and both backends.
//
// Protocol: newline-delimited JSON. Requests on stdin, one response line per request on stdout, in order.
//   {"id": 1, "cmd": "hello"}
//       -> {"id": 1, "ok": true, "pid": ..., "tfjs": "4.22.0", "node": "v20...", "backends": ["cpu", "wasm"]}
//   {"id": 2, "cmd": "load", "path": "/abs/model_dir", "backend": "cpu" | "wasm"}
//       -> {"id": 2, "ok": true, "handle": "m1", "backend": "cpu", "backend_facts": {...},
//           "inputs": [{name, shape, dtype}], "outputs": [{name, shape, dtype}], "signature": {...} | null, "load_ms": 12.3}
//   {"id": 3, "cmd": "predict", "handle": "m1",
//    "inputs": [{"name": "x" (optional), "shape": [16, 8, 8], "dtype": "float32", "b64": "<little-endian bytes>"}]}
//       -> {"id": 3, "ok": true, "outputs": [{"name", "shape", "dtype", "b64"}], "backend": "cpu",
//           "backend_facts": {...}, "run_ms": 0.4}
//   "backend" is what the backend object that ran the model says it is (backendFacts below), not the name asked
//   for nor the name it was registered under: {"kind": "cpu" | "wasm" | "unknown", "registered", "class",
//   "threads" and "simd" (wasm only: XNNPACK's thread count from the wasm module, the SIMD binary)}.
//   A predict may name graph nodes to return instead of the model's outputs ("fetch": ["node", ...]): the
//   intermediate tensors a failed cell is localised with; nodes of other dtypes than float32 are left out.
//   {"id": 6, "cmd": "nodes", "handle": "m1"}
//       -> {"id": 6, "ok": true, "nodes": [{"name", "op"}]}   (the graph's op nodes in its order, no constants)
//   {"id": 4, "cmd": "close", "handle": "m1"}  -> {"id": 4, "ok": true}      (disposes the model's weights)
//   {"id": 5, "cmd": "shutdown"}               -> {"id": 5, "ok": true} and the process exits
//   Any failure: {"id": n, "ok": false, "error": "<message>", "kind": "load" | "predict" | "protocol"}
// The process exits when stdin closes, so a parent that dies never leaves it behind.
'use strict';

// stdout carries the protocol only: everything TF.js or anyone else logs goes to stderr.
const writeOut = process.stdout.write.bind(process.stdout);
for (const k of ['log', 'info', 'warn', 'debug', 'trace']) console[k] = (...a) => console.error(...a);

const fs = require('fs');
const path = require('path');
const readline = require('readline');

let tf;
let wasmBackend;
try {
  tf = require('@tensorflow/tfjs');
  wasmBackend = require('@tensorflow/tfjs-backend-wasm');
} catch (e) {
  writeOut(JSON.stringify({ id: 0, ok: false, kind: 'startup',
    error: `cannot load @tensorflow/tfjs / @tensorflow/tfjs-backend-wasm from ${__dirname}/node_modules ` +
           `(${String(e.message).split('\n')[0]}); run: npm ci --prefix ${__dirname}` }) + '\n');
  process.exit(3);
}
// The wasm backend fetches its .wasm binaries from this folder; in Node, Emscripten reads file paths with fs.
const WASM_DIR = path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm'));
wasmBackend.setWasmPaths(WASM_DIR + path.sep);

// FAULT INJECTION, for tests only (never set in a real run): T2E_TFJS_FAULT=wasm-served-by-cpu registers TF.js'
// CPU backend and its kernels under the name 'wasm', so tf.getBackend() says 'wasm' while the CPU computes:
// the silent fallback that backendFacts() must expose. Announced on stderr so it cannot go unnoticed.
const FAULT = process.env.T2E_TFJS_FAULT || '';
if (FAULT) {
  if (FAULT !== 'wasm-served-by-cpu') {
    writeOut(JSON.stringify({ id: 0, ok: false, kind: 'startup',
      error: `unknown T2E_TFJS_FAULT ${JSON.stringify(FAULT)}: expected wasm-served-by-cpu or nothing` }) + '\n');
    process.exit(3);
  }
  for (const k of tf.getKernelsForBackend('wasm')) tf.unregisterKernel(k.kernelName, 'wasm');
  tf.copyRegisteredKernels('cpu', 'wasm');
  tf.removeBackend('wasm');
  tf.registerBackend('wasm', tf.findBackendFactory('cpu'), 2);
  console.error(`TF.js runner: FAULT INJECTION ${FAULT}: the 'wasm' backend is TF.js' CPU backend`);
}

const DTYPE_BYTES = { float32: 4, int32: 4, bool: 1, uint8: 1, uint16: 2, float16: 2 };

// Size in bytes a weight occupies in the shard files (quantized weights are stored in their quantized dtype).
function weightBytes(spec) {
  const n = spec.shape.reduce((a, b) => a * b, 1);
  const dtype = spec.quantization ? spec.quantization.dtype : spec.dtype;
  const per = DTYPE_BYTES[dtype];
  if (per === undefined) throw new Error(`weight ${spec.name} has unsupported dtype ${dtype}`);
  return n * per;
}

// tf.loadGraphModel has no file:// handler without tfjs-node, so read model.json + weight shards ourselves,
// checking what we read against the manifest so a truncated or padded shard is refused with a clear message.
function fileHandler(modelDir) {
  const modelJsonPath = path.join(modelDir, 'model.json');
  return {
    load: async () => {
      if (!fs.existsSync(modelDir)) throw new Error(`model folder ${modelDir} does not exist`);
      if (!fs.existsSync(modelJsonPath)) throw new Error(`${modelJsonPath} does not exist`);
      const text = fs.readFileSync(modelJsonPath, 'utf8');
      let modelJSON;
      try {
        modelJSON = JSON.parse(text);
      } catch (e) {
        throw new Error(`${modelJsonPath} is not valid JSON (${text.length} chars): ${e.message}`);
      }
      if (modelJSON === null || typeof modelJSON !== 'object' || !modelJSON.modelTopology) {
        throw new Error(`${modelJsonPath} has no modelTopology: not a TF.js model.json`);
      }
      if (modelJSON.format && modelJSON.format !== 'graph-model') {
        throw new Error(`${modelJsonPath} is a ${modelJSON.format}, expected a graph-model`);
      }
      if (!Array.isArray(modelJSON.weightsManifest)) {
        throw new Error(`${modelJsonPath} has no weightsManifest list`);
      }
      return tf.io.getModelArtifactsForJSON(modelJSON, async (manifest) => {
        const specs = [];
        const bufs = [];
        for (const group of manifest) {
          let expected = 0;
          for (const w of group.weights) expected += weightBytes(w);
          let got = 0;
          for (const p of group.paths) {
            const f = path.join(modelDir, p);
            if (!fs.existsSync(f)) throw new Error(`weight shard ${f} named in model.json does not exist`);
            const b = fs.readFileSync(f);
            got += b.length;
            bufs.push(b);
          }
          if (got !== expected) {
            throw new Error(`weight shards ${group.paths.join(', ')} in ${modelDir} hold ${got} bytes, ` +
                            `model.json's manifest expects ${expected} bytes (truncated or corrupt shard)`);
          }
          specs.push(...group.weights);
        }
        const b = Buffer.concat(bufs);
        return [specs, b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)];
      });
    },
  };
}

const models = new Map();   // handle -> {model, backend, path, inputs, outputs}
let nextHandle = 1;

async function useBackend(name) {
  if (name !== 'cpu' && name !== 'wasm') throw new Error(`unknown backend ${JSON.stringify(name)}: expected cpu or wasm`);
  if (tf.getBackend() !== name) {
    const ok = await tf.setBackend(name);
    if (!ok) throw new Error(`TF.js backend ${name} failed to initialise (wasm binaries in ${WASM_DIR})`);
  }
  await tf.ready();
}

// What the backend that holds `outputs` (or, with none, the active one) says it is. Its class is checked
// against the classes TF.js exports (minified builds keep no class names); for wasm, the Emscripten module's
// own facts are read as well. tf.getBackend() is only the name a backend was registered under.
async function backendFacts(outputs) {
  const held = (outputs || []).map((t) => tf.engine().state.tensorInfo.get(t.dataId)).find((i) => i && i.backend);
  const b = held ? held.backend : tf.backend();
  const facts = { kind: 'unknown', registered: tf.engine().backendName, class: b.constructor.name,
                  threads: null, simd: null };
  if (b instanceof wasmBackend.BackendWasm && b.wasm && b.wasm.tfjs) {
    facts.kind = 'wasm';
    facts.threads = b.wasm.tfjs.getThreadsCount();
    facts.simd = Boolean(await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT'));
  } else if (b instanceof tf.MathBackendCPU) {
    facts.kind = 'cpu';
  }
  return facts;
}

function tensorInfo(list) {
  return (list || []).map((t) => ({ name: t.name, shape: t.shape || null, dtype: t.dtype || null }));
}

async function load(req) {
  if (typeof req.path !== 'string') throw new Error('load needs a "path" (the folder holding model.json)');
  const backend = req.backend || 'cpu';
  await useBackend(backend);
  const t0 = process.hrtime.bigint();
  // Weights are created on the active backend and stay there: one model instance per (path, backend).
  const model = await tf.loadGraphModel(fileHandler(path.resolve(req.path)));
  const loadMs = Number(process.hrtime.bigint() - t0) / 1e6;
  const handle = `m${nextHandle++}`;
  const entry = { model, backend, path: req.path, inputs: tensorInfo(model.inputs), outputs: tensorInfo(model.outputs) };
  models.set(handle, entry);
  // the backend TF.js really has active, by its own facts, not the one asked for: the caller checks they agree
  const facts = await backendFacts([]);
  return { handle, backend: facts.kind, backend_facts: facts, inputs: entry.inputs, outputs: entry.outputs,
           signature: model.signature || null, load_ms: loadMs };
}

function decodeInput(spec, i) {
  const dtype = spec.dtype || 'float32';
  if (dtype !== 'float32' && dtype !== 'int32') throw new Error(`input ${i}: unsupported dtype ${dtype}`);
  if (!Array.isArray(spec.shape)) throw new Error(`input ${i}: "shape" must be a list`);
  const buf = Buffer.from(spec.b64 || '', 'base64');
  const n = spec.shape.reduce((a, b) => a * b, 1);
  if (buf.length !== n * 4) {
    throw new Error(`input ${i}: ${buf.length} bytes do not fill shape [${spec.shape}] of ${dtype} (${n * 4} bytes)`);
  }
  // copy into a fresh, aligned ArrayBuffer (a Buffer from base64 may sit at an odd offset of a shared pool)
  const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const data = dtype === 'float32' ? new Float32Array(ab) : new Int32Array(ab);
  return tf.tensor(data, spec.shape, dtype);
}

async function predict(req) {
  const entry = models.get(req.handle);
  if (!entry) throw new Error(`no model loaded under handle ${JSON.stringify(req.handle)}`);
  await useBackend(entry.backend);
  const specs = req.inputs || [];
  if (specs.length !== entry.inputs.length) {
    throw new Error(`model ${entry.path} takes ${entry.inputs.length} input(s) ` +
                    `(${entry.inputs.map((t) => t.name).join(', ')}), got ${specs.length}`);
  }
  const feed = {};
  const created = [];
  let outs = [];
  try {
    specs.forEach((s, i) => {
      const t = decodeInput(s, i);
      created.push(t);
      feed[s.name || entry.inputs[i].name] = t;
    });
    const fetching = Array.isArray(req.fetch);
    const outNames = fetching ? req.fetch : entry.outputs.map((o) => o.name);
    const t0 = process.hrtime.bigint();
    let y;
    try {
      y = entry.model.execute(feed, outNames);
    } catch (e) {
      // graphs with control flow or dynamic shapes must run asynchronously
      if (!/executeAsync/.test(String(e && e.message))) throw e;
      y = await entry.model.executeAsync(feed, outNames);
    }
    outs = Array.isArray(y) ? y : [y];
    const result = [];
    for (let i = 0; i < outs.length; i++) {
      const t = outs[i];
      const data = await t.data();
      if (fetching && t.dtype !== 'float32') continue;
      if (!(data instanceof Float32Array || data instanceof Int32Array)) {
        throw new Error(`output ${outNames[i]} has dtype ${t.dtype}, which this runner does not return`);
      }
      result.push({ name: outNames[i], shape: t.shape, dtype: t.dtype,
                    b64: Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('base64') });
    }
    const runMs = Number(process.hrtime.bigint() - t0) / 1e6;
    // read after the model ran, from the backend holding its outputs: the caller checks it is the one asked for
    const facts = await backendFacts(outs);
    return { outputs: result, backend: facts.kind, backend_facts: facts, run_ms: runMs };
  } finally {
    for (const t of created) t.dispose();
    for (const t of outs) if (t && typeof t.dispose === 'function') t.dispose();
  }
}

function nodes(req) {
  const entry = models.get(req.handle);
  if (!entry) throw new Error(`no model loaded under handle ${JSON.stringify(req.handle)}`);
  const graph = entry.model.executor && entry.model.executor.graph;
  if (!graph || !graph.nodes) throw new Error('this TF.js version does not expose the graph of a loaded model');
  return { nodes: Object.values(graph.nodes).filter((n) => n.op !== 'Const' && n.op !== 'Placeholder')
                                            .map((n) => ({ name: n.name, op: n.op })) };
}

function close(req) {
  const entry = models.get(req.handle);
  if (entry) {
    entry.model.dispose();
    models.delete(req.handle);
  }
  return { closed: Boolean(entry), loaded: models.size };
}

async function handle(line) {
  let req;
  try {
    req = JSON.parse(line);
  } catch (e) {
    return { id: null, ok: false, kind: 'protocol', error: `request is not JSON: ${e.message}` };
  }
  const id = req.id === undefined ? null : req.id;
  try {
    let body;
    switch (req.cmd) {
      case 'hello':
        body = { pid: process.pid, tfjs: tf.version.tfjs, node: process.version, backends: ['cpu', 'wasm'],
                 wasm_dir: WASM_DIR, loaded: models.size };
        break;
      case 'load': body = await load(req); break;
      case 'predict': body = await predict(req); break;
      case 'close': body = close(req); break;
      case 'nodes': body = nodes(req); break;
      case 'shutdown': body = {}; break;
      default: throw Object.assign(new Error(`unknown cmd ${JSON.stringify(req.cmd)}`), { kind: 'protocol' });
    }
    return Object.assign({ id, ok: true }, body);
  } catch (e) {
    const kind = e.kind || (req.cmd === 'load' ? 'load' : req.cmd === 'predict' ? 'predict' : 'protocol');
    return { id, ok: false, kind, error: String((e && e.message) || e) };
  }
}

// Requests are handled one at a time, in order: the active backend is global state in TF.js.
let chain = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  if (!line.trim()) return;
  chain = chain.then(async () => {
    const res = await handle(line);
    writeOut(JSON.stringify(res) + '\n');
    if (res.ok && /"cmd"\s*:\s*"shutdown"/.test(line)) process.exit(0);
  });
});
rl.on('close', () => { chain.then(() => process.exit(0)); });
