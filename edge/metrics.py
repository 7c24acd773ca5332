"""The edge agent's Prometheus metrics, served on `GET /metrics` (behind the agent's bearer token, as
/status). A registry of the agent's own (never prometheus_client's global one); the standard text format
(prometheus_client.generate_latest). TF Serving has no device agent, so every name is ours, under
`edge_agent_`:

  edge_agent_predict_requests_total{variant,code}       /predict calls by variant and HTTP status
  edge_agent_predict_latency_seconds{variant}           histogram of every /predict call (errors included),
                                                        from the body read to the answer
  edge_agent_parity_checks_total{variant,outcome}       on-device parity of each pushed variant: passed | failed
  edge_agent_pushes_total{outcome}                      pushes: activated | rejected
  edge_agent_activations_total                          versions activated by a push
  edge_agent_rollbacks_total                            successful POST /rollback
  edge_agent_active_version{model}                      the active version's number (read at scrape time)

A variant the active version does not have is counted as "unknown" (a label per typo would grow without end).
"""
from __future__ import annotations

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class AgentMetrics:
    def __init__(self, agent):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry(auto_describe=False)
        self._agent = agent
        self._predicts = Counter("edge_agent_predict_requests", "/predict calls by variant and HTTP status.",
                                 ("variant", "code"), registry=r)
        self._latency = Histogram("edge_agent_predict_latency_seconds", "Wall time of /predict calls (errors "
                                  "included), from the body read to the answer.", ("variant",),
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._parity = Counter("edge_agent_parity_checks", "On-device parity of each pushed variant.",
                               ("variant", "outcome"), registry=r)
        self._pushes = Counter("edge_agent_pushes", "Pushes by outcome (activated, rejected).", ("outcome",),
                               registry=r)
        self._activations = Counter("edge_agent_activations", "Versions activated by a push.", registry=r)
        self._rollbacks = Counter("edge_agent_rollbacks", "Successful rollbacks.", registry=r)
        r.register(_Active(agent))

    def predict(self, variant: str | None, code: int, seconds: float) -> None:
        variant = variant or "fp32"
        active = self._agent.active
        if active is None or variant not in active.runners:
            variant = "unknown"
        self._predicts.labels(variant, str(code)).inc()
        self._latency.labels(variant).observe(seconds)

    def pushed(self, status: int, body: dict) -> None:
        """One push's outcome: its parity report (on 201, and on a 422 that carries it) and the activation."""
        report = body if status == 201 else body.get("report")
        for variant, rec in ((report or {}).get("variants") or {}).items():
            self._parity.labels(variant, "passed" if rec.get("passed") else "failed").inc()
        self._pushes.labels("activated" if status == 201 else "rejected").inc()
        if status == 201:
            self._activations.inc()

    def rolled_back(self) -> None:
        self._rollbacks.inc()

    def page(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Active:
    def __init__(self, agent):
        self._agent = agent

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        g = GaugeMetricFamily("edge_agent_active_version", "The active version's number.", labels=("model",))
        a = self._agent.active
        if a is not None:
            g.add_metric((a.model,), a.version)
        yield g
