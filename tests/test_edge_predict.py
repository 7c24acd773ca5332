"""The agent's predict path (edge/agent.py, edge/serving_path.py) in this process, over real HTTP on
127.0.0.1: small predicts answered on the event loop, big ones on the predict thread, never two calls in one
interpreter at once, the numbers those of the bare LiteRT runner on the same rows, and malformed requests
answered with the errors the agent gave before the fast path (its old steps, run here)."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edge import agent as agent_mod
from edge.agent import Agent, InputMismatch, _rows_of, make_app, parse_inputs, to_feed
from edge.keys import init_keys
from edge.package import build_package
from edge.serving_path import VariantServer
from exporters import litert
from exporters.bundle import read_bundle

from .test_edge import _toy_bundle

TOKEN = "predict-test-token"
LOOP_THREAD = "agent-loop"


class InProcessAgent:
    """The agent's aiohttp app on its own event-loop thread (named LOOP_THREAD), on a free port."""

    def __init__(self, agent: Agent):
        from aiohttp import web
        self.agent = agent
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=LOOP_THREAD, daemon=True)
        self.thread.start()

        async def up():
            runner = web.AppRunner(make_app(agent, TOKEN), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, runner.addresses[0][1]
        self.runner, self.port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(30)

    def post(self, body: bytes, variant: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", "/predict" + (f"?variant={variant}" if variant else ""), body,
                         {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def close(self) -> None:
        async def down():  # as asyncio.run ends: what aiohttp left running (a handler whose client has gone) too
            await self.runner.cleanup()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.agent.predict_pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def served(toy_run, tmp_path_factory):
    home, _ = toy_run
    tmp = tmp_path_factory.mktemp("edge-predict")
    bundle = read_bundle(_toy_bundle(home))
    private, public = init_keys(tmp / "keys")
    agent = Agent(tmp / "device", public, log=lambda msg: None)
    agent.start()
    status, report = agent.install(build_package(bundle, tmp / "pkg.tar.gz", private, version=1))
    assert status == 201, report
    # the bare runners: fresh interpreters on the installed files, never the agent's own
    bare = {a.variant: litert.load(a) for a in agent.active.package.artifacts()}
    server = InProcessAgent(agent)
    yield {"agent": agent, "server": server, "bare": bare, "x": np.asarray(bundle.reference()["x"]),
           "name": agent.active.runners["fp32"].signature.input_names[0]}
    server.close()
    for r in bare.values():
        r.close()


@pytest.fixture()
def spy(monkeypatch):
    """Records each interpreter call of the agent (thread, rows) and any two calls inside one variant's
    interpreter at once; `hold` lets a test park a call of more than N rows inside it until an event."""
    calls, overlaps, inside, guard = [], [], {}, threading.Lock()
    hold: dict = {}
    original = VariantServer.predict

    def predict(self, x):
        rows = _rows_of(x)
        with guard:
            inside[id(self)] = inside.get(id(self), 0) + 1
            if inside[id(self)] > 1:
                overlaps.append(rows)
            calls.append((threading.current_thread().name, rows))
        try:
            if hold and rows > hold["rows"]:
                hold["entered"].set()
                assert hold["release"].wait(20), "the parked call was never released"
            return original(self, x)
        finally:
            with guard:
                inside[id(self)] -= 1
    monkeypatch.setattr(VariantServer, "predict", predict)
    return {"calls": calls, "overlaps": overlaps, "hold": hold}


def rows_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": x.tolist()}).encode()


def big_rows(served, n: int) -> np.ndarray:
    x = served["x"]
    return x[np.arange(n) % len(x)] + np.arange(n).reshape((n,) + (1,) * (x.ndim - 1)) * 1e-3


def expect(served, x: np.ndarray, got: dict, variant: str = "fp32") -> None:
    want = served["bare"][variant](x)
    out = np.asarray(next(iter(got["outputs"].values())), dtype=np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_a_small_predict_runs_inline_while_a_big_one_on_the_same_variant_is_on_the_predict_thread(served, spy):
    small, big = served["x"][:1], big_rows(served, 2000)
    assert len(rows_body(small)) <= agent_mod.INLINE_MAX_BYTES < len(rows_body(big))
    spy["hold"].update(rows=1, entered=threading.Event(), release=threading.Event())
    with ThreadPoolExecutor(2) as pool:
        big_call = pool.submit(served["server"].post, rows_body(big))
        # the big call sits inside the interpreter (lock held) while the small one is sent: the small one
        # must not run beside it, so it waits on the predict thread and answers after
        assert spy["hold"]["entered"].wait(30), "the big call never reached the interpreter"
        small_call = pool.submit(served["server"].post, rows_body(small))
        with pytest.raises(TimeoutError):
            small_call.result(0.3)   # it waits for the lock rather than interleaving
        spy["hold"]["release"].set()
        (s_big, got_big), (s_small, got_small) = big_call.result(60), small_call.result(60)
    assert (s_big, s_small) == (200, 200), (got_big, got_small)
    expect(served, big, got_big)
    expect(served, small, got_small)
    assert spy["overlaps"] == []
    assert [c for c in spy["calls"] if c[1] == 2000] == [("predict_0", 2000)]
    assert [c for c in spy["calls"] if c[1] == 1] == [("predict_0", 1)]

    # and with the variant free, the same small call is answered on the event loop, the big one on the thread
    spy["calls"].clear()
    spy["hold"].clear()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(served["server"].post, rows_body(big))] + \
                  [pool.submit(served["server"].post, rows_body(small)) for _ in range(20)]
        answers = [f.result(60) for f in futures]
    assert all(s == 200 for s, _ in answers), answers
    expect(served, big, answers[0][1])
    for _, got in answers[1:]:
        expect(served, small, got)
    assert spy["overlaps"] == []
    assert ("predict_0", 2000) in spy["calls"] and (LOOP_THREAD, 1) in spy["calls"]


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_each_variant_answers_the_bare_runners_numbers_inline_and_on_the_thread(served, spy, variant):
    for x in (served["x"][:1], served["x"][:3], big_rows(served, 1000)):
        status, got = served["server"].post(rows_body(x), variant)
        assert status == 200 and got["variant"] == variant, got
        expect(served, x, got, variant)
    threads = [t for t, _ in spy["calls"]]
    assert LOOP_THREAD in threads and "predict_0" in threads


def _before(served, raw: bytes, variant: str = "fp32") -> tuple[int, str]:
    """The agent's predict as it was before the fast path: request.json(), parse_inputs, to_feed and the
    runner's infer (a bare runner of the same artifact: the same checks and labels)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        return 400, f"expected a JSON body ({e})"
    runner = served["bare"][variant]
    try:
        runner.infer(to_feed(served["agent"].active.signature, runner, parse_inputs(body)))
    except InputMismatch as e:
        return 400, str(e)
    return 200, ""


def test_malformed_predicts_get_the_same_errors_as_before(served, spy):
    name, x = served["name"], served["x"]
    wide = np.concatenate([x[:1], x[:1]], axis=-1)
    cases = [b"{not json", b"[1, 2]", b'{"inputs": [[1]], "instances": [[1]]}', b'{"instances": []}',
             rows_body(wide), json.dumps({"inputs": [x[0].tolist(), x[0].tolist()[:-1] or []]}).encode(),
             json.dumps({"inputs": {"nope": x[:1].tolist()}}).encode(),
             json.dumps({"inputs": {name: x[:1].tolist(), "nope": x[:1].tolist()}}).encode(),
             json.dumps({"inputs": np.full_like(x[:1], 0, dtype=object).astype(str).tolist()}).encode(),
             json.dumps({"inputs": [[None] * x[0].size]}).encode(), json.dumps({"inputs": [[10 ** 30]]}).encode(),
             json.dumps({"inputs": []}).encode(), json.dumps({"inputs": 1.0}).encode(),
             rows_body(np.concatenate([big_rows(served, 1000)] * 2, axis=-1)),   # big: on the predict thread
             b"{" + b" " * (agent_mod.INLINE_MAX_BYTES + 10) + b"broken"]
    for raw in cases:
        want = _before(served, raw)
        assert want[0] == 400, (raw[:80], want)
        status, got = served["server"].post(raw)
        assert (status, got) == (want[0], {"error": want[1]}), raw[:80]
    status, got = served["server"].post(rows_body(x[:1]), "bf16")
    assert status == 404 and got["error"].startswith("variant 'bf16' is not in ")
    assert spy["overlaps"] == []
