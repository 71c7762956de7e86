"""One worker slot: a process that claims trials, trains them and reports, until told to stop.

Signals: the first SIGTERM (or SIGINT) finishes the current epoch, snapshots the trial and
releases its lease so that another worker resumes it; a second one stops at once.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
import torch

from service import datasets as service_datasets
from service import leases, workers
from service.db import Database
from service.logs import log_context, setup_logging
from service.optuna_bridge import make_storage
from service.settings import Settings
from service.spec import StudySpec
from worker import datasets
from worker.engine import TrainConfig, TrialResult, train
from worker.objective import monitor_of, objective_values, prepare_for, resolve
from worker.preprocessing import DataError

log = logging.getLogger("seqtune.worker")
REAP_EVERY_S = 5.0


@dataclass(frozen=True)
class SlotConfig:
    slot: int = 0
    device: str = "cpu"
    database_url: str | None = None
    studies: tuple[str, ...] = ()
    max_trials: int | None = None
    burst: bool = False
    max_idle_s: float | None = None
    poll_s: float = 0.5
    threads: int | None = None  # torch CPU threads; the fleet splits the cores among slots


class _Signals:
    """First SIGTERM: stop at the next epoch boundary. Second: stop now."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            log.warning("second signal %d: stopping now", signum)
            raise SystemExit(128 + signum)
        log.info("signal %d: finishing the epoch, then handing the trial back", signum)
        self.stop.set()


class _Heartbeat(threading.Thread):
    """Beats for the worker; renews the current trial's lease only while training makes
    progress, so a hung device lets the lease expire instead of keeping it forever."""

    def __init__(self, db: Database, worker_id: str, interval: float) -> None:
        super().__init__(name="seqtune-heartbeat", daemon=True)
        self.db, self.worker_id, self.interval = db, worker_id, interval
        self.claim: leases.Claim | None = None
        self.progress = 0
        self.fenced = False
        self._seen = 0
        self._halt = threading.Event()

    def watch(self, claim: leases.Claim | None) -> None:
        self.claim, self.fenced, self._seen = claim, False, self.progress

    def bump(self) -> None:
        self.progress += 1

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            c = self.claim
            try:
                workers.heartbeat(self.db, worker_id=self.worker_id,
                                  trial_row_id=c.trial_row_id if c else None)
                if c is not None and self.progress != self._seen:
                    self._seen = self.progress
                    leases.renew(self.db, c)
            except leases.Fenced:
                self.fenced = True
            except Exception:  # noqa: BLE001 - a missed beat is logged, the next one retries
                log.exception("heartbeat failed")

    def halt(self) -> None:
        self._halt.set()


class Slot:
    def __init__(self, cfg: SlotConfig, settings: Settings | None = None) -> None:
        self.cfg = cfg
        base = settings or Settings()
        overrides: dict[str, Any] = {"db_retries": max(base.db_retries, 12)}
        if cfg.database_url:
            overrides["database_url"] = cfg.database_url
        # Workers ride out database restarts: more retries than the service.
        self.settings = Settings(**{**base.model_dump(), **overrides})
        self.db = Database(self.settings)
        self.storage = make_storage(self.settings)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-s{cfg.slot}"
        self.frames: dict[str, Any] = {}
        self.signals = _Signals()
        self.hb = _Heartbeat(self.db, self.worker_id, workers.HEARTBEAT_S)
        self._last_reap = 0.0

    def run(self) -> int:
        """The slot's loop. Returns the number of trials it ran."""
        workers.register(self.db, worker_id=self.worker_id, host=socket.gethostname(),
                         slot=self.cfg.slot, device=self.cfg.device, pid=os.getpid(),
                         versions={"torch": torch.__version__, "optuna": optuna.__version__,
                                   "python": platform.python_version(),
                                   "cuda": torch.version.cuda})
        self.hb.start()
        done, idle_since = 0, time.monotonic()
        names = list(self.cfg.studies) or None
        log.info("worker %s up on %s", self.worker_id, self.cfg.device)
        try:
            while not self.signals.stop.is_set():
                self._maybe_reap()
                c = leases.claim(self.db, self.storage, owner=self.worker_id, studies=names)
                if c is None:
                    if self.cfg.burst and not leases.has_work(self.db, studies=names):
                        log.info("burst: no study has work left; exiting")
                        break
                    if self.cfg.max_idle_s is not None and \
                            time.monotonic() - idle_since > self.cfg.max_idle_s:
                        log.info("idle for %.0fs; exiting", self.cfg.max_idle_s)
                        break
                    self.signals.stop.wait(self.cfg.poll_s * (0.5 + random.random()))
                    continue
                self.run_trial(c)
                done += 1
                idle_since = time.monotonic()
                if self.cfg.max_trials is not None and done >= self.cfg.max_trials:
                    break
        finally:
            self.hb.halt()
            workers.stopped(self.db, worker_id=self.worker_id)
            self.db.dispose()
        return done

    def _maybe_reap(self) -> None:
        if time.monotonic() - self._last_reap < REAP_EVERY_S:
            return
        self._last_reap = time.monotonic()
        try:
            report = leases.reap(self.db, self.storage)
            if report.freed or report.failed or report.orphans:
                log.info("reaped: %s", report)
        except Exception:  # noqa: BLE001 - reaping is best effort here; the service reaps too
            log.exception("reap failed")

    def _frame(self, c: leases.Claim, spec: StudySpec) -> Any:
        key = f"{c.study_id}"
        if key not in self.frames:
            cache = self.settings.data_dir / "cache" / "datasets"
            self.frames = {key: datasets.load(
                spec.dataset, cache_dir=cache,
                fetch=lambda i: service_datasets.dataset_content(self.db, dataset_id=i))}
        return self.frames[key]

    def run_trial(self, c: leases.Claim) -> None:
        """Train one claimed trial and record its end. Never raises for the trial's own
        failures: they end the trial (FAIL with a reason) and the slot goes on."""
        with log_context(study=c.study_name, trial=c.number, attempt=c.attempt,
                         worker=self.worker_id):
            self._run_trial(c)

    def _run_trial(self, c: leases.Claim) -> None:
        spec = StudySpec.model_validate(c.spec)
        ostudy = leases.optuna_study(self.storage, c.optuna_study_name, spec)
        trial = optuna.trial.Trial(ostudy, c.optuna_trial_id)
        self.hb.watch(c)
        log.info("trial %s#%d attempt %d: %s", c.study_name, c.number, c.attempt, c.params)
        try:
            result = self._train(c, spec, trial)
        except leases.Fenced as exc:
            log.warning("abandoning trial: %s", exc.message)
            return
        except DataError as exc:
            self._finish(ostudy, c, state="FAIL", reason="data_error", error=str(exc))
            return
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            self._finish(ostudy, c, state="FAIL", reason="oom", error=leases.error_text(exc))
            return
        except SystemExit:
            self._release(c)  # second signal: hand the trial back, then go
            raise
        except Exception as exc:  # noqa: BLE001 - one trial's bug must not kill the slot
            log.exception("trial %s#%d failed", c.study_name, c.number)
            self._finish(ostudy, c, state="FAIL", reason="error", error=leases.error_text(exc))
            return
        finally:
            self.hb.watch(None)
        self._record(ostudy, c, spec, result)

    def _train(self, c: leases.Claim, spec: StudySpec, trial: optuna.Trial) -> TrialResult:
        hp = resolve(spec, c.params)
        data = prepare_for(spec, hp, self._frame(c, spec), self.cfg.device)
        monitor, direction = monitor_of(spec)
        single = len(spec.objectives) == 1
        resume = None
        if c.resumed:
            ck = leases.load_checkpoint(self.db, trial_row_id=c.trial_row_id, kind="resume")
            if ck is not None:
                resume = torch.load(io.BytesIO(ck[1]), weights_only=False)
                log.info("resuming trial %s#%d after epoch %d", c.study_name, c.number, ck[0])

        tb = tensorboard_writer(self.settings.tensorboard_dir, c)

        def on_epoch(epoch: int, record: dict[str, float]) -> bool:
            if self.hb.fenced:
                raise leases.Fenced("the lease was taken from this attempt")
            leases.report(self.db, c, trial if single else None, epoch=epoch, record=record,
                          value=record[monitor] if single else None)
            if tb is not None:
                for k, v in record.items():
                    if k != "epoch" and isinstance(v, int | float):
                        tb.add_scalar(k, v, epoch)
                tb.flush()
            return single and trial.should_prune()

        def on_snapshot(state: dict[str, Any]) -> None:
            buf = io.BytesIO()
            torch.save(state, buf)
            leases.save_checkpoint(self.db, c, kind="resume", epoch=state["epoch"],
                                   data=buf.getvalue())

        cfg = TrainConfig(hp=hp, monitor=monitor, direction=direction,
                          patience=spec.early_stopping.patience,
                          min_delta=spec.early_stopping.min_delta, seed=c.number,
                          device=self.cfg.device, timeout_s=spec.budget.trial_timeout_s)
        try:
            return train(cfg, data, on_epoch, resume=resume, should_stop=self.signals.stop.is_set,
                         on_step=self.hb.bump, on_snapshot=on_snapshot,
                         snapshot_every_s=self.settings.checkpoint_every_s)
        finally:
            if tb is not None:
                tb.close()

    def _record(self, ostudy: optuna.Study, c: leases.Claim, spec: StudySpec,
                r: TrialResult) -> None:
        if r.reason == "interrupted":
            self._release(c)
            return
        info = {"best_epoch": r.best_epoch, "param_count": r.param_count,
                "train_seconds": r.train_seconds, "wall_seconds": r.wall_seconds,
                "samples_per_s": r.samples_per_s, "peak_gpu_mem_bytes": r.peak_gpu_mem_bytes,
                "precision": r.precision, "device": self.cfg.device, "val": r.val}
        if r.reason in ("pruned", "diverged"):
            self._finish(ostudy, c, state="PRUNED", reason=r.reason, info=info)
            return
        values = objective_values(spec, r)
        if not all(v == v and abs(v) != float("inf") for v in values):
            self._finish(ostudy, c, state="FAIL", reason="nan_objective", info=info,
                         error=f"objective values {values} are not finite")
            return
        if r.checkpoint is not None:
            buf = io.BytesIO()
            torch.save(r.checkpoint, buf)
            try:
                leases.save_checkpoint(self.db, c, kind="best", epoch=r.best_epoch or 0,
                                       data=buf.getvalue())
            except leases.Fenced:
                return
        self._finish(ostudy, c, state="COMPLETE", values=values, reason=r.reason,
                     test_metrics=r.test, info=info)

    def _finish(self, ostudy: optuna.Study, c: leases.Claim, **kw: Any) -> None:
        try:
            leases.finish(self.db, ostudy, c, **kw)
            workers.trial_done(self.db, worker_id=self.worker_id)
            log.info("trial %s#%d: %s (%s)", c.study_name, c.number, kw.get("state"),
                     kw.get("reason"))
        except leases.Fenced as exc:
            log.warning("result refused: %s", exc.message)

    def _release(self, c: leases.Claim) -> None:
        try:
            leases.release(self.db, c)
            log.info("trial %s#%d handed back for another worker", c.study_name, c.number)
        except leases.Fenced:
            pass


def tensorboard_writer(root: Path | None, c: leases.Claim) -> Any:
    """A TensorBoard event writer for this attempt of the trial, when SEQTUNE_TENSORBOARD_DIR
    is set: ``<dir>/<study>/trial-<number>-a<attempt>``, one scalar per curve field."""
    if root is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("SEQTUNE_TENSORBOARD_DIR is set but the tensorboard package is missing: "
                    "pip install 'seqtune[tensorboard]'")
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c.study_name)
    return SummaryWriter(log_dir=str(root / safe / f"trial-{c.number:05d}-a{c.attempt}"))


def slot_main(cfg: SlotConfig) -> None:
    """Entry point of a spawned slot process."""
    setup_logging(prefix=f"slot{cfg.slot} ")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Slot(cfg).run()
