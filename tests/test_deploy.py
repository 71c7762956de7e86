"""The cluster deployments: the Kubernetes base in deploy/k8s (rendered with `kubectl kustomize`,
validated against the Kubernetes schemas and KEDA's CRDs), the KEDA queue-depth query run on
real Postgres, and the Slurm job array in deploy/slurm (its directives, and that the batch
shell's SIGTERM reaches `seqtune worker`)."""

from __future__ import annotations

import base64
import copy
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import optuna
import pytest
import yaml

from seqtune.cli import build_parser
from seqtune.spec import StudySpec, check_spec, parse_spec
from service.settings import Settings
from service.store import leases, recovery, studies, trials
from service.store.db import Database
from service.store.optuna import make_storage, optuna_study
from service.store.tables import utcnow

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
CRDS = K8S / "crds"
QUERY_FILE = K8S / "queue-depth.sql"
SBATCH = ROOT / "deploy" / "slurm" / "seqtune-workers.sbatch"
# The oldest Kubernetes the manifests must work on; kubernetes-validate bundles its schemas.
K8S_VERSION = "1.30"

Doc = dict[str, Any]


# -- rendering -----------------------------------------------------------------------------------
def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("kubectl is missing under CI=true (.ci/run installs it)")
        pytest.skip("kubectl is not installed")
    return exe


def render(path: Path) -> list[Doc]:
    """`kubectl kustomize path` (kustomize built into kubectl; no cluster needed), parsed."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return render(K8S)


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} rendered"
    return found[0]


def container(deployment_or_job: Doc, name: str) -> Doc:
    spec = deployment_or_job["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def env_of(c: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# -- schema validation ---------------------------------------------------------------------------
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind)`` -> the openAPIV3Schema of each served version of the vendored
    KEDA CRDs, made strict as the API server's field validation is (kubectl apply refuses
    unknown fields): every object with declared properties admits no others."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{group}/{v['name']}", kind)] = strict(v["schema"]["openAPIV3Schema"])
    return out


def strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        s["additionalProperties"] = False
    return s


def validate(doc: Doc, crds: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Raise (jsonschema's ValidationError) unless ``doc`` fits its schema: KEDA's CRD for
    keda.sh kinds, the Kubernetes schemas of K8S_VERSION (strict) for the rest."""
    if doc["apiVersion"].startswith("keda.sh/"):
        key = (doc["apiVersion"], doc["kind"])
        assert key in crds, f"no vendored CRD serves {key}"
        jsonschema.Draft7Validator(crds[key]).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_rendered_object_fits_its_schema(base: list[Doc]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in base)
    assert [k for k, _ in kinds] == [
        "Deployment",
        "Deployment",
        "Job",
        "Namespace",
        "PodDisruptionBudget",
        "PodDisruptionBudget",
        "ScaledObject",
        "Secret",
        "Service",
        "TriggerAuthentication",
    ]  # and no ConfigMap: the query's is a build-time input (local-config), never applied
    crds = crd_schemas()
    assert {k for _, k in crds} == {"ScaledObject", "TriggerAuthentication"}
    for doc in base:
        validate(doc, crds)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "seqtune"


@pytest.mark.parametrize(
    ("kind", "name", "breaks"),
    [
        # a misspelt field, as the API server's strict validation refuses it
        (
            "Deployment",
            "seqtune-worker",
            lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=600),
        ),
        # a wrong type
        ("Service", "seqtune-api", lambda d: d["spec"]["ports"][0].update(port="http")),
        ("PodDisruptionBudget", "seqtune-worker", lambda d: d["spec"].update(maxUnavaliable=1)),
        ("ScaledObject", "seqtune-worker", lambda d: d["spec"].update(minReplicaCount="zero")),
        ("ScaledObject", "seqtune-worker", lambda d: d["spec"].update(minReplicas=0)),
        ("ScaledObject", "seqtune-worker", lambda d: d["spec"]["triggers"][0].pop("type")),
        (
            "ScaledObject",
            "seqtune-worker",
            lambda d: d["spec"]["triggers"][0]["metadata"].update(targetQueryValue=2),
        ),  # KEDA's metadata values are strings
        (
            "TriggerAuthentication",
            "seqtune-keda-postgres",
            lambda d: d["spec"]["secretTargetRef"][0].pop("parameter"),
        ),
    ],
)
def test_validation_refuses_a_broken_copy(
    base: list[Doc], kind: str, name: str, breaks: Any
) -> None:
    crds = crd_schemas()
    doc = one(base, kind, name)
    validate(doc, crds)  # the real one passes
    broken = copy.deepcopy(doc)
    breaks(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, crds)


# -- what the objects say ------------------------------------------------------------------------
def test_the_scaled_objects_query_is_the_sql_file(base: list[Doc]) -> None:
    so = one(base, "ScaledObject", "seqtune-worker")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["metadata"]["query"] == QUERY_FILE.read_text()


def test_keda_scales_the_workers_to_zero_by_slots_per_pod(base: list[Doc]) -> None:
    so = one(base, "ScaledObject", "seqtune-worker")
    worker = one(base, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    assert worker["metadata"]["name"] == "seqtune-worker"
    assert "replicas" not in worker["spec"]  # KEDA's to set; an apply must not reset it
    assert so["spec"]["minReplicaCount"] == 0
    assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]  # the CRD's CEL rule
    meta = so["spec"]["triggers"][0]["metadata"]
    assert meta["activationTargetQueryValue"] == "0"  # any demand wakes a pod from zero
    # pods = ceil(slots wanted / target): the target is the trials one pod runs at once.
    c = container(worker, "worker")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert meta["targetQueryValue"] == env_of(c)["SLOTS_PER_GPU"]
    # The scaler authenticates with the Secret the kustomization renders (hashed name).
    auth = one(
        base, "TriggerAuthentication", so["spec"]["triggers"][0]["authenticationRef"]["name"]
    )
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection"
    secret = one(base, "Secret", ref["name"])
    assert ref["key"] in secret["data"]


def seqtune_args(c: Doc) -> list[str]:
    """The container's command line with $(VAR) expanded from its env, as the kubelet does."""
    env = env_of(c)
    args = [re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)]), a) for a in c["args"]]
    assert args[0] == "seqtune"
    return args[1:]


def test_containers_run_real_seqtune_commands_on_the_secrets_database(base: list[Doc]) -> None:
    parser = build_parser()
    secret = one(base, "Secret")
    expected = {
        ("Job", "seqtune-migrate", "migrate"): ["db", "upgrade"],
        ("Deployment", "seqtune-api", "api"): ["serve"],
        ("Deployment", "seqtune-worker", "worker"): ["worker"],
    }
    for (kind, name, cname), verb in expected.items():
        c = container(one(base, kind, name), cname)
        args = seqtune_args(c)
        assert args[: len(verb)] == verb
        parser.parse_args(args)  # exits (fails the test) on an unknown option
        url = env_of(c)["SEQTUNE_DATABASE_URL"]["secretKeyRef"]
        assert url == {"name": secret["metadata"]["name"], "key": "url"}
    assert base64.b64decode(secret["data"]["url"]).startswith(b"postgresql://")
    api_env = env_of(container(one(base, "Deployment", "seqtune-api"), "api"))
    assert api_env["SEQTUNE_MIGRATE_ON_START"] == "false"  # the Job migrates, once
    worker = seqtune_args(container(one(base, "Deployment", "seqtune-worker"), "worker"))
    assert worker[worker.index("--gpus") + 1] == "all"
    assert worker[worker.index("--slots-per-gpu") + 1] == "2"


def test_api_probes_and_service(base: list[Doc]) -> None:
    api = one(base, "Deployment", "seqtune-api")
    c = container(api, "api")
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    assert seqtune_args(c)[seqtune_args(c).index("--port") + 1] == str(port)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    svc = one(base, "Service", "seqtune-api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_workers_get_time_to_hand_trials_back_and_leave_one_at_a_time(base: list[Doc]) -> None:
    worker = one(base, "Deployment", "seqtune-worker")
    pod = worker["spec"]["template"]["spec"]
    # An epoch's end plus the snapshot and the hand-back: minutes, not Kubernetes' 30 s.
    assert pod["terminationGracePeriodSeconds"] >= 300
    c = container(worker, "worker")
    assert "command" not in c  # the image's entry is replaced by args: seqtune is PID 1
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & c.keys()  # no HTTP
    labels = worker["spec"]["template"]["metadata"]["labels"]
    pdbs = [
        p
        for p in base
        if p["kind"] == "PodDisruptionBudget"
        and p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1


# README's overlay (below its `resources:` line), with a name prefix on top.
OVERLAY_REST = """\
namePrefix: team-
images:
  - {name: seqtune, newName: reg.example/seqtune, newTag: "1.2"}
secretGenerator:
  - {name: seqtune-database, behavior: replace, envs: [database.env]}
patches:
  - target: {kind: Deployment, name: seqtune-worker}
    patch: |
      apiVersion: apps/v1
      kind: Deployment
      metadata: {name: seqtune-worker}
      spec:
        template:
          spec:
            containers:
              - name: worker
                env: [{name: SLOTS_PER_GPU, value: "4"}]
  - target: {kind: ScaledObject, name: seqtune-worker}
    patch: |
      - {op: replace, path: /spec/triggers/0/metadata/targetQueryValue, value: "4"}
"""


def test_an_overlay_replaces_the_secret_and_resizes_consistently(tmp_path: Path) -> None:
    """What README's overlay does: its Secret replaces the base's, under a new hashed name that
    reaches every reference, the TriggerAuthentication's included (kustomizeconfig.yaml), and
    a name prefix reaches the ScaledObject's references."""
    overlay = tmp_path / "prod"
    overlay.mkdir()
    (overlay / "database.env").write_text(
        "url=postgresql://seqtune:s3cret@db.internal:5432/seqtune\n"
        "keda-connection=postgresql://keda:s3cret@db.internal:5432/seqtune\n"
    )
    # kustomize takes a base by relative path only
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(K8S, overlay)}]\n" + OVERLAY_REST
    )
    docs = render(overlay)
    crds = crd_schemas()
    for doc in docs:
        validate(doc, crds)
    secret = one(docs, "Secret")
    name = secret["metadata"]["name"]
    assert name.startswith("team-seqtune-database-")
    assert (
        base64.b64decode(secret["data"]["url"])
        == b"postgresql://seqtune:s3cret@db.internal:5432/seqtune"
    )
    so = one(docs, "ScaledObject", "team-seqtune-worker")
    auth = one(
        docs, "TriggerAuthentication", so["spec"]["triggers"][0]["authenticationRef"]["name"]
    )
    assert auth["spec"]["secretTargetRef"][0]["name"] == name
    worker = one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    c = container(worker, "worker")
    assert c["image"] == "reg.example/seqtune:1.2"
    assert env_of(c)["SEQTUNE_DATABASE_URL"]["secretKeyRef"]["name"] == name
    assert (
        so["spec"]["triggers"][0]["metadata"]["targetQueryValue"]
        == env_of(c)["SLOTS_PER_GPU"]
        == "4"
    )
    assert so["spec"]["triggers"][0]["metadata"]["query"] == QUERY_FILE.read_text()


# -- the queue-depth query on Postgres -----------------------------------------------------------
@pytest.fixture
def storage(settings: Settings) -> optuna.storages.BaseStorage:
    return make_storage(settings)


def slots_wanted(db: Database) -> int:
    """The file's query, sent as KEDA sends it (one statement, no parameters)."""
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql(QUERY_FILE.read_text()).all()
    assert len(rows) == 1 and len(rows[0]) == 1  # KEDA scans one number
    return int(rows[0][0])


def make(db: Database, storage: Any, name: str, n_trials: int, **budget: Any) -> None:
    spec = parse_spec(
        {
            "name": name,
            "dataset": {"kind": "builtin", "name": "sunspots"},
            "objectives": [{"metric": "val_rmse"}],
            "search_space": {"hidden_size": {"type": "int", "low": 4, "high": 64}},
            "budget": {"n_trials": n_trials, "lease_timeout_s": 30, **budget},
        }
    )
    check_spec(spec)
    studies.create_study(db, storage, tenant="acme", spec=spec)


def claim(db: Database, storage: Any, name: str, owner: str = "w") -> leases.Claim:
    c = leases.claim(db, storage, owner=owner, studies=[name])
    assert c is not None
    return c


def finish(db: Database, storage: Any, c: leases.Claim) -> None:
    ostudy = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
    leases.finish(db, ostudy=ostudy, claim=c, state="COMPLETE", values=[1.0], reason="max_epochs")


def test_query_counts_budget_and_running_trials_of_a_running_study(
    db: Database, storage: Any
) -> None:
    assert slots_wanted(db) == 0  # nothing to do: KEDA scales the workers to zero
    make(db, storage, "a", 5)
    assert slots_wanted(db) == 5  # the whole budget waits for workers
    c1, c2 = claim(db, storage, "a"), claim(db, storage, "a")
    # Two held by workers + three to start: a query of waiting work alone would say 3 and
    # scale away a pod that is training.
    assert slots_wanted(db) == 5
    finish(db, storage, c1)
    assert slots_wanted(db) == 4
    leases.release(db, claim=c2)  # SIGTERM's hand-back: RUNNING, no owner, to be resumed
    assert slots_wanted(db) == 4


def test_query_counts_a_reaped_trial_waiting_to_be_resumed(db: Database, storage: Any) -> None:
    make(db, storage, "a", 1)
    claim(db, storage, "a", owner="dead")
    assert slots_wanted(db) == 1
    later = utcnow() + timedelta(seconds=120)  # past the 30 s lease
    assert recovery.reap(db, storage, now=later).freed == 1
    assert slots_wanted(db) == 1  # the freed trial needs a worker to resume it
    again = claim(db, storage, "a", owner="alive")
    assert again.attempt == 2 and slots_wanted(db) == 1


def test_query_caps_a_study_at_max_concurrent_trials(db: Database, storage: Any) -> None:
    make(db, storage, "capped", 10, max_concurrent_trials=2)
    assert slots_wanted(db) == 2
    c = claim(db, storage, "capped")
    assert slots_wanted(db) == 2
    claim(db, storage, "capped")
    assert slots_wanted(db) == 2  # two running, the cap reached: no third slot
    leases.release(db, claim=c)
    assert slots_wanted(db) == 2
    make(db, storage, "free", 3)
    assert slots_wanted(db) == 5


def test_query_counts_enqueued_trials_once(db: Database, storage: Any) -> None:
    make(db, storage, "a", 3)
    trials.enqueue_trial(db, storage, tenant="acme", name="a", params={"hidden_size": 8})
    assert slots_wanted(db) == 3  # the queued trial is part of the budget, not on top of it
    c = claim(db, storage, "a")
    assert c.params == {"hidden_size": 8} and slots_wanted(db) == 3


def test_query_leaves_out_trials_an_outside_optuna_client_runs(db: Database, storage: Any) -> None:
    make(db, storage, "a", 3)
    trials.enqueue_trial(db, storage, tenant="acme", name="a", params={"hidden_size": 8})
    optuna.load_study(study_name="acme/a", storage=storage).ask()  # pops the queued trial
    report = recovery.reap(db, storage, now=utcnow() + timedelta(seconds=60))
    assert report.outside == 1
    view = studies.get_study(db, tenant="acme", name="a")
    assert view.trials.running == 1
    assert slots_wanted(db) == 2  # the two trials left to start; the outside one needs no worker


def test_query_paused_and_finished_studies_want_no_new_workers(db: Database, storage: Any) -> None:
    make(db, storage, "p", 5)
    held = claim(db, storage, "p")
    handed_back = claim(db, storage, "p")
    leases.release(db, claim=handed_back)
    studies.update_study(db, tenant="acme", name="p", status="paused")
    # Paused: its budget and its handed-back trial wait for the resume, not for a worker; the
    # trial a worker holds is trained to its end (pausing stops no attempt), so its slot stays.
    assert slots_wanted(db) == 1
    finish(db, storage, held)
    assert slots_wanted(db) == 0
    studies.update_study(db, tenant="acme", name="p", status="running")
    assert slots_wanted(db) == 4  # 3 to start + the handed-back one
    studies.update_study(db, tenant="acme", name="p", status="stopped")
    assert slots_wanted(db) == 0

    make(db, storage, "done", 1)
    finish(db, storage, claim(db, storage, "done"))
    assert studies.get_study(db, tenant="acme", name="done").status == "completed"
    assert slots_wanted(db) == 0


# -- Slurm ---------------------------------------------------------------------------------------
def sbatch_directives() -> dict[str, str]:
    """The #SBATCH options as sbatch reads them: from the lines before the first command."""
    out: dict[str, str] = {}
    for line in SBATCH.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            for opt in shlex.split(stripped[len("#SBATCH") :], comments=True):
                key, _, value = opt.partition("=")
                out[key] = value
    return out


def seconds(slurm_time: str) -> int:
    days, _, hms = slurm_time.rpartition("-")
    parts = [int(p) for p in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def test_sbatch_script_parses_and_asks_for_an_array_of_gpu_workers() -> None:
    check = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    d = sbatch_directives()
    assert re.fullmatch(r"\d+-\d+(%\d+)?", d["--array"])
    assert d["--gres"] == "gpu:1"
    # SIGTERM to the batch shell (B:), long enough before the limit for an epoch to end.
    m = re.fullmatch(r"B:(TERM|15)@(\d+)", d["--signal"])
    assert m is not None, d["--signal"]
    lead = int(m.group(2))
    assert 120 <= lead <= 65535 and lead < seconds(d["--time"])
    # The last command replaces the shell with the worker: the signal goes to seqtune itself.
    last = [
        ln
        for ln in SBATCH.read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ][-1]
    assert last.startswith("exec seqtune worker ")
    args = shlex.split(last)[2:]  # from the verb on
    values = {"$SLOTS_PER_GPU": "1", "$MAX_IDLE": "300"}
    parsed = build_parser().parse_args([values.get(a, a) for a in args if a != "$@"])
    assert (parsed.gpus, parsed.slots_per_gpu, parsed.max_idle) == ("all", 1, 300.0)


@pytest.fixture
def fake_seqtune(tmp_path: Path) -> Iterator[Path]:
    """A `seqtune` on PATH that records its pid and arguments and, on SIGTERM, writes TERM and
    exits: a stand-in for the worker (which needs a GPU node's Slurm to be the real thing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "seqtune"
    exe.write_text(
        "#!/usr/bin/env bash\n"
        "trap 'echo TERM >> \"$FAKE_LOG\"; exit 0' TERM\n"
        'echo "$$ $*" > "$FAKE_LOG.tmp" && mv "$FAKE_LOG.tmp" "$FAKE_LOG"\n'
        "while :; do sleep 0.1; done\n"
    )
    exe.chmod(0o755)
    yield bin_dir


def test_the_batch_shells_sigterm_reaches_the_worker(tmp_path: Path, fake_seqtune: Path) -> None:
    """What --signal=B:TERM does: Slurm signals the batch shell's pid. Run the script with bash
    as slurmstepd would, send that pid SIGTERM, and see the worker get it at once."""
    log = tmp_path / "worker.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")},
        "PATH": f"{fake_seqtune}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "SEQTUNE_DATABASE_URL": "postgresql://seqtune@db:5432/seqtune",
        "SEQTUNE_SLOTS_PER_GPU": "3",
        "SLURM_ARRAY_JOB_ID": "41",
        "SLURM_ARRAY_TASK_ID": "7",
    }
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "--studies", "sunspots"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not log.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert log.exists(), proc.stderr.read() if proc.stderr else ""
        pid, _, argv = log.read_text().strip().partition(" ")
        assert int(pid) == proc.pid  # exec: the worker is the batch shell
        assert argv.split() == [
            "worker",
            "--gpus",
            "all",
            "--slots-per-gpu",
            "3",
            "--max-idle",
            "300",
            "--studies",
            "sunspots",
        ]
        os.kill(proc.pid, signal.SIGTERM)  # only that pid, as B: does
        assert proc.wait(timeout=5) == 0
        assert log.read_text().strip().endswith("TERM")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_sbatch_script_refuses_to_start_without_a_database(fake_seqtune: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env["PATH"] = f"{fake_seqtune}:{os.environ['PATH']}"
    out = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "SEQTUNE_DATABASE_URL" in out.stderr
