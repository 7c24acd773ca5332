"""Pipeline specs: TOML files that name the data, the models, the formats and the tolerances.

Validation is pure Python (tomllib + dataclasses): it runs before any framework is imported, and
every problem is reported as "FILE: key: expected X, found Y" through `SpecError`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters import FORMATS, by_default  # the format registry: declarations only, no converter imported

BUILTIN_DIR = Path(__file__).resolve().parent / "specs"
DATA_SOURCES = ("linear", "digits", "npz")
LOSSES = ("mse", "sparse_categorical_crossentropy")
OPTIMIZERS = ("sgd", "adam")
TASKS = ("regression", "classification")


# [train] callbacks and their defaults (Keras' own, except patience)
CALLBACK_DEFAULTS = {
    "early_stopping": {"monitor": "val_loss", "patience": 10, "min_delta": 0.0},
    "checkpoint": {"monitor": "val_loss"},
    "reduce_lr": {"monitor": "val_loss", "factor": 0.5, "patience": 5, "min_delta": 0.0, "min_lr": 0.0},
}


class SpecError(ValueError):
    """A spec that cannot run; the message names the file, the key and what was expected."""
    user_error = True  # the command line exits 2 with the message alone


def builtin_specs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}


@dataclass(frozen=True)
class Bound:
    """An acceptance bound on a training metric: a target with a tolerance, or a minimum/maximum."""
    metric: str
    target: float | None = None
    tolerance: float | None = None
    min: float | None = None
    max: float | None = None

    def check(self, value: float) -> str | None:
        """None when `value` is acceptable, else a sentence saying why not."""
        if self.target is not None and abs(value - self.target) > self.tolerance:
            return (f"{self.metric} = {value:.4f} is not within {self.tolerance} of {self.target} "
                    f"(off by {abs(value - self.target):.4f})")
        if self.min is not None and value < self.min:
            return f"{self.metric} = {value:.4f} is below the minimum {self.min}"
        if self.max is not None and value > self.max:
            return f"{self.metric} = {value:.4f} is above the maximum {self.max}"
        return None

    def describe(self) -> str:
        if self.target is not None:
            return f"{self.target} +/- {self.tolerance}"
        parts = [f">= {self.min}"] if self.min is not None else []
        parts += [f"<= {self.max}"] if self.max is not None else []
        return " and ".join(parts)


@dataclass(frozen=True)
class TrainSettings:
    optimizer: str
    lr: float
    epochs: int
    batch_size: int | None  # None: full batch
    loss: str
    shuffle: bool
    threads: int
    validation_split: float = 0.0      # the last fraction of the training rows, held out for validation
    early_stopping: dict | None = None  # {monitor, patience, min_delta}
    checkpoint: dict | None = None      # {monitor}: keep the best epoch's weights
    reduce_lr: dict | None = None       # {monitor, factor, patience, min_delta, min_lr}
    tensorboard: bool = True            # event files of the training, under the train stage
    workers: int = 1                    # worker processes training the one model (data parallel)
    precision: str = "fp32"             # what training computes in: fp32, or bf16 / fp16 mixed precision


DEPLOY_TARGETS = ("serving", "edge")  # [deploy.<target>] tables, each checked by its own package


@dataclass(frozen=True)
class ModelSpec:
    name: str
    framework: str
    factory: str | None            # "module:function"; for a pretrained state dict, what builds the module
    params: dict[str, Any]
    train: TrainSettings | None    # None: a pretrained model, not trained here
    accept: tuple[Bound, ...]
    litert_batch_sizes: tuple[int, ...]
    source: str | None = None      # a pretrained model file (absolute path), used as it is
    signature: dict | None = None  # what the spec states: {"inputs": {name: dtype}, "outputs": [name, ...]}
    int8_fallback: dict | None = None  # [export.litert] int8_fallback = "auto": {"max_float_layers": n}

    @property
    def pretrained(self) -> bool:
        return self.source is not None

    def source_digest(self) -> str | None:
        from .cache import file_digest, folder_digests
        if not self.source:
            return None
        from . import registry_ref
        if registry_ref.is_ref(self.source):  # the version the reference names now: a moved alias retrains nothing
            import os                           # but does change what this stage is built from
            home = Path(os.environ.get("PIPELINE_HOME", ".")).resolve()
            from .tracking import resolve_ref
            try:
                return resolve_ref(home, self.source).digest
            except LookupError as e:
                raise SpecError(f"model {self.name}: source {e}") from None
        if Path(self.source).is_dir():  # a save_pretrained folder: every file in it
            return hashlib.sha256(json.dumps(folder_digests(Path(self.source)), sort_keys=True).encode()).hexdigest()
        return file_digest(Path(self.source))

    def factory_source_hash(self) -> str:
        """Hash of the factory's module source, found without importing it (no framework import)."""
        if not self.factory:
            return "none"
        module = self.factory.split(":", 1)[0]
        found = importlib.util.find_spec(module)
        origin = Path(found.origin) if found and found.origin else None
        return hashlib.sha256(origin.read_bytes()).hexdigest() if origin and origin.is_file() else "unknown"


@dataclass(frozen=True)
class DataSpec:
    source: str
    task: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ParitySpec:
    held_out_rows: int
    random_rows: int
    input_range: tuple[float, float]
    max_batch: int
    tolerances: dict[str, dict[str, float]]
    allow_unsupported: tuple[str, ...] = ()  # cells "<model>/<format>[-<variant>]" whose converter may fail
    inputs: dict = field(default_factory=dict)  # [parity.inputs.<name>]: {"range": (low, high), "dtype": str}

    def allows_unsupported(self, model: str, fmt: str, variant: str) -> bool:
        return f"{model}/{fmt}" in self.allow_unsupported or f"{model}/{fmt}-{variant}" in self.allow_unsupported


@dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    seed: int
    data: DataSpec
    models: tuple[ModelSpec, ...]
    formats: tuple[str, ...]
    parity: ParitySpec
    deploy: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)
    executor: str | None = None   # [pipeline] executor: where its stages run unless the command says
    gate: dict = field(default_factory=dict)  # [gate]: baseline alias and thresholds for `check SPEC`
    tracking_uri: str | None = None  # [tracking] uri: the team's MLflow tracking server, unless the command names one

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)


# --------------------------------------------------------------------------- loading

def resolve(name_or_path: str) -> Path:
    """A built-in spec name or a path to a TOML file."""
    builtins = builtin_specs()
    if name_or_path in builtins:
        return builtins[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SpecError(f"{path}: no such spec file")
        return path.resolve()
    raise SpecError(f"unknown spec '{name_or_path}': expected a built-in spec "
                    f"({', '.join(builtins)}) or a path to a .toml file")


def load(name_or_path: str) -> Spec:
    path = resolve(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:  # its message carries "(at line N, column M)"
        raise SpecError(f"{path}: malformed TOML: {e}") from None
    return _Validator(path).spec(raw)


class _Validator:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, expected: str, found: Any = None, *, show_found: bool = True) -> None:
        tail = f", found {found!r}" if show_found else ""
        raise SpecError(f"{self.path}: {key}: expected {expected}{tail}")

    def table(self, parent: dict, key: str, where: str, allowed: set[str], required: bool = True) -> dict:
        value = parent.get(key)
        if value is None:
            if required:
                raise_missing(self.path, where)
            return {}
        if not isinstance(value, dict):
            self.fail(where, "a table", value)
        self.known_keys(value, where, allowed)
        return value

    def known_keys(self, table: dict, where: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.fail(f"{where}.{key}" if where else key,
                          f"one of the known keys ({', '.join(sorted(allowed))}); unknown key", key)

    def get(self, table: dict, key: str, where: str, kind: type | tuple, default: Any = ...,
            choices: tuple | None = None, positive: bool = False) -> Any:
        full = f"{where}.{key}" if where else key
        if key not in table:
            if default is ...:
                raise_missing(self.path, full)
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            self.fail(full, " or ".join(k.__name__ for k in kinds), value)
        if choices is not None and value not in choices:
            self.fail(full, f"one of {', '.join(choices)}", value)
        if positive and value <= 0:
            self.fail(full, "a positive number", value)
        return value

    def spec(self, raw: dict) -> Spec:
        self.known_keys(raw, "", {"pipeline", "data", "model", "train", "accept", "export", "parity",
                                  "deploy", "gate", "tracking"})
        head = self.table(raw, "pipeline", "pipeline", {"name", "seed", "description", "executor"})
        name = self.get(head, "name", "pipeline", str)
        seed = self.get(head, "seed", "pipeline", int, 0)
        from . import executors  # light: the executors' modules are listed, not imported
        executor = self.get(head, "executor", "pipeline", str, None, choices=tuple(executors.names()))

        data_raw = self.table(raw, "data", "data", {"source", "task", "n_samples", "slope", "intercept",
                                                   "noise", "test_fraction", "path", "scale", "inputs"})
        source = self.get(data_raw, "source", "data", str, choices=DATA_SOURCES)
        task = self.get(data_raw, "task", "data", str, choices=TASKS)
        data_options = {k: v for k, v in data_raw.items() if k not in ("source", "task")}
        if source == "npz":
            rel = self.get(data_raw, "path", "data", str)
            data_options["path"] = str((self.path.parent / rel).resolve())
            if not Path(data_options["path"]).is_file() and not Path(data_options["path"]).is_dir():
                self.fail("data.path", f"an .npz file or a folder of .npy files (relative to the spec), found "
                                       f"nothing at {data_options['path']}", show_found=False)
        if "inputs" in data_raw:  # a model of several named inputs: one npz array each
            names = self.get(data_raw, "inputs", "data", list)
            if source != "npz" or not names or len(set(names)) != len(names) or not all(
                    isinstance(n, str) and n.isidentifier() for n in names):
                self.fail("data.inputs", "a list of distinct input names (identifiers), with source = \"npz\" "
                                         "holding one array per name", names)
        for key in ("n_samples",):
            if key in data_raw:
                self.get(data_raw, key, "data", int, positive=True)
        for key in ("slope", "intercept", "noise", "scale"):
            if key in data_raw:
                self.get(data_raw, key, "data", float)
        if "test_fraction" in data_raw:
            frac = self.get(data_raw, "test_fraction", "data", float)
            if not 0.0 <= frac < 1.0:
                self.fail("data.test_fraction", "a number in [0, 1)", frac)

        train_defaults = self.table(raw, "train", "train", _TRAIN_KEYS, required=False)
        accept_defaults = self.get(raw, "accept", "", dict, {})
        models_raw = raw.get("model")
        if not isinstance(models_raw, list) or not models_raw:
            self.fail("model", "one or more [[model]] tables", models_raw, show_found=models_raw is not None)
        export = self.table(raw, "export", "export", {"formats", "litert_batch_sizes", *FORMATS}, required=False)
        options = self._format_options(export)
        int8_fallback = self._int8_fallback(options.get("litert", {}))
        formats = tuple(self.get(export, "formats", "export", list, list(by_default())))
        for f in formats:
            if f not in FORMATS:
                self.fail("export.formats", f"formats among {', '.join(FORMATS)}", f)
        litert_batches = self._batch_sizes(export, "export")

        models = []
        for i, m in enumerate(models_raw):
            where = f"model[{i}]"
            if not isinstance(m, dict):
                self.fail(where, "a table", m)
            self.known_keys(m, where, {"name", "framework", "backend", "factory", "params", "train", "accept",
                                       "litert_batch_sizes", "source", "signature"})
            mname = self.get(m, "name", where, str)
            if any(x.name == mname for x in models):
                self.fail(f"{where}.name", "a name unique among the models", mname)
            framework = self._framework(m, where)
            pretrained = self._source(m, where, framework)
            factory = self.get(m, "factory", where, str, None if pretrained else ...)
            if factory is not None:
                self._check_factory(factory, f"{where}.factory")
            params = self.get(m, "params", where, dict, {})
            train_raw = self.get(m, "train", where, (dict, bool), {} if not pretrained else False)
            if pretrained and train_raw is not False:
                self.fail(f"{where}.train", "false for a pretrained model (source = ...): it is used as it is, "
                                            "not trained", train_raw)
            if train_raw is True:
                train_raw = {}
            train = None if train_raw is False else \
                self._train({**train_defaults, **train_raw}, f"{where}.train")
            if train is not None:
                self._distributable(framework, train, f"{where}.train")
                self._mixed_precision(framework, train, f"{where}.train")
            if train is None and not pretrained:
                self.fail(f"{where}.train", "a table (or true): a model without `source` is trained from its "
                                            "factory", False)
            accept = self._accept({**accept_defaults, **self.get(m, "accept", where, dict, {})},
                                  f"{where}.accept")
            batches = self._batch_sizes(m, where) if "litert_batch_sizes" in m else litert_batches
            stated = self._signature(m, where) if "signature" in m else None
            models.append(ModelSpec(mname, framework, factory, params, train, accept, batches, pretrained, stated,
                                    int8_fallback))

        parity = self._parity(self.table(raw, "parity", "parity", {"held_out_rows", "random_rows",
                                                                  "input_range", "max_batch",
                                                                  "tolerances", "allow_unsupported", "inputs"},
                                         required=False), [m.name for m in models], formats,
                             data_options.get("inputs") or ["x"])
        deploy = self.get(raw, "deploy", "", dict, {})
        self._deploy_targets(deploy)
        return Spec(name, self.path, seed, DataSpec(source, task, data_options), tuple(models), formats,
                    parity, deploy, raw, executor, self._gate(self.table(raw, "gate", "gate", set(GATE_KEYS),
                                                                         required=False)),
                    self._tracking_uri(self.table(raw, "tracking", "tracking", {"uri"}, required=False)))

    def _tracking_uri(self, table: dict) -> str | None:
        """[tracking] uri = "http://host:port" (a tracking server), or another URI MLflow takes."""
        uri = self.get(table, "uri", "tracking", str, None)
        if uri is not None and "://" not in uri and not uri.startswith("sqlite:"):
            self.fail("tracking.uri", "a tracking URI such as \"http://127.0.0.1:5000\"", uri)
        return uri

    def _framework(self, m: dict, where: str) -> str:
        """One of frameworks/' modules, with its packages installed (checked without importing them);
        a keras model's `backend = ...` names the module that runs Keras on it (frameworks/keras.py BACKENDS)."""
        import frameworks
        framework = self.get(m, "framework", where, str, choices=frameworks.names())
        backends = getattr(frameworks.module(framework), "BACKENDS", None)
        if "backend" in m and not backends:
            self.fail(f"{where}.backend", f"no backend for a {framework} model (only keras runs on several)",
                      m["backend"])
        if backends:  # Keras: each backend is a framework module of its own (its lane, its model family)
            framework = backends[self.get(m, "backend", where, str, "tensorflow", choices=tuple(backends))]
        missing = frameworks.missing_packages(framework)
        if missing:
            self.fail(f"{where}.framework", f"a framework whose packages are installed: {framework} needs "
                                            f"{', '.join(missing)}; install with: "
                                            f"{frameworks.module(framework).INSTALL}", framework)
        return framework

    def _source(self, m: dict, where: str, framework: str) -> str | None:
        """A pretrained model file beside the spec (or an absolute path), of a kind the framework loads."""
        rel = self.get(m, "source", where, str, None)
        if rel is None:
            return None
        from . import registry_ref
        if registry_ref.is_ref(rel):  # a registered version of this home's MLflow registry
            try:
                registry_ref.parse(rel)
            except ValueError:
                self.fail(f"{where}.source", "models:/NAME@ALIAS or models:/NAME/VERSION", rel)
            return rel
        import frameworks
        path = (self.path.parent / rel).resolve()
        if frameworks.takes_folder(framework, path):
            return str(path)
        forms = frameworks.pretrained_forms(framework)
        if not forms:
            self.fail(f"{where}.source", f"no source: {framework} models are built by their factory and trained "
                                         f"here (bring a trained one with a framework that loads files)", rel)
        if path.suffix not in frameworks.module(framework).PRETRAINED_SUFFIXES:
            self.fail(f"{where}.source", forms, rel)
        if not path.is_file():
            self.fail(f"{where}.source", f"a model file (relative to the spec), found no file at {path}",
                      show_found=False)
        return str(path)

    def _deploy_targets(self, deploy: dict) -> None:
        """Each deploy target checks its own table (serving/ knows its keys)."""
        self.known_keys(deploy, "deploy", set(DEPLOY_TARGETS))
        if "serving" in deploy:
            from serving.deploy import TargetError, settings
            try:
                settings(deploy["serving"])
            except TargetError as e:
                self.fail(e.key, e.expected, e.found)
        if "edge" in deploy:
            from edge.deploy import TargetError as EdgeTargetError, settings as edge_settings
            try:
                edge_settings(deploy["edge"], self.path.parent)
            except EdgeTargetError as e:
                self.fail(e.key, e.expected, e.found)

    def _signature(self, m: dict, where: str) -> dict:
        """`[model.signature]`: the inputs (name -> dtype) and output names the spec says the model has;
        the reference stage holds the model to them."""
        from parity.signature import DTYPES
        table = self.get(m, "signature", where, dict)
        where = f"{where}.signature"
        self.known_keys(table, where, {"inputs", "outputs"})
        inputs = self.get(table, "inputs", where, dict, {})
        for name, dtype in inputs.items():
            if dtype not in DTYPES:
                self.fail(f"{where}.inputs.{name}", f"a dtype among {', '.join(DTYPES)}", dtype)
        outputs = self.get(table, "outputs", where, list, [])
        if not all(isinstance(o, str) and o for o in outputs) or len(set(outputs)) != len(outputs):
            self.fail(f"{where}.outputs", "a list of distinct output names", outputs)
        return {"inputs": dict(inputs), "outputs": list(outputs)}

    def _gate(self, table: dict) -> dict:
        """[gate] baseline = "production" (an alias of each model's registered versions) and the
        thresholds `check SPEC` compares each model's candidate with it under."""
        gate = {}
        if "baseline" in table:
            gate["baseline"] = self.get(table, "baseline", "gate", str)
        for key in GATE_KEYS[1:]:
            if key in table:
                value = self.get(table, key, "gate", (int, float))
                if isinstance(value, bool) or value < 0:
                    self.fail(f"gate.{key}", "a number >= 0", value)
                gate[key] = float(value)
        if len(gate) > ("baseline" in gate) and "baseline" not in gate:
            self.fail("gate.baseline", "the alias to compare with (e.g. \"production\") when thresholds are set",
                      None, show_found=False)
        return gate

    def _format_options(self, export: dict) -> dict[str, dict]:
        """[export.<format>] tables, each holding what its format module declares (OPTIONS); a format
        module is imported only when its table is there."""
        import exporters
        found = {}
        for fmt in (f for f in FORMATS if f in export):
            allowed = exporters.options(fmt)
            if not allowed:
                self.fail(f"export.{fmt}", f"no [export.{fmt}] table: {fmt} takes no options", export[fmt])
            found[fmt] = self.table(export, fmt, f"export.{fmt}", set(allowed))
        return found

    def _int8_fallback(self, table: dict) -> dict | None:
        """[export.litert] int8_fallback = "auto": the int8 variant keeps its worst layers in float, at
        most int8_max_float_layers of them (default 8); "off" (the default) leaves it all int8."""
        mode = self.get(table, "int8_fallback", "export.litert", str, "off")
        if mode not in ("off", "auto"):
            self.fail("export.litert.int8_fallback", '"auto" or "off"', mode)
        limit = self.get(table, "int8_max_float_layers", "export.litert", int, 8)
        if isinstance(limit, bool) or limit < 1:
            self.fail("export.litert.int8_max_float_layers", "a positive integer", limit)
        return {"max_float_layers": limit} if mode == "auto" else None

    def _batch_sizes(self, table: dict, where: str) -> tuple[int, ...]:
        sizes = self.get(table, "litert_batch_sizes", where, list, [1, 16])
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            self.fail(f"{where}.litert_batch_sizes", "a non-empty list of positive integers", sizes)
        return tuple(sorted(set(sizes)))

    def _train(self, t: dict, where: str) -> TrainSettings:
        self.known_keys(t, where, _TRAIN_KEYS)
        batch = self.get(t, "batch_size", where, (int, str), "full")
        if isinstance(batch, str) and batch != "full" or isinstance(batch, int) and batch <= 0:
            self.fail(f"{where}.batch_size", "a positive integer or \"full\"", batch)
        return TrainSettings(
            optimizer=self.get(t, "optimizer", where, str, choices=OPTIMIZERS),
            lr=self.get(t, "lr", where, float, positive=True),
            epochs=self.get(t, "epochs", where, int, positive=True),
            batch_size=None if batch == "full" else batch,
            loss=self.get(t, "loss", where, str, choices=LOSSES),
            shuffle=self.get(t, "shuffle", where, bool, False),
            threads=self.get(t, "threads", where, int, 1, positive=True),
            workers=self._workers(t, where),
            precision=self._precision(t, where),
            **self._callbacks(t, where),
        )

    def _workers(self, t: dict, where: str) -> int:
        workers = t.get("workers", 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            self.fail(f"{where}.workers", "a positive integer (the worker processes that train the model "
                                          "together)", workers)
        return workers

    def _precision(self, t: dict, where: str) -> str:
        from frameworks.precision import PRECISIONS, refusal
        precision = self.get(t, "precision", where, str, "fp32", choices=PRECISIONS)
        why = refusal(precision)
        if why:
            self.fail(f"{where}.precision", f"a precision this machine trains in: {why}", precision)
        return precision

    def _mixed_precision(self, framework: str, train: TrainSettings, where: str) -> None:
        """bf16 (or fp16) only for a framework whose own mechanism is wired in (PRECISIONS), on one worker."""
        import frameworks
        mod = frameworks.module(framework)
        if train.precision == "fp32":
            return
        if train.precision not in getattr(mod, "PRECISIONS", ("fp32",)):
            why = getattr(mod, "NOT_MIXED", "its training computes in float32 only")
            self.fail(f"{where}.precision", f"fp32 for a {framework} model: {why}", train.precision)
        if train.workers > 1:
            self.fail(f"{where}.precision", "fp32 when several workers train the model (mixed precision "
                                            "trains on one worker here)", train.precision)

    def _distributable(self, framework: str, train: TrainSettings, where: str) -> None:
        """workers > 1 only for a framework that declares its own launcher (frameworks/<name>.py
        DISTRIBUTION; NOT_DISTRIBUTED says why the others have none)."""
        import frameworks
        mod = frameworks.module(framework)
        if train.workers > 1 and not getattr(mod, "DISTRIBUTION", None):
            self.fail(f"{where}.workers", f"1 for a {framework} model: {mod.NOT_DISTRIBUTED}", train.workers)

    def _callbacks(self, t: dict, where: str) -> dict:
        """[train] callbacks, with Keras' names and defaults; each may be true (the defaults) or a table.
        A monitor must be a value training logs: loss, or val_loss when validation_split holds rows out."""
        split = self.get(t, "validation_split", where, float, 0.0)
        if not 0.0 <= split < 1.0:
            self.fail(f"{where}.validation_split", "a fraction in [0, 1) of the training rows", split)
        monitors = ("loss", "val_loss") if split else ("loss",)
        out = {"validation_split": split, "tensorboard": self.get(t, "tensorboard", where, bool, True)}
        for key, defaults in CALLBACK_DEFAULTS.items():
            raw = self.get(t, key, where, (dict, bool), False)
            if raw is False:
                out[key] = None
                continue
            raw = {} if raw is True else raw
            self.known_keys(raw, f"{where}.{key}", set(defaults))
            c = {**defaults, **raw}
            monitor = c["monitor"] if split or "monitor" in raw else "loss"
            if not isinstance(monitor, str) or monitor not in monitors:
                hint = ("; accuracy is not logged while training, monitor a loss" if "acc" in str(monitor) else
                        "; val_loss needs validation_split > 0" if monitor == "val_loss" else "")
                self.fail(f"{where}.{key}.monitor", f"a value training logs ({', '.join(monitors)}){hint}", monitor)
            c["monitor"] = monitor
            for k in ("patience",):
                if k in c:
                    c[k] = self.get(c, k, f"{where}.{key}", int, positive=True)
            for k in ("min_delta", "min_lr"):
                if k in c:
                    c[k] = self.get(c, k, f"{where}.{key}", float)
                    if c[k] < 0:
                        self.fail(f"{where}.{key}.{k}", "a number >= 0", c[k])
            if "factor" in c:
                c["factor"] = self.get(c, "factor", f"{where}.{key}", float)
                if not 0.0 < c["factor"] < 1.0:
                    self.fail(f"{where}.{key}.factor", "a factor in (0, 1) the learning rate is multiplied by",
                              c["factor"])
            out[key] = c
        return out

    def _accept(self, a: dict, where: str) -> tuple[Bound, ...]:
        bounds = []
        for metric, rule in a.items():
            key = f"{where}.{metric}"
            if not isinstance(rule, dict):
                self.fail(key, "a table such as { target = 3.0, tolerance = 0.05 } or { min = 0.95 }", rule)
            self.known_keys(rule, key, {"target", "tolerance", "min", "max"})
            vals = {k: self.get(rule, k, key, float) for k in rule}
            if ("target" in vals) != ("tolerance" in vals) or not vals:
                self.fail(key, "target with tolerance, or min and/or max", rule)
            bounds.append(Bound(metric, **vals))
        return tuple(bounds)

    def _parity_inputs(self, p: dict, input_names: list[str]) -> dict:
        """[parity.inputs.<name>]: the range (floats uniform in [low, high), integers in [low, high]) and
        dtype the parity set draws that input in, in place of what the data shows."""
        from parity.signature import DTYPES
        table = self.get(p, "inputs", "parity", dict, {})
        out = {}
        for name, t in table.items():
            where = f"parity.inputs.{name}"
            if name not in input_names:
                self.fail(where, f"one of the data's inputs ({', '.join(input_names)})", name)
            self.get(table, name, "parity.inputs", dict)
            self.known_keys(t, where, {"range", "dtype"})
            rng = self.get(t, "range", where, list, None)
            if rng is not None and (len(rng) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in rng) or rng[0] >= rng[1]):
                self.fail(f"{where}.range", "[low, high] with low < high", rng)
            dtype = self.get(t, "dtype", where, str, None)
            if dtype is not None and dtype not in DTYPES:
                self.fail(f"{where}.dtype", f"a dtype among {', '.join(DTYPES)}", dtype)
            out[name] = {"range": tuple(rng) if rng else None, "dtype": dtype}
        return out

    def _parity(self, p: dict, model_names: list[str], formats: tuple[str, ...],
                input_names: list[str]) -> ParitySpec:
        rng = self.get(p, "input_range", "parity", list, [])
        if rng and (len(rng) != 2 or not all(isinstance(v, (int, float)) for v in rng) or rng[0] >= rng[1]):
            self.fail("parity.input_range", "[low, high] with low < high", rng)
        tolerances = self.get(p, "tolerances", "parity", dict, {})
        for fmt, tol in tolerances.items():
            self.get(tolerances, fmt, "parity.tolerances", dict)
            for k in tol:
                self.get(tol, k, f"parity.tolerances.{fmt}", float)
        from parity.compare import VARIANTS, tolerance_for  # numpy only: still no framework import
        try:
            for variant in VARIANTS:
                tolerance_for(variant, FORMATS[0], tolerances, formats=FORMATS)
        except ValueError as e:
            self.fail("parity.tolerances", f"valid tolerance overrides ({e})", show_found=False)
        return ParitySpec(
            held_out_rows=self.get(p, "held_out_rows", "parity", int, 64),
            random_rows=self.get(p, "random_rows", "parity", int, 64),
            input_range=tuple(float(v) for v in rng) if rng else None,
            max_batch=self.get(p, "max_batch", "parity", int, 16, positive=True),
            tolerances=tolerances,
            allow_unsupported=self._allowed_cells(p, model_names, formats),
            inputs=self._parity_inputs(p, input_names),
        )

    def _allowed_cells(self, p: dict, model_names: list[str], formats: tuple[str, ...]) -> tuple[str, ...]:
        cells = self.get(p, "allow_unsupported", "parity", list, [])
        from parity.compare import VARIANTS
        known = {f"{m}/{f}" for m in model_names for f in formats}
        known |= {f"{c}-{v}" for c in list(known) for v in VARIANTS}
        for cell in cells:
            if cell not in known:
                self.fail("parity.allow_unsupported", "cells such as "
                          f"'{model_names[0]}/{formats[0] if formats else 'onnx'}' or "
                          f"'{model_names[0]}/litert-int8' (a model and a listed format)", cell)
        return tuple(cells)

    def _check_factory(self, factory: str, key: str) -> None:
        module, sep, func = factory.partition(":")
        if not sep or not module or not func.isidentifier():
            self.fail(key, "'module:function'", factory)
        spec_dir = str(self.path.parent)
        import sys
        added = spec_dir not in sys.path
        if added:  # a user's factory module usually sits beside the spec
            sys.path.insert(0, spec_dir)
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            if added:
                sys.path.remove(spec_dir)
            self.fail(key, f"an importable module '{module}' (looked beside the spec and on sys.path)",
                      factory)
        origin = Path(found.origin) if found.origin else None
        if origin is not None and origin.suffix == ".py" and origin.is_file() and \
                not ({func, "*"} & _top_level_names(origin)):
            self.fail(key, f"a function '{func}' defined in {origin}", factory)


def _top_level_names(source: Path) -> set[str]:
    """Names a module defines at its top level, read from its source without importing it (importing
    a factory module would import its framework)."""
    import ast
    try:
        tree = ast.parse(source.read_text(), filename=str(source))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return {"*"}  # cannot tell: the import at run time will say what is wrong
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # definitions under `if` / `try`: accept, do not guess
            names.update(n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
            names.update(t.id for n in ast.walk(node) if isinstance(n, ast.Assign)
                         for t in n.targets if isinstance(t, ast.Name))
    if any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in tree.body):
        names.add("*")
    return names


_TRAIN_KEYS = {"optimizer", "lr", "epochs", "batch_size", "loss", "shuffle", "threads", "validation_split",
               "early_stopping", "checkpoint", "reduce_lr", "tensorboard", "workers", "precision"}


GATE_KEYS = ("baseline", "max_metric_drop", "max_latency_ratio", "max_size_ratio")


def raise_missing(path: Path, key: str) -> None:
    raise SpecError(f"{path}: {key}: required key is missing")
