"""One worker slot: a process that claims trials, trains them and reports, until told to stop.

It holds the loop (claim, run, record), registration and the heartbeat, reaping, and the
frame cache. What one trial does is elsewhere: the run and its outcome in ``worker.runner``,
GPU admission in ``worker.admission``, the snapshot and model bytes in ``worker.checkpoints``,
TensorBoard's event files in ``worker.tensorboard``. Stop requests and the parent watch are
``worker.signals``: the first request finishes the current epoch, snapshots the trial and
releases its lease so that another worker resumes it after that epoch; a second one stops at
once. Its timing (heartbeat, reap interval, poll, orphan grace) and database come from the
``Settings`` it is given: the fleet hands each slot the worker process's.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from seqtune.errors import Conflict, Fenced, NotFound
from seqtune.spec import StopWhen, StudySpec
from seqtune.states import TrialState
from service.logs import log_context, setup_logging
from service.settings import Settings
from service.store import baselines as service_baselines
from service.store import datasets as service_datasets
from service.store import leases, lineage, recovery, workers
from service.store.db import Database
from service.store.optuna import make_storage, optuna_study
from service.store.stocker import Stocker
from worker import admission, checkpoints, datasets, runner, stopping, tensorboard
from worker.engine import InitModel
from worker.objective import prepare_for, resolve, study_baselines
from worker.preprocessing import DataError
from worker.signals import ParentWatch, Signals, arm_parent_death_signal

log = logging.getLogger("seqtune.worker")


@dataclass(frozen=True)
class SlotConfig:
    """What one slot runs on and for how long (``seqtune worker``'s options, per slot); its
    timing and database are in the ``Settings`` it is given."""

    slot: int = 0
    device: str = "cpu"
    studies: tuple[str, ...] = ()
    max_trials: int | None = None
    burst: bool = False
    max_idle_s: float | None = None  # the wait between claims is Settings.poll_s
    threads: int | None = None  # torch CPU threads; the fleet splits the cores among slots
    slots_on_device: int = 1  # slots sharing this slot's GPU (its memory ledger)
    # The `seqtune worker` process that started this slot (set by the fleet). The slot stops
    # when that process dies: nobody would supervise or stop it any more (see
    # worker.signals.ParentWatch).
    parent_pid: int | None = None


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
                workers.heartbeat(
                    self.db, worker_id=self.worker_id, trial_row_id=c.trial_row_id if c else None
                )
                if c is not None and self.progress != self._seen:
                    self._seen = self.progress
                    leases.renew(self.db, claim=c)
            except Fenced:
                self.fenced = True
            except Exception:  # noqa: BLE001 - a missed beat is logged, the next one retries
                log.exception("heartbeat failed")

    def halt(self) -> None:
        self._halt.set()


class Slot:
    """The slot's loop and its parts. ``settings`` (default: read from the environment) holds
    its timing and database, used as given; the worker process passes its own (with a
    worker's database retries, see ``worker.cli.cmd_worker``) to every slot it starts."""

    def __init__(self, cfg: SlotConfig, settings: Settings | None = None) -> None:
        self.cfg = cfg
        self.settings = settings or Settings()
        self.db = Database(self.settings)
        self.storage = make_storage(self.settings)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-s{cfg.slot}"
        self.frames: dict[str, Any] = {}
        self.inits: dict[str, InitModel] = {}  # the last init_from model, decoded once
        self.signals = Signals(cfg.parent_pid)
        self.hb = _Heartbeat(self.db, self.worker_id, self.settings.heartbeat_s)
        # Refills the buffers of the studies it claims from before they run dry (Postgres).
        self.stocker = (
            None if self.settings.is_sqlite else Stocker(self.db, self.storage, self.worker_id)
        )
        self._last_reap = 0.0
        self.parent_death_signal = False  # slot_main sets it once the kernel's signal is armed

    def run(self) -> int:
        """The slot's loop. Returns the number of trials it ran."""
        workers.register(
            self.db,
            worker_id=self.worker_id,
            host=socket.gethostname(),
            slot=self.cfg.slot,
            device=self.cfg.device,
            pid=os.getpid(),
            versions={
                "torch": torch.__version__,
                "optuna": optuna.__version__,
                "python": platform.python_version(),
                "cuda": torch.version.cuda,
            },
        )
        self.hb.start()
        if self.cfg.parent_pid is not None:
            ParentWatch(
                self.cfg.parent_pid,
                signalled_by_kernel=self.parent_death_signal,
                grace_s=self.settings.orphan_grace_s,
            ).start()
        done, idle_since = 0, time.monotonic()
        names = list(self.cfg.studies) or None
        log.info("worker %s up on %s", self.worker_id, self.cfg.device)
        try:
            while not self.signals.stop.is_set() and not self._orphaned():
                self._maybe_reap()
                c = leases.claim(
                    self.db,
                    self.storage,
                    owner=self.worker_id,
                    studies=names,
                    stocker=self.stocker,
                )
                if c is not None and self._orphaned():
                    # The fleet died while this claim was under way: an orphan must not
                    # start a trial (the watch is about to stop it). Hand it back untouched.
                    self._release(c)
                    break
                if c is None:
                    if self.cfg.burst and not leases.has_work(self.db, studies=names):
                        log.info("burst: no study has work left; exiting")
                        break
                    if (
                        self.cfg.max_idle_s is not None
                        and time.monotonic() - idle_since > self.cfg.max_idle_s
                    ):
                        log.info("idle for %.0fs; exiting", self.cfg.max_idle_s)
                        break
                    # Jittered: slots started together do not poll the database in step.
                    self.signals.stop.wait(self.settings.poll_s * (0.5 + random.random()))
                    continue
                self.run_trial(c)
                done += 1
                idle_since = time.monotonic()
                if self.cfg.max_trials is not None and done >= self.cfg.max_trials:
                    break
        finally:
            self.hb.halt()
            if self.stocker is not None:
                self.stocker.close()
            workers.stopped(self.db, worker_id=self.worker_id)
            self.db.dispose()
        return done

    def _orphaned(self) -> bool:
        """Whether the fleet process that started this slot is gone (never, when run alone)."""
        return self.cfg.parent_pid is not None and os.getppid() != self.cfg.parent_pid

    def _maybe_reap(self) -> None:
        if time.monotonic() - self._last_reap < self.settings.worker_reap_every_s:
            return
        self._last_reap = time.monotonic()
        try:
            report = recovery.reap(self.db, self.storage)
            if report.freed or report.failed or report.orphans or report.cancelled:
                log.info("reaped: %s", report)
        except Exception:  # noqa: BLE001 - reaping is best effort here; the service reaps too
            log.exception("reap failed")

    def _frame(self, c: leases.Claim, spec: StudySpec) -> Any:
        """The study's data, loaded once per run of trials of one study (the last study's
        frame only: a slot moving between studies holds one frame at a time)."""
        key = f"{c.study_id}"
        if key not in self.frames:
            cache = self.settings.data_dir / "cache" / "datasets"
            self.frames = {
                key: datasets.load(
                    spec.dataset,
                    cache_dir=cache,
                    fetch=lambda i: service_datasets.dataset_content(self.db, dataset_id=i),
                )
            }
        return self.frames[key]

    def _init(self, c: leases.Claim, spec: StudySpec) -> InitModel | None:
        """The model the study starts its trials from (``init_from``), loaded and decoded once
        per run of trials of one study. Raises DataError when it is gone or unreadable: the
        trial fails with reason data_error."""
        if spec.init_from is None:
            return None
        key = f"{c.tenant}:{spec.init_from.model_dump_json()}"
        if key not in self.inits:
            try:
                src = lineage.load_source(self.db, tenant=c.tenant, init=spec.init_from)
            except (NotFound, Conflict) as exc:
                raise DataError(f"init_from: {exc.message}") from None
            try:
                ckpt = checkpoints.decode_model(src.data)
            except Exception as exc:  # noqa: BLE001 - any unreadable file fails the trial alike
                raise DataError(f"init_from: the model cannot be loaded ({exc})") from None
            self.inits = {key: InitModel(ckpt, src.ref)}
        return self.inits[key]

    def run_trial(self, c: leases.Claim) -> None:
        """Train one claimed trial and record its end. Never raises for the trial's own
        failures: they end the trial (FAIL with a reason) and the slot goes on."""
        with log_context(
            study=c.study_name, trial=c.number, attempt=c.attempt, worker=self.worker_id
        ):
            self._run_trial(c)

    def _run_trial(self, c: leases.Claim) -> None:
        spec = StudySpec.model_validate(c.spec)
        ostudy = optuna_study(self.storage, c.optuna_study_name, spec)
        trial = optuna.trial.Trial(ostudy, c.optuna_trial_id)
        self.hb.watch(c)
        log.info("trial %s#%d attempt %d: %s", c.study_name, c.number, c.attempt, c.params)
        estimate: int | None = None
        try:
            outcome, estimate = self._attempt(c, spec, trial)
        except SystemExit:
            self._release(c)  # second signal: hand the trial back, then go
            raise
        except Exception as exc:  # noqa: BLE001 - one trial's failure must not kill the slot
            outcome = runner.classify(spec, exc)
            if outcome.reason == "error":
                log.exception("trial %s#%d failed", c.study_name, c.number)
        finally:
            self.hb.watch(None)
        if outcome.reason == "oom":
            # The next trial must not start on this one's cache. Here, not in the except
            # block: there the exception's traceback still holds the failed trial's frames,
            # and with them its model, optimizer and windows on the GPU.
            gc.collect()
            torch.cuda.empty_cache()
        self._settle(ostudy, c, outcome, estimate)

    def _attempt(
        self, c: leases.Claim, spec: StudySpec, trial: optuna.Trial
    ) -> tuple[runner.Outcome, int]:
        """Load the study's data (and its baselines, once per study), wait for room on the
        GPU, run the trial. Returns the outcome and the trial's GPU memory estimate."""
        hp = resolve(spec, c.params)
        frame = self._frame(c, spec)
        init = self._init(c, spec)
        self._baselines(c, spec, frame)
        # The hold-out split sizes the memory estimate (walk-forward folds train on less).
        # Prepared on the CPU: the estimate needs its shapes only, and a copy on the GPU
        # would stay there beside the training's own for the whole trial.
        data = prepare_for(spec, hp, frame, "cpu")
        need = admission.estimate(hp, data, self.cfg.device)
        with admission.gpu_room(
            need,
            device=self.cfg.device,
            slots_on_device=self.cfg.slots_on_device,
            ledger_dir=self.settings.data_dir / "gpu",
            slot=self.cfg.slot,
            should_stop=self.signals.stop.is_set,
            on_wait=self.hb.bump,
        ):  # waiting for room is progress
            return self._train(c, spec, trial, frame, init), need

    def _baselines(self, c: leases.Claim, spec: StudySpec, frame: Any) -> None:
        """Compute the study's classical baselines once, before its first trial trains: the
        first slot to claim them does the work, the others go on training. A failure is
        recorded on the study (the view says why) and never fails the trial."""
        if not service_baselines.claim(self.db, study_id=c.study_id, owner=self.worker_id):
            return
        try:
            result = study_baselines(spec, frame)
        except Exception as exc:  # noqa: BLE001 - the trial goes on without baselines
            log.exception("baselines of %s failed", c.study_name)
            service_baselines.fail(
                self.db, study_id=c.study_id, owner=self.worker_id, error=runner.error_text(exc)
            )
            return
        service_baselines.store(self.db, study_id=c.study_id, owner=self.worker_id, result=result)
        log.info(
            "baselines of %s: best %s (%.1fs)",
            c.study_name,
            result.get("best"),
            result.get("seconds", 0.0),
        )

    def _train(
        self,
        c: leases.Claim,
        spec: StudySpec,
        trial: optuna.Trial,
        frame: Any,
        init: InitModel | None = None,
    ) -> runner.Outcome:
        """Run the trial from its last snapshot, if an earlier attempt left one, starting
        from the ``init_from`` model ``init``."""
        resume = None
        if c.resumed:
            snap = checkpoints.load_resume(self.db, trial_row_id=c.trial_row_id)
            if snap is not None:
                resume = snap.state
                log.info("resuming trial %s#%d after epoch %d", c.study_name, c.number, snap.epoch)
        tb = tensorboard.writer(
            self.settings.tensorboard_dir, study=c.study_name, number=c.number, attempt=c.attempt
        )
        try:
            return runner.run(
                spec,
                c.params,
                frame,
                seed=c.number,
                device=self.cfg.device,
                hooks=self._hooks(c, trial, tb),
                resume=resume,
                init=init,
            )
        finally:
            if tb is not None:
                tb.close()

    def _hooks(self, c: leases.Claim, trial: optuna.Trial, tb: Any) -> runner.Hooks:
        """The runner's hooks for this attempt: each epoch is recorded under the lease (and
        in TensorBoard), snapshots go to the database, the slot's stop request stops."""

        def report(step: int, record: dict[str, float], value: float | None) -> None:
            if self.hb.fenced:
                raise Fenced("the lease was taken from this attempt")
            leases.report(
                self.db,
                claim=c,
                trial=trial if value is not None else None,
                epoch=step,
                record=record,
                value=value,
            )
            if tb is not None:
                tensorboard.add_record(tb, step, record)

        return runner.Hooks(
            report=report,
            # A final-phase re-train measures a configuration's spread: it runs to the end.
            should_prune=trial.should_prune if c.final_of is None else None,
            should_stop=self.signals.stop.is_set,
            on_step=self.hb.bump,
            on_snapshot=lambda state: checkpoints.save_snapshot(self.db, c, state),
            snapshot_every_s=self.settings.checkpoint_every_s,
        )

    def _settle(
        self, ostudy: optuna.Study, c: leases.Claim, outcome: runner.Outcome, estimate: int | None
    ) -> None:
        """Do what the outcome says: record the trial's end, hand it back, or let it go."""
        if outcome.action is runner.Action.ABANDON:
            log.warning("abandoning trial: %s", outcome.error)
            return
        if outcome.action is runner.Action.HAND_BACK:
            self._release(c)
            return
        assert outcome.state is not None  # FINISH always names the state
        r = outcome.result
        kw: dict[str, Any] = {}
        if r is not None:
            kw["info"] = runner.trial_info(
                r, device=self.cfg.device, gpu_mem_estimate_bytes=estimate
            )
        if outcome.constraints is not None:
            kw["constraints"] = list(outcome.constraints)
            kw.setdefault("info", {})["constraints"] = kw["constraints"]
        if outcome.state is TrialState.COMPLETE and r is not None:
            # The model goes in the transaction that records the value, under the same fence
            # check: a stale attempt can neither store a model beside another attempt's value
            # nor leave its own model behind when its result is refused.
            kw.update(
                values=list(outcome.values or ()),
                test_metrics=r.test,
                model=None if r.checkpoint is None else checkpoints.encode(r.checkpoint),
                model_epoch=r.best_epoch or 0,
            )
        self._finish(
            ostudy, c, state=outcome.state, reason=outcome.reason, error=outcome.error, **kw
        )
        if outcome.state is TrialState.COMPLETE and c.final_of is None:
            self._judge_regret(ostudy, c)

    def _judge_regret(self, ostudy: optuna.Study, c: leases.Claim) -> None:
        """``budget.stop_when.regret_bound``: ask Optuna's Terminator (``worker.stopping``)
        after a search trial completed, and stop the study's search when it says so."""
        rule = ((c.spec.get("budget") or {}).get("stop_when")) or {}
        if not rule.get("regret_bound"):
            return
        try:
            verdict = stopping.judge(ostudy, StopWhen.model_validate(rule))
        except Exception as exc:  # a judgement is advice: it never takes the slot down
            log.warning("study %s: the regret bound could not be judged: %s", c.study_name, exc)
            return
        log.info(
            "study %s: regret bound %s (%.2fs)",
            c.study_name,
            "says stop" if verdict.stop else "goes on",
            verdict.seconds,
        )
        if verdict.stop:
            leases.stop_early(self.db, ostudy._storage, study_id=c.study_id, reason=verdict.reason)

    def _finish(self, ostudy: optuna.Study, c: leases.Claim, **kw: Any) -> None:
        try:
            leases.finish(self.db, ostudy=ostudy, claim=c, **kw)
            workers.trial_done(self.db, worker_id=self.worker_id)
            log.info(
                "trial %s#%d: %s (%s)", c.study_name, c.number, kw.get("state"), kw.get("reason")
            )
        except Fenced as exc:
            log.warning("result refused: %s", exc.message)

    def _release(self, c: leases.Claim) -> None:
        try:
            leases.release(self.db, claim=c)
            log.info("trial %s#%d handed back for another worker", c.study_name, c.number)
        except Fenced:
            pass


def slot_main(cfg: SlotConfig, settings: Settings) -> None:
    """Entry point of a spawned slot process; ``settings`` are the worker process's."""
    setup_logging(settings, prefix=f"slot{cfg.slot} ")
    armed = cfg.parent_pid is not None and arm_parent_death_signal(cfg.parent_pid)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    slot = Slot(cfg, settings)  # installs the SIGTERM handler a parent-death signal will run
    slot.parent_death_signal = armed
    try:
        slot.run()
    finally:
        if slot._orphaned():
            # Nobody waits for an orphan, its trial is handed back and its database work
            # done, and the interpreter's teardown (garbage-collecting torch's objects) took
            # seconds on a busy machine: end the process now.
            logging.shutdown()
            os._exit(0)
