"""The everyday verbs against a real `seqtune serve` (Postgres, auth on): `trial` with its
learning curve in the terminal and as a PNG, `delete` with its confirmation, `datasets
delete` by name, and the path of issue 17 (upload, reference by name, run, look, delete)
with no message that points at a REST call."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import yaml
from fastapi.testclient import TestClient

from seqtune.cli import main
from service.store.db import Database
from tests.conftest import run_trial, study_body

CSV = "date,load,temp\n" + "".join(f"2024-01-{d:02d},{1 + d % 5}.5,{d % 7}\n" for d in range(1, 29))


@pytest.fixture
def cli(
    live: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """``cli(*args)``: run `seqtune ARGS` in this process against the served API: (exit
    code, stdout, stderr)."""
    base, key = live
    monkeypatch.setenv("SEQTUNE_URL", base)
    monkeypatch.setenv("SEQTUNE_API_KEY", key)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


class _Terminal(io.StringIO):
    """Standard input typed at a terminal."""

    def isatty(self) -> bool:
        return True


def _no_rest(text: str) -> None:
    assert "/v1/" not in text and "?force" not in text and "PATCH" not in text, text


def test_trial_shows_params_state_and_the_curve(
    cli: Any, client: TestClient, auth: dict[str, str], db: Database, tmp_path: Path
) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study_body("s", budget={"n_trials": 3})))
    assert cli("submit", str(tmp_path / "s.yaml"))[0] == 0
    storage = client.app.state.seqtune.storage  # type: ignore[attr-defined]
    n = run_trial(db, storage, client, auth, "s", 2.5, epochs=6)

    code, out, err = cli("trial", "s", str(n))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"trial {n} of s: COMPLETE (max_epochs)")
    assert "val_rmse=2.5" in lines[0]
    assert "1 attempt(s)" in lines[1] and "6 epoch(s)" in lines[1]
    assert any(line.split()[:1] == ["hidden_size"] for line in lines)  # the params table
    assert "test metrics: test_rmse=2.75" in out
    # the chart: 12 rows of 60 columns between the axes, then the x axis and the legend
    start = lines.index("learning curve (6 epochs):") + 1
    plot = lines[start : start + 12]
    assert all(line.count("|") == 2 for line in plot)
    assert all(len(line.split("|")[1]) == 60 for line in plot)
    assert "*" in "".join(plot) and "o" in "".join(plot)
    assert lines[start + 12].strip() == "+" + "-" * 60 + "+"
    assert "* train_loss (left" in out and "o val_loss (right)" in out  # no val_rmse recorded

    png = tmp_path / "curve.png"
    code, out, err = cli("trial", "s", str(n), "--png", str(png))
    assert code == 0, err
    img = matplotlib.image.imread(io.BytesIO(png.read_bytes()), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 100

    code, out, err = cli("trial", "s", "99")
    assert code == 3 and "has no trial 99" in err
    code, out, err = cli("trial", "nope", "0")
    assert code == 3 and "`seqtune studies`" in err
    _no_rest(err)


def test_png_without_matplotlib_names_the_extra(
    cli: Any, client: TestClient, auth: dict[str, str], db: Database, monkeypatch: Any
) -> None:
    client.post("/v1/studies", json=study_body("s"), headers=auth)
    storage = client.app.state.seqtune.storage  # type: ignore[attr-defined]
    n = run_trial(db, storage, client, auth, "s", 1.0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    code, out, err = cli("trial", "s", str(n), "--png", "x.png")
    assert code == 2
    assert err.strip() == (
        "seqtune trial --png needs the server extra: pip install 'seqtune[server]'"
    )


def test_delete_asks_on_a_terminal_and_refuses_without_one(
    cli: Any, client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client.post("/v1/studies", json=study_body("s"), headers=auth)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # a pipe, not a terminal
    code, out, err = cli("delete", "s")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--yes" in err
    assert client.get("/v1/studies/s", headers=auth).status_code == 200

    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, out, err = cli("delete", "s")
    assert code == 1 and "kept 's'" in err
    assert client.get("/v1/studies/s", headers=auth).status_code == 200

    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, out, err = cli("delete", "s")
    assert code == 0 and "deleted study 's'" in err
    assert client.get("/v1/studies/s", headers=auth).status_code == 404

    code, out, err = cli("delete", "s", "--yes")
    assert code == 3 and "no study named 's'" in err
    _no_rest(err)

    # --yes only skips the question: the service's own checks still hold, --force overrides
    # them. A study another one fine-tunes from is not deleted under it.
    client.post("/v1/studies", json=study_body("src"), headers=auth)
    tenant = client.get("/v1/studies/src", headers=auth).json()["tenant"]
    from seqtune.spec import parse_spec
    from service.store import studies

    state = client.app.state.seqtune  # type: ignore[attr-defined]
    spec = parse_spec(study_body("ft", init_from={"study": "src", "trial": 0}))
    studies.create_study(state.db, state.storage, tenant=tenant, spec=spec)
    code, out, err = cli("delete", "src", "--yes")
    assert code == 5 and "['ft']" in err, err
    code, out, err = cli("delete", "src", "--force")
    assert code == 0, err


def test_the_new_users_path_names_no_rest_call(
    cli: Any, client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "load.csv").write_text(CSV)
    code, out, err = cli("datasets", "upload", str(tmp_path / "load.csv"), "--name", "weather")
    assert code == 0, err
    code, out, err = cli("datasets", "upload", str(tmp_path / "load.csv"), "--name", "weather")
    assert code == 5 and "already have a dataset named 'weather'" in err
    _no_rest(err)

    study = study_body("w", dataset={"kind": "uploaded", "id": "weather"}, target="load")
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(study))
    code, out, err = cli("submit", str(tmp_path / "w.yaml"))
    assert code == 2
    assert "write `name: weather` instead of `id:`" in err
    assert "target must be a list of column names" in err
    study["dataset"], study["target"] = {"kind": "uploaded", "name": "weather"}, ["load"]
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(study))
    code, out, err = cli("submit", str(tmp_path / "w.yaml"))
    assert code == 0 and out.strip() == "w", err

    code, out, err = cli("datasets", "delete", "weather")
    assert code == 5 and "'w' (running)" in err and "`seqtune stop NAME`" in err
    _no_rest(err)
    assert cli("stop", "w")[0] == 0
    code, out, err = cli("datasets", "delete", "weather")
    assert code == 5 and "'w' (stopped)" in err and "--force" in err
    _no_rest(err)
    code, out, err = cli("datasets", "delete", "weather", "--force")
    assert code == 0 and "deleted dataset 'weather'" in err
    assert "weather" not in cli("datasets", "list")[1]
    code, out, err = cli("datasets", "delete", "weather")
    assert code == 3 and "`seqtune datasets list`" in err
    _no_rest(err)

    code, out, err = cli("delete", "w", "--force")
    assert code == 0
    code, out, err = cli("status", "w")
    assert code == 3 and "`seqtune studies`" in err
    _no_rest(err)
