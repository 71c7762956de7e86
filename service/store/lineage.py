"""Fine-tuning: where a study's starting model comes from, whether it fits, and how it is read.

- ``read_checkpoint``: what a seqtune model file (``torch.save`` of ``engine.make_checkpoint``)
  says of itself, read without torch and without running anything from the file.
- ``check_init``: the submit-time check of a study's ``init_from`` against the model it names,
  which also writes into the spec what the model decides (the stored spec says what runs).
- ``load_source``: the starting model's bytes, for the worker.

The service has no torch. A torch checkpoint is a zip whose ``*/data.pkl`` is a pickle, and
unpickling runs whatever callables the pickle names; so it is read by an Unpickler that knows
the few names a seqtune checkpoint holds and replaces tensors by their shapes. Any other name
is refused before it is looked up: a file can make this reader fail, never run code. What the
reader hands the pickle is made for each load and closed to change, so a file cannot alter the
reader for the next one either. The data is walked under a budget (values, nesting) before
anything touches it, and each tensor must be a whole, contiguous, stored record of the archive:
what a worker's ``torch.load`` allocates is then no more than the file holds.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import zipfile
from typing import Any, NamedTuple

from sqlalchemy import Connection, and_, select

from seqtune import catalog
from seqtune.errors import Conflict, Invalid, NotFound
from seqtune.hparams import HPARAMS
from seqtune.spec import BuiltinData, Categorical, InitFrom, IntRange, StudySpec, SyntheticData
from service.hints import hint
from service.store import datasets, studies, trials
from service.store.db import Database
from service.store.tables import Checkpoint, Model, Study, Trial

EXPECTED = (
    "expected a seqtune model file: the .pt that GET /v1/studies/{name}/trials/{number}/model "
    "or /v1/studies/{name}/best/model serves"
)
FORMATS = (2,)  # the checkpoint formats engine.make_checkpoint has written
MAX_PICKLE_BYTES = 16 * 1024 * 1024  # a checkpoint's data.pkl holds shapes and small lists
# What the unpickled data may hold: values reached (a shared reference counts each time it is
# reached) and containers nested. A checkpoint holds a few hundred values; its lineage nests
# one level per fine-tune generation.
MAX_VALUES = 100_000
MAX_DEPTH = 32
MAX_LINEAGE_BYTES = 64 * 1024  # as JSON: every fine-tuned trial's info copies it as `parent`
MAX_ENTRIES = 4096  # zip entries: a checkpoint has one per tensor and a few more
MAX_DIMS = 8
MAX_NUMEL = 2**40
# The model's shape: these must equal the study's hyperparameters of the same name.
SHAPE_PARAMS = ("hidden_size", "num_layers", "bidirectional")


# ---- reading a checkpoint without torch -------------------------------------------------------


class TensorShape(NamedTuple):
    """What the reader keeps of a tensor: its shape and storage type."""

    shape: tuple[int, ...]
    dtype: str


class _Refused(Exception):
    """The pickle names something a seqtune checkpoint does not hold."""


class _StorageType(NamedTuple):
    name: str  # torch.FloatStorage and the like, never looked up


class _Storage(NamedTuple):
    dtype: str
    numel: int


# torch.save names a tensor's storage by its legacy typed-storage class: its bytes per element.
_ITEMSIZE = {
    "float": 4, "double": 8, "half": 2, "bfloat16": 2, "long": 8,
    "int": 4, "short": 2, "char": 1, "byte": 1, "bool": 1,
}  # fmt: skip
_STORAGES = {f"{'BFloat16' if t == 'bfloat16' else t.title()}Storage": t for t in _ITEMSIZE}


def _brief(v: Any) -> str:
    """A value of the file for a message, never longer than a few dozen characters: small
    numbers and short strings as they are, anything else by its type."""
    if v is None or isinstance(v, bool | float):
        return repr(v)
    if isinstance(v, int):
        return repr(v) if -(10**12) < v < 10**12 else "a large integer"
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else repr(v[:32]) + f"... ({len(v)} characters)"
    return f"a {type(v).__name__}"


def _ints(value: Any, low: int, high: int) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value
    )


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> TensorShape:
    """Stands in for torch._utils._rebuild_tensor_v2: the tensor's shape, no data. The tensor
    must be its whole storage, laid out contiguously, as torch.save writes a state_dict's
    tensors: what a worker's torch.load allocates is then the size of the weights."""
    if not isinstance(storage, _Storage) or not isinstance(offset, int):
        raise _Refused("a tensor of an unexpected form")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) > MAX_DIMS:
        raise _Refused("a tensor of an unexpected form")
    if not _ints(size, 0, MAX_NUMEL) or not _ints(stride, 0, MAX_NUMEL) or len(stride) != len(size):
        raise _Refused("a tensor of an unexpected form")
    if offset != 0:
        raise _Refused("a tensor at an offset into its storage (torch.save of a view)")
    numel, contiguous = 1, True
    for n, st in zip(reversed(size), reversed(stride), strict=True):
        contiguous = contiguous and (n == 1 or st == numel)  # as torch's is_contiguous
        numel *= n
        if numel > MAX_NUMEL:
            raise _Refused("a tensor of an unexpected size")
    if numel and not contiguous:
        raise _Refused("a tensor that is not contiguous")
    if storage.numel != numel:
        raise _Refused(
            f"a tensor of {numel} value(s) in a storage of {_brief(storage.numel)} "
            "(torch.save of a view)"
        )
    return TensorShape(tuple(size), storage.dtype)


def _rebuild_parameter(data: Any, *_rest: Any) -> TensorShape:
    """Stands in for torch._utils._rebuild_parameter."""
    if not isinstance(data, TensorShape):
        raise _Refused("a parameter of an unexpected form")
    return data


def _ordered_dict(*args: Any) -> collections.OrderedDict[Any, Any]:
    """Stands in for collections.OrderedDict: an empty one, which the pickle fills (a BUILD may
    set its attributes: a state_dict's ``_metadata``; never read here)."""
    if args:
        raise _Refused("an OrderedDict of an unexpected form")
    return collections.OrderedDict()


class _StandIn:
    """What the unpickler hands out for an allowed global: made afresh for each load, and
    closed to change. A pickle's BUILD sets attributes on whatever it is given (were it the
    module's function, for every later load); on a stand-in it is refused."""

    __slots__ = ("_call", "_name")
    _call: Any
    _name: str

    def __init__(self, name: str, call: Any) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused(f"it modifies {self._name}")

    def __delattr__(self, name: str) -> None:
        raise _Refused(f"it modifies {self._name}")

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"it modifies {self._name}")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Allows only what a seqtune checkpoint holds: dicts, lists, numbers and strings (which
    need no lookup), ``collections.OrderedDict``, and tensors (replaced by shapes).
    ``storages``: the storages the pickle names, key → dtype and element count."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return _StandIn(f"{module}.{name}", found)
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        what = f"{module}.{name}"
        what = what if len(what) <= 80 else f"{what[:60]}... ({len(what)} characters)"
        raise _Refused(f"it names {what}, which a seqtune checkpoint never holds")

    def persistent_load(self, pid: Any) -> Any:
        # torch.save's storage reference: ('storage', type, key, location, numel)
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and type(pid[1]) is _StorageType
            and type(pid[2]) is str
            and 0 < len(pid[2]) <= 12
            and pid[2].isascii()
            and pid[2].isdigit()
            and type(pid[3]) is str
            and type(pid[4]) is int
            and 0 <= pid[4] <= MAX_NUMEL
        ):
            raise _Refused("an unexpected storage reference")
        storage = _Storage(_STORAGES[pid[1].name], pid[4])
        if self.storages.setdefault(pid[2], storage) != storage:
            raise _Refused("a storage named twice with different types or sizes")
        return storage


def _not_a_model(why: str) -> Invalid:
    return Invalid(
        f"not a seqtune model file: {why}",
        details=[{"field": "file", "reason": f"{why}; {EXPECTED}"}],
    )


_LEAVES = (str, int, float, bool, type(None), TensorShape)


def _walk(obj: Any) -> None:
    """Refuse data over MAX_VALUES values (shared references counted each time they are
    reached) or MAX_DEPTH nested containers, or holding anything but plain data and tensor
    shapes, before anything else touches it (a check, a message, json.dumps)."""
    count = 1
    todo: list[tuple[Any, int]] = [(obj, 0)]
    while todo:
        x, depth = todo.pop()
        t = type(x)
        if t in _LEAVES:
            continue
        if t is collections.OrderedDict:
            t = dict
        elif t is not dict and t is not list and t is not tuple:
            raise _Refused(f"it holds an unexpected {t.__name__.lstrip('_')}")
        if depth >= MAX_DEPTH:
            raise _Refused(f"its data is nested over {MAX_DEPTH} levels deep")
        count += 2 * len(x) if t is dict else len(x)
        if count > MAX_VALUES:
            raise _Refused(f"its data holds over {MAX_VALUES} values")
        if t is dict:
            todo.extend((v, depth + 1) for kv in x.items() for v in kv)
        else:
            todo.extend((v, depth + 1) for v in x)


def _archive(data: bytes) -> tuple[zipfile.ZipFile, str]:
    """The zip archive and its top-level folder, checked as torch.save writes it: entries
    stored (not compressed, not encrypted), each once, all under the folder of its single
    ``data.pkl``, and together no larger than the file."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except Exception:  # zipfile only reads; whatever it raises, this is no torch.save file
        raise _not_a_model("it is not a torch.save file (no zip archive)") from None
    pkls = [i for i in infos if i.filename.endswith("/data.pkl")]
    if len(pkls) != 1 or pkls[0].filename.count("/") != 1:
        raise _not_a_model("the archive holds no single top-level */data.pkl")
    prefix = pkls[0].filename.removesuffix("data.pkl")
    if len(infos) > MAX_ENTRIES:
        raise _not_a_model(f"the archive holds over {MAX_ENTRIES} entries")
    if len({i.filename for i in infos}) != len(infos):
        raise _not_a_model("the archive holds an entry twice")
    if not all(i.filename.startswith(prefix) for i in infos):
        raise _not_a_model(f"the archive holds entries outside its folder {_brief(prefix)}")
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise _not_a_model("the archive's entries are compressed (torch.save stores them)")
        if i.flag_bits & 0x1:
            raise _not_a_model("the archive's entries are encrypted")
    if sum(i.file_size for i in infos) > len(data):
        raise _not_a_model("the archive's entries claim more bytes than the file holds")
    return zf, prefix


def _unpickle(data: bytes) -> Any:
    zf, prefix = _archive(data)
    with zf:
        info = zf.getinfo(prefix + "data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise _not_a_model(f"its data.pkl is over {MAX_PICKLE_BYTES} bytes")
        try:
            with zf.open(info) as fh:
                raw = fh.read(MAX_PICKLE_BYTES + 1)
        except Exception as exc:  # zipfile only reads: a bad CRC, a truncated entry, ...
            why = f"its data.pkl cannot be read ({type(exc).__name__})"
            raise _not_a_model(why) from None
        if len(raw) > MAX_PICKLE_BYTES:
            raise _not_a_model(f"its data.pkl is over {MAX_PICKLE_BYTES} bytes")
        unpickler = _Unpickler(io.BytesIO(raw))
        try:
            obj = unpickler.load()
            _walk(obj)
        except _Refused as exc:
            raise _not_a_model(str(exc)) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, RecursionError, OverflowError, MemoryError) as exc:  # fmt: skip
            why = f"its data.pkl is not a readable pickle ({type(exc).__name__})"
            raise _not_a_model(why) from None
        # Each storage a worker's torch.load reads: a stored record of exactly its size.
        for key, storage in unpickler.storages.items():
            try:
                record = zf.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise _not_a_model(f"the archive lacks the record of storage {key}") from None
            if record.file_size != storage.numel * _ITEMSIZE[storage.dtype]:
                raise _not_a_model(f"the record of storage {key} is not the storage's size")
    return obj


def _int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _model_args(m: Any) -> dict[str, Any]:
    """The checkpoint's ModelArgs, checked: every field present, of its type, in bounds."""
    if not isinstance(m, dict):
        raise _not_a_model("it has no model description ('model')")
    problems = []
    for name in ("hidden_size", "num_layers"):
        hp = HPARAMS[name]
        assert hp.low is not None and hp.high is not None
        if not _int(m.get(name), int(hp.low), int(hp.high)):
            problems.append(
                f"model.{name} {_brief(m.get(name))} is not an integer in [{hp.low:g}, {hp.high:g}]"
            )
    for name in ("n_features", "out_dim"):
        if not _int(m.get(name), 1, 1_000_000):
            problems.append(f"model.{name} {_brief(m.get(name))} is not a positive integer")
    if not isinstance(m.get("bidirectional"), bool):
        problems.append("model.bidirectional is not true or false")
    for name in ("dropout", "head_dropout"):
        v = m.get(name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            problems.append(f"model.{name} is not a number in [0, 1]")
    if not isinstance(m.get("init", "default"), str):
        problems.append("model.init is not a string")
    if problems:
        raise _not_a_model("; ".join(problems))
    keys = ("n_features", "hidden_size", "num_layers", "dropout", "bidirectional")
    return {k: m[k] for k in (*keys, "head_dropout", "out_dim")} | {
        "init": m.get("init", "default")
    }


def expected_shapes(m: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state_dict a model of these ModelArgs has (``worker.model.LSTMModel``): name → shape."""
    h, dirs = m["hidden_size"], 2 if m["bidirectional"] else 1
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(m["num_layers"]):
        width = m["n_features"] if layer == 0 else h * dirs
        for sfx in ("", "_reverse")[:dirs]:
            out[f"lstm.weight_ih_l{layer}{sfx}"] = (4 * h, width)
            out[f"lstm.weight_hh_l{layer}{sfx}"] = (4 * h, h)
            out[f"lstm.bias_ih_l{layer}{sfx}"] = (4 * h,)
            out[f"lstm.bias_hh_l{layer}{sfx}"] = (4 * h,)
    out["head.weight"] = (m["out_dim"], h * dirs)
    out["head.bias"] = (m["out_dim"],)
    return out


def read_checkpoint(data: bytes) -> dict[str, Any]:
    """What a seqtune model file says of itself, read without running anything from it:
    ``format``, ``model`` (ModelArgs: n_features, hidden_size, num_layers, dropout,
    bidirectional, head_dropout, out_dim, init), ``task``, ``features``, ``targets``,
    ``horizon``, ``seq_len`` and ``lineage`` (None, or what it was fine-tuned from). Its weights'
    shapes are checked against its model description, and its storages against its records:
    each tensor is a whole stored record, so that loading it costs no more than the file.

    Raises Invalid (field ``file``) for junk, a torch file that is not a seqtune checkpoint,
    a checkpoint whose parts disagree, or one over the reader's limits (values, nesting,
    lineage size), saying which file is expected; its messages never echo the file's values
    beyond a few characters."""
    obj = _unpickle(data)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise _not_a_model("it is not a checkpoint dictionary with a state_dict")
    if obj.get("format") not in FORMATS:
        raise _not_a_model(f"unknown checkpoint format {_brief(obj.get('format'))}")
    model = _model_args(obj.get("model"))
    if obj.get("task") not in catalog.TASKS:
        raise _not_a_model(f"unknown task {_brief(obj.get('task'))}")
    features, targets = obj.get("features"), obj.get("targets")
    for key, names in (("features", features), ("targets", targets)):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _not_a_model(f"'{key}' is not a list of column names")
    assert isinstance(features, list)
    if len(features) != model["n_features"]:
        raise _not_a_model(
            f"it names {len(features)} feature(s) for a model of {model['n_features']} inputs"
        )
    for key in ("horizon", "seq_len"):
        if not _int(obj.get(key), 1, 10**9):
            raise _not_a_model(f"'{key}' is not a positive integer")
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _not_a_model("its state_dict is not a dictionary of named weights")
    want = expected_shapes(model)
    got = {k: v.shape for k, v in state.items() if isinstance(v, TensorShape)}
    if len(got) != len(state) or got != want:
        wrong = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got.get(k))
        names = ", ".join(_brief(k) for k in wrong[:3])
        raise _not_a_model(f"its weights do not match its model description ({names})")
    lineage = obj.get("lineage")
    if lineage is not None and not isinstance(lineage, dict):
        raise _not_a_model("its lineage is not a dictionary")
    try:
        size = len(json.dumps(lineage, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        raise _not_a_model("its lineage is not plain data") from None
    if size > MAX_LINEAGE_BYTES:
        raise _not_a_model(f"its lineage is over {MAX_LINEAGE_BYTES} bytes as JSON")
    return {
        "format": obj["format"],
        "model": model,
        "task": obj["task"],
        "features": features,
        "targets": targets,
        "horizon": obj["horizon"],
        "seq_len": obj["seq_len"],
        "lineage": lineage,
    }


# ---- the submit-time check ----------------------------------------------------------------------


def check_init(db: Database, *, tenant: str, spec: StudySpec) -> None:
    """Check the study's ``init_from`` against the model it names, and write into ``spec``
    what that model decides, so that the stored spec says exactly what runs:

    - ``init_from.trial: best`` becomes the best trial's number (``studies.best_trial``);
    - ``hidden_size``, ``num_layers`` and ``bidirectional`` that the study neither searches
      nor fixes are fixed to the model's values (taken out of a search space seqtune chose
      for a study that named none).

    The source must exist (a study of the tenant whose trial has a saved model, or an
    uploaded model); the task must match; the number of input columns must match where the
    dataset's columns are known; the shape parameters must not be searched nor fixed to
    other values; ``freeze_layers`` may not exceed the model's layers. A different output
    size (horizon × targets, classes) is fine: the trials train a new head.

    Raises Invalid listing every problem as ``{field, reason}``. Does nothing without
    ``init_from``."""
    init = spec.init_from
    if init is None:
        return
    errors: list[dict[str, str]] = []
    found = _source(db, tenant, init, errors)
    if found is not None:
        task, model = found
        _check_fit(db, tenant, spec, task, model, errors)
    if errors:
        raise Invalid(
            f"init_from does not fit this study: {len(errors)} problem(s)", details=errors
        )


def _source(
    db: Database, tenant: str, init: InitFrom, errors: list[dict[str, str]]
) -> tuple[str, dict[str, Any]] | None:
    """The source model's task and ModelArgs; resolves ``trial: best`` in ``init``."""
    if init.model is not None:
        meta = db.read(
            lambda c: c.execute(
                select(Model.meta).where(Model.id == init.model, Model.tenant == tenant)
            ).scalar_one_or_none()
        )
        if meta is None:
            errors.append(
                {
                    "field": "init_from.model",
                    "reason": f"no uploaded model '{init.model}'; " + hint("upload_model"),
                }
            )
            return None
        return meta["task"], meta["model"]
    assert init.study is not None  # InitFrom holds a study or a model
    try:
        task = studies.get_study(db, tenant=tenant, name=init.study).task
    except NotFound:
        errors.append(
            {
                "field": "init_from.study",
                "reason": f"no study named '{init.study}'; " + hint("list_studies"),
            }
        )
        return None
    if init.trial == "best":
        try:
            init.trial = studies.best_trial(db, tenant=tenant, name=init.study).number
        except (NotFound, Conflict) as exc:
            errors.append({"field": "init_from.trial", "reason": exc.message})
            return None
    return _trial_model(db, tenant, init.study, init.trial, task, errors)


def _trial_model(
    db: Database, tenant: str, study: str, number: int, task: str, errors: list[dict[str, str]]
) -> tuple[str, dict[str, Any]] | None:
    """The task and ModelArgs of trial ``number``'s saved model: from the trial's info (its
    worker records them), else read from the model itself (trials from before that)."""
    q = (
        select(Trial.state, Trial.info, Checkpoint.size_bytes)
        .select_from(Study)
        .join(Trial, Trial.study_id == Study.id)
        .outerjoin(Checkpoint, and_(Checkpoint.trial_id == Trial.id, Checkpoint.kind == "best"))
        .where(Study.tenant == tenant, Study.name == study, Trial.number == number)
    )
    row = db.read(lambda c: c.execute(q).one_or_none())
    field = "init_from.trial"
    if row is None:
        errors.append({"field": field, "reason": f"study '{study}' has no trial {number}"})
        return None
    if row.size_bytes is None:
        errors.append(
            {
                "field": field,
                "reason": f"trial {number} of '{study}' has no saved model (state {row.state}; "
                "models are kept for completed trials)",
            }
        )
        return None
    model = (row.info or {}).get("model")
    if not isinstance(model, dict):
        data = trials.model_checkpoint(db, tenant=tenant, name=study, number=number).data
        model = read_checkpoint(data)["model"]
    return task, model


def _inputs(db: Database, tenant: str, spec: StudySpec) -> list[str] | None:
    """The study's input columns where the submit knows them, chosen as
    ``worker.preprocessing.prepare`` chooses them: the spec's features, else every numeric
    column (less the label when classifying)."""
    if spec.features:
        return list(spec.features)
    ds = spec.dataset
    if isinstance(ds, BuiltinData):
        info = catalog.BUILTIN.get(ds.name)
        numeric = list(info.columns) if info else None
    elif isinstance(ds, SyntheticData):
        known = ds.generator in catalog.SYNTHETIC
        numeric = list(catalog.synthetic_columns(ds.generator, ds.options)) if known else None
    else:
        try:
            cols = datasets.get_dataset(db, tenant=tenant, dataset_id=ds.id).columns
        except NotFound:
            return None
        numeric = [c["name"] for c in cols if c.get("type") == "numeric"]
    if numeric is None:
        return None
    if spec.task == "classify":
        label = (spec.target or ["label"])[0]
        numeric = [c for c in numeric if c != label]
    return numeric


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # True is not 1


def _check_fit(
    db: Database,
    tenant: str,
    spec: StudySpec,
    task: str,
    model: dict[str, Any],
    errors: list[dict[str, str]],
) -> None:
    if task != spec.task:
        errors.append(
            {
                "field": "task",
                "reason": f"the init_from model is a {task} model; this study's task is "
                f"{spec.task}",
            }
        )
    inputs = _inputs(db, tenant, spec)
    if inputs is not None and len(inputs) != model["n_features"]:
        errors.append(
            {
                "field": "features" if spec.features else "dataset",
                "reason": f"the study's inputs are {len(inputs)} column(s) {inputs}; the "
                f"init_from model takes {model['n_features']}",
            }
        )
    for name in SHAPE_PARAMS:
        want = model[name]
        if name in spec.search_space and spec.space_defaulted:
            del spec.search_space[name]  # seqtune's choice, not the study's: the model decides
        if name in spec.search_space:
            errors.append(
                {
                    "field": f"search_space.{name}",
                    "reason": f"must be fixed to the init_from model's {name} ({want!r}): "
                    f"remove it from search_space",
                }
            )
        elif name in spec.fixed and not _same(spec.fixed[name], want):
            errors.append(
                {
                    "field": f"fixed.{name}",
                    "reason": f"is {spec.fixed[name]!r}, the init_from model's is {want!r}; "
                    "leave it out or fix it to that",
                }
            )
        else:
            spec.fixed[name] = want
    layers = model["num_layers"]
    over = f"is more than the init_from model's {layers} LSTM layer(s)"
    dist = spec.search_space.get("freeze_layers")
    if isinstance(dist, IntRange) and dist.high > layers:
        errors.append({"field": "search_space.freeze_layers.high", "reason": f"{dist.high} {over}"})
    elif isinstance(dist, Categorical):
        for i, v in enumerate(dist.choices):
            if isinstance(v, int) and v > layers:
                field = f"search_space.freeze_layers.choices[{i}]"
                errors.append({"field": field, "reason": f"{v} {over}"})
    frozen = spec.fixed.get("freeze_layers")
    if isinstance(frozen, int) and frozen > layers:
        errors.append({"field": "fixed.freeze_layers", "reason": f"{frozen} {over}"})


# ---- the worker's side ----------------------------------------------------------------------


class Source(NamedTuple):
    """A starting model's bytes and what the new model's lineage calls it."""

    data: bytes
    ref: dict[str, Any]  # {"study", "trial"} or {"model", "name"}


def load_source(db: Database, *, tenant: str, init: InitFrom) -> Source:
    """The bytes of the model ``init`` names (the source trial's saved model, or the upload).
    Raises NotFound or Conflict when it is gone (the study, trial or upload was deleted)."""
    if init.model is not None:

        def read(c: Connection) -> tuple[str, bytes] | None:
            row = c.execute(
                select(Model.name, Model.content).where(
                    Model.id == init.model, Model.tenant == tenant
                )
            ).one_or_none()
            return None if row is None else (row.name, bytes(row.content))

        found = db.read(read)
        if found is None:
            raise NotFound(f"the uploaded model '{init.model}' no longer exists")
        return Source(found[1], {"model": init.model, "name": found[0]})
    assert init.study is not None
    number = None if init.trial == "best" else init.trial
    m = trials.model_checkpoint(db, tenant=tenant, name=init.study, number=number)
    return Source(m.data, {"study": init.study, "trial": m.number})
