"""Fine-tuning from an earlier model (``init_from``, ``freeze_layers``, ``/v1/models``).

End to end through the REST API and a real worker slot on Postgres: a study pretrained on one
synthetic series, a study fine-tuned from its best trial on a related series with
``freeze_layers`` searched, the lineage in GET of a trial and in the downloaded model, and the
downloaded model re-uploaded and started from. Then the submit-time 422s, the model file
reader (junk and foreign pickles refused, never run), and the engine's freezing.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import signal
import zipfile
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from fastapi.testclient import TestClient

from seqtune.client import Client
from seqtune.errors import Invalid
from seqtune.spec import StudySpec, SyntheticData
from service.settings import Settings
from service.store import leases
from service.store.db import Database
from service.store.lineage import read_checkpoint
from service.store.optuna import make_storage, optuna_study
from worker import datasets
from worker.checkpoints import encode
from worker.engine import Hyper, InitModel, TrainConfig, make_checkpoint, train
from worker.model import LSTMModel, ModelArgs
from worker.preprocessing import DataError, prepare
from worker.slot import Slot, SlotConfig

F = (0.7, 0.15, 0.15)


def sine(seed: int, **over: Any) -> dict[str, Any]:
    return {"kind": "synthetic", "generator": "sine", "n_points": 400, "seed": seed, **over}


def body(name: str, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "dataset": sine(1),
        "search_space": {"lr": {"type": "float", "low": 3e-3, "high": 1e-2, "log": True}},
        "fixed": {"hidden_size": 8, "num_layers": 2, "seq_len": 12, "max_epochs": 3},
        "pruner": {"name": "none"},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 1},
    }
    out.update(over)
    return out


def work(settings: Settings, slot: int) -> int:
    """A worker slot in this process until no study has work left (each run of one test
    a slot of its own: a slot's id is the host, the process and the slot number)."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return Slot(SlotConfig(slot=slot, burst=True, threads=1), settings).run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def post(client: TestClient, auth: dict, spec: dict[str, Any]) -> Any:
    return client.post("/v1/studies", json=spec, headers=auth)


def fields_of(r: Any) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {d["field"]: d["reason"] for d in r.json()["error"]["details"]}


def test_pretrain_then_fine_tune_end_to_end(
    client: TestClient, auth: dict, key: str, settings: Settings, tmp_path: Path
) -> None:
    assert post(client, auth, body("pre")).status_code == 201
    assert work(settings, 0) == 1
    pre_model = client.get("/v1/studies/pre/best/model", headers=auth).content

    # A related series (another seed of the generator); the model's shape is left out and
    # freeze_layers searched: the stored spec fixes the shape to the model's.
    ft = body(
        "ft",
        dataset=sine(2),
        init_from={"study": "pre", "trial": "best"},
        search_space={"freeze_layers": {"type": "categorical", "choices": [0, 2]}},
        fixed={"seq_len": 12, "max_epochs": 3},
        sampler={"name": "grid"},
        budget={"n_trials": 2},
    )
    r = post(client, auth, ft)
    assert r.status_code == 201, r.text
    stored = r.json()["spec"]
    assert stored["init_from"] == {"study": "pre", "trial": 0, "model": None}
    assert {k: stored["fixed"][k] for k in ("hidden_size", "num_layers", "bidirectional")} == {
        "hidden_size": 8,
        "num_layers": 2,
        "bidirectional": False,
    }
    assert work(settings, 1) == 2

    pre = torch.load(io.BytesIO(pre_model), weights_only=True)["state_dict"]
    for number in (0, 1):
        t = client.get(f"/v1/studies/ft/trials/{number}", headers=auth).json()
        assert t["state"] == "COMPLETE", t
        k = t["params"]["freeze_layers"]
        assert t["info"]["lineage"] == {
            "study": "pre",
            "trial": 0,
            "frozen_layers": k,
            "head": "loaded",
            "parent": None,
        }
        data = client.get(f"/v1/studies/ft/trials/{number}/model", headers=auth).content
        ckpt = torch.load(io.BytesIO(data), weights_only=True)
        assert ckpt["lineage"] == t["info"]["lineage"]
        for name, w in ckpt["state_dict"].items():
            frozen = name.startswith("lstm.") and int(name.split("_l")[1][0]) < k
            assert torch.equal(w, pre[name]) == frozen, (k, name)

    # The downloaded model, uploaded again, starts a study with another horizon: new head.
    path = tmp_path / "ft-best.pt"
    path.write_bytes(client.get("/v1/studies/ft/best/model", headers=auth).content)
    up = Client(key=key, http=client).upload_model(path, name="ft-best")
    assert up.meta["model"]["hidden_size"] == 8 and up.meta["lineage"]["study"] == "pre"
    assert client.get(f"/v1/models/{up.id}", headers=auth).json()["name"] == "ft-best"
    assert [m["id"] for m in client.get("/v1/models", headers=auth).json()["items"]] == [up.id]
    ft2 = body(
        "ft2",
        dataset=sine(3),
        horizon=2,
        init_from={"model": up.id},
        fixed={"seq_len": 12, "max_epochs": 2, "freeze_layers": 1},
    )
    assert post(client, auth, ft2).status_code == 201
    r = client.delete(f"/v1/models/{up.id}", headers=auth)
    assert r.status_code == 409 and "ft2" in r.json()["error"]["message"]
    assert work(settings, 2) == 1
    t = client.get("/v1/studies/ft2/trials/0", headers=auth).json()
    assert t["state"] == "COMPLETE", t
    lineage = t["info"]["lineage"]
    assert lineage["model"] == up.id and lineage["name"] == "ft-best"
    assert lineage["frozen_layers"] == 1 and lineage["head"] == "new"
    assert lineage["parent"] == up.meta["lineage"]  # the chain back to "pre"
    assert client.get("/v1/studies/ft2", headers=auth).json()["status"] == "completed"
    assert client.delete(f"/v1/models/{up.id}", headers=auth).status_code == 204


def _source(
    db: Database, settings: Settings, client: TestClient, auth: dict, *, layers: int = 2
) -> bytes:
    """Study 'src' with one completed trial whose saved model is a 1-input forecaster of
    ``layers`` x 8 units, stored as a worker stores it (no trial info: the submit check reads
    the model itself)."""
    assert post(client, auth, body("src")).status_code == 201
    frame = datasets.generate(SyntheticData.model_validate(sine(1)))
    data = prepare(frame, task="forecast", seq_len=12, horizon=1, fractions=F)
    model = LSTMModel(ModelArgs(1, 8, layers, 0.0, False, 0.0, 1))
    blob = encode(make_checkpoint(model, data, Hyper(hidden_size=8, num_layers=layers)))
    storage = make_storage(settings)
    c = leases.claim(db, storage, owner="test", studies=["src"])
    assert c is not None
    ostudy = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
    leases.finish(db, ostudy=ostudy, claim=c, state="COMPLETE", values=[1.0], model=blob)
    return blob


def test_submit_checks_the_model_and_answers_422(
    client: TestClient, auth: dict, db: Database, settings: Settings
) -> None:
    blob = _source(db, settings, client, auth)
    src = {"study": "src", "trial": "best"}

    def ft(**over: Any) -> dict[str, Any]:
        return body("ft", init_from=src, fixed={"seq_len": 12, "max_epochs": 2}) | over

    searched = {"hidden_size": {"type": "int", "low": 4, "high": 16}}
    got = fields_of(post(client, auth, ft(search_space=searched)))
    reason = got["search_space.hidden_size"]
    assert "must be fixed to the init_from model's hidden_size (8)" in reason
    got = fields_of(post(client, auth, ft(fixed={"num_layers": 3, "hidden_size": 8})))
    assert set(got) == {"fixed.num_layers"} and "model's is 2" in got["fixed.num_layers"]
    # every problem at once
    got = fields_of(post(client, auth, ft(search_space=searched, fixed={"num_layers": 1})))
    assert set(got) == {"search_space.hidden_size", "fixed.num_layers"}

    three = sine(1) | {"generator": "ar", "options": {"n_series": 3}}
    got = fields_of(post(client, auth, ft(dataset=three)))
    assert "3 column(s)" in got["dataset"] and "takes 1" in got["dataset"]
    got = fields_of(post(client, auth, ft(dataset=three, features=["x0", "x2"])))
    assert "2 column(s)" in got["features"]
    assert post(client, auth, ft(dataset=three, features=["x1"])).status_code == 201
    client.delete("/v1/studies/ft?force=true", headers=auth)

    got = fields_of(post(client, auth, ft(init_from={"study": "nope"})))
    assert "no study named 'nope'" in got["init_from.study"]
    got = fields_of(post(client, auth, ft(init_from={"study": "src", "trial": 7})))
    assert "no trial 7" in got["init_from.trial"]
    got = fields_of(post(client, auth, ft(init_from={"model": "ab" * 16})))
    assert "POST /v1/models" in got["init_from.model"]
    parity = {"kind": "synthetic", "generator": "parity", "n_points": 400}
    got = fields_of(post(client, auth, ft(task="classify", dataset=parity, search_space={})))
    assert "forecast model" in got["task"]

    deep = {"freeze_layers": {"type": "int", "low": 0, "high": 3}}
    got = fields_of(post(client, auth, ft(search_space=deep)))
    assert "more than the init_from model's 2" in got["search_space.freeze_layers.high"]
    got = fields_of(post(client, auth, ft(fixed={"freeze_layers": 4})))
    assert set(got) == {"fixed.freeze_layers"}

    # Junk and foreign files are refused at upload, saying what is expected.
    for junk in (b"hello", _zip_pickle({"a": 1}), encode({"weights": torch.zeros(3)})):
        r = client.post("/v1/models", files={"file": ("m.pt", junk)}, headers=auth)
        assert r.status_code == 422 and "seqtune model" in r.json()["error"]["message"], r.text
        assert "GET /v1/studies/{name}" in r.json()["error"]["details"][0]["reason"]

    # A study that names no search space: seqtune's default one, less the model's shape.
    r = post(client, auth, {"name": "dflt", "dataset": sine(2), "init_from": src})
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["fixed"]["hidden_size"] == 8 and spec["fixed"]["num_layers"] == 2
    assert "hidden_size" not in spec["search_space"] and "lr" in spec["search_space"]
    assert read_checkpoint(blob)["model"]["num_layers"] == 2


class _Boom:
    def __reduce__(self) -> Any:
        import os

        return (os.system, ("touch /tmp/seqtune-finetune-pwned",))


def _zip_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def test_the_reader_never_runs_the_file(tmp_path: Path) -> None:
    marker = Path("/tmp/seqtune-finetune-pwned")
    marker.unlink(missing_ok=True)
    for evil in (_zip_pickle(_Boom()), _zip_pickle({"state_dict": {"x": _Boom()}})):
        with pytest.raises(Invalid, match="os.system|posix.system"):
            read_checkpoint(evil)
    assert not marker.exists()
    # A checkpoint whose weights disagree with its description is refused too.
    model = LSTMModel(ModelArgs(1, 8, 1, 0.0, False, 0.0, 1))
    ckpt = {
        "format": 2,
        "state_dict": model.state_dict(),
        "model": {**model.args.to_dict(), "hidden_size": 16},
        "task": "forecast",
        "features": ["y"],
        "targets": ["y"],
        "horizon": 1,
        "seq_len": 8,
    }
    with pytest.raises(Invalid, match="do not match its model description"):
        read_checkpoint(encode(ckpt))
    ckpt["model"]["hidden_size"] = 8
    assert read_checkpoint(encode(ckpt))["lineage"] is None


@pytest.fixture(scope="module")
def series() -> Any:
    frame = datasets.generate(SyntheticData.model_validate(sine(1)))
    return prepare(frame, task="forecast", seq_len=12, horizon=1, fractions=F)


def test_frozen_layers_keep_their_weights_and_the_rest_trains(series: Any) -> None:
    torch.set_num_threads(1)
    hp = Hyper(hidden_size=8, num_layers=2, max_epochs=2, lr=1e-2)
    pre = train(TrainConfig(hp=hp), series)
    assert pre.checkpoint is not None and pre.lineage is None
    init = InitModel(pre.checkpoint, {"study": "pre", "trial": 0})
    start = pre.checkpoint["state_dict"]

    def frozen_and_trained(ckpt: dict[str, Any], k: int) -> None:
        for name, w in ckpt["state_dict"].items():
            frozen = name.startswith("lstm.") and int(name.split("_l")[1][0]) < k
            assert torch.equal(w, start[name]) == frozen, (k, name)

    r = train(TrainConfig(hp=dataclasses.replace(hp, freeze_layers=1)), series, init=init)
    assert r.checkpoint is not None and r.lineage is not None
    assert r.lineage == {**init.source, "frozen_layers": 1, "head": "loaded", "parent": None}
    frozen_and_trained(r.checkpoint, 1)

    # Interrupted after its first epoch and resumed from the snapshot: still frozen.
    snaps: list[dict[str, Any]] = []
    hp1 = dataclasses.replace(hp, freeze_layers=1, max_epochs=3)
    cut = train(
        TrainConfig(hp=hp1),
        series,
        init=init,
        on_snapshot=snaps.append,
        should_stop=lambda: True,
    )
    assert cut.reason == "interrupted" and len(snaps) == 1
    done = train(TrainConfig(hp=hp1), series, init=init, resume=snaps[0])
    assert done.reason == "max_epochs" and done.checkpoint is not None
    frozen_and_trained(done.checkpoint, 1)

    # Another output size: the LSTM loads, the head is new.
    two = prepare(series_frame(), task="forecast", seq_len=12, horizon=2, fractions=F)
    r = train(TrainConfig(hp=hp), two, init=init)
    assert r.lineage is not None and r.lineage["head"] == "new"
    # Another LSTM shape: a clear error (the trial fails with reason data_error).
    with pytest.raises(DataError, match="hidden_size 8 there, 16 here"):
        train(TrainConfig(hp=Hyper(hidden_size=16, num_layers=2, max_epochs=1)), series, init=init)
    with pytest.raises(DataError, match="freeze_layers=3"):
        train(TrainConfig(hp=dataclasses.replace(hp, freeze_layers=3)), series, init=init)


def series_frame() -> Any:
    return datasets.generate(SyntheticData.model_validate(sine(1)))


def test_run_optuna_takes_an_init_model(series: Any, tmp_path: Path) -> None:
    """The notebook path: a downloaded model file, through run_optuna."""
    from seqtune.spec import parse_spec
    from worker.runner import run_optuna

    pre = train(TrainConfig(hp=Hyper(hidden_size=8, max_epochs=1)), series)
    assert pre.checkpoint is not None
    path = tmp_path / "m.pt"
    path.write_bytes(encode(pre.checkpoint))
    spec = parse_spec(
        body("nb", init_from={"model": "ab"}, fixed={"hidden_size": 8, "max_epochs": 1})
    )
    trial = optuna.create_study().ask()
    r = run_optuna(spec, trial, series_frame(), init=InitModel.from_file(path))
    assert r.lineage == {"file": "m.pt", "frozen_layers": 0, "head": "loaded", "parent": None}


def test_cli_models_upload_and_list(live: tuple[str, str], tmp_path: Path, series: Any) -> None:
    """`seqtune models upload FILE --name N` prints the id a study's init_from names;
    `seqtune models list` shows it; a file that is not a model exits 2 saying why."""
    import json
    import os
    import subprocess

    from tests.conftest import seqtune_cmd

    base, key = live
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env |= {"SEQTUNE_URL": base, "SEQTUNE_API_KEY": key}

    def st(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*seqtune_cmd(), "models", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    model = LSTMModel(ModelArgs(1, 8, 2, 0.0, False, 0.0, 1))
    path = tmp_path / "pre.pt"
    path.write_bytes(encode(make_checkpoint(model, series, Hyper(hidden_size=8, num_layers=2))))
    r = st("upload", str(path), "--name", "pre")
    assert r.returncode == 0, r.stderr
    model_id = r.stdout.strip()
    assert "2 layer(s) x 8 units on 1 input(s)" in r.stderr
    listed = st("list")
    assert model_id in listed.stdout and "pre" in listed.stdout
    items = json.loads(st("list", "--json").stdout)["items"]
    assert [m["id"] for m in items] == [model_id]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    r = st("upload", str(junk))
    assert r.returncode == 2 and "not a seqtune model file" in r.stderr
