"""Stop requests and the parent watch of a worker slot: how a slot learns it must stop.

- ``Signals``: the slot's stop requests. The first finishes the current epoch, snapshots the
  trial and hands its lease back; a second stops at once. A slot started by ``seqtune worker``
  takes its requests from that process (``STOP_SIGNAL``, one per SIGTERM or SIGINT it
  receives) and ignores the copies that reach it directly; on its own, or once that process
  is gone, SIGTERM and SIGINT are the requests.
- ``ParentWatch`` and ``arm_parent_death_signal``: an orphaned slot (its ``seqtune worker``
  killed) stops itself, through the same signals.

No database and no torch: the slot (``worker.slot``) and the fleet (``worker.fleet``) use it.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
from types import FrameType

# The slot's logger: these lines belong to the slot's log.
log = logging.getLogger("seqtune.worker")


# The stop request a fleet sends its slots: one per SIGTERM or SIGINT the fleet receives.
STOP_SIGNAL = signal.SIGUSR1
# How often ParentWatch asks os.getppid(). Not a setting: a syscall costs nothing, and the
# kernel's parent-death signal usually stops an orphan first; what operators tune is the grace.
PARENT_POLL_S = 0.5


class Signals:
    """Stop requests. The first: finish the epoch, snapshot, hand the trial back. The second:
    stop now.

    A slot started by a fleet (``parent_pid``) counts, while that process lives, only the
    fleet's requests (``STOP_SIGNAL``, one per SIGTERM or SIGINT the fleet received). The
    same request reaches the slot directly as well: a terminal sends Ctrl+C's SIGINT to its
    whole foreground process group, and supervisors (systemd by default, ``kill -- -PGID``)
    signal every process. Counting that copy made the fleet's forward the *second* request:
    the slot stopped mid-epoch without a snapshot, and the next attempt redid every epoch
    since the last periodic one. Once the fleet is gone (this process was re-parented),
    SIGTERM and SIGINT count again: an orphan obeys its parent-death signal and ParentWatch.
    A slot run on its own (no ``parent_pid``) obeys SIGTERM and SIGINT."""

    def __init__(self, parent_pid: int | None = None) -> None:
        self.stop = threading.Event()
        self._signalled = False
        self._parent_pid = parent_pid
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(STOP_SIGNAL, self._handle)

    def _copy_of_fleets(self, signum: int) -> bool:
        """A SIGTERM/SIGINT that the live fleet received too and forwards as STOP_SIGNAL."""
        return (
            signum != STOP_SIGNAL
            and self._parent_pid is not None
            and os.getppid() == self._parent_pid
        )

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self._copy_of_fleets(signum):
            # Logged from a thread, like _stop_soon: the interrupted main thread may hold the
            # logging lock.
            threading.Thread(
                target=log.debug,
                args=(
                    "signal %d left to the worker process %s, which forwards it",
                    signum,
                    self._parent_pid,
                ),
                name="seqtune-signal",
                daemon=True,
            ).start()
            return
        if self._signalled:
            raise SystemExit(128 + signum)
        self._signalled = True
        # Never Event.set() in the handler itself: the interrupted main thread may be inside
        # stop.wait() holding the event's (non-reentrant) lock, and the set would deadlock.
        # A helper thread sets it as soon as the main thread lets go of that lock.
        threading.Thread(
            target=self._stop_soon, args=(signum,), name="seqtune-signal", daemon=True
        ).start()

    def _stop_soon(self, signum: int) -> None:
        source = "the worker process" if signum == STOP_SIGNAL else f"signal {signum}"
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            # Said here too: the parent-death signal can stop the slot before ParentWatch's
            # next poll notices, and the log must say why the slot stopped.
            source += f" (the worker process {self._parent_pid} that started this slot is gone)"
        log.info(
            "stop requested by %s: finishing the epoch, then handing the trial back (a "
            "second signal stops at once)",
            source,
        )
        self.stop.set()


class ParentWatch(threading.Thread):
    """Stops an orphaned slot: once the process that started it is gone (``kill -9`` of
    ``seqtune worker``), nobody would stop the slot, and it would train and claim trials for
    ever. Polls ``os.getppid()`` (portable: an orphan is re-parented to init or a subreaper),
    then escalates like an operator would:

    1. a first SIGTERM (unless the kernel already sent it as the parent-death signal): finish
       the epoch, snapshot, hand the trial back;
    2. after ``grace_s`` (``Settings.orphan_grace_s``), a second SIGTERM: hand the trial
       back now;
    3. after ``grace_s`` more (the main thread is stuck, e.g. in a hung driver call), exit
       at once and leave the trial to the reaper (its lease stops being renewed).

    So an orphaned slot is gone within about ``2 * grace_s`` plus one poll."""

    def __init__(
        self,
        parent_pid: int,
        *,
        signalled_by_kernel: bool,
        grace_s: float,
        poll_s: float = PARENT_POLL_S,
    ) -> None:
        super().__init__(name="seqtune-parent-watch", daemon=True)
        self.parent_pid, self.poll_s, self.grace_s = parent_pid, poll_s, grace_s
        self.signalled_by_kernel = signalled_by_kernel

    def orphaned(self) -> bool:
        return os.getppid() != self.parent_pid

    def run(self) -> None:
        while not self.orphaned():
            time.sleep(self.poll_s)
        log.warning(
            "the worker process %d that started this slot is gone: stopping this "
            "slot (finish the epoch within %.0fs, else hand the trial back at once)",
            self.parent_pid,
            self.grace_s,
        )
        # Signals, not a direct Event.set(): the slot's SIGTERM contract (first: graceful,
        # second: now) is then the one path for operators, the fleet and this watch.
        if not self.signalled_by_kernel:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.grace_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.grace_s)
        # The main thread is stuck: no cleanup can be trusted, not even logging (a stuck
        # thread may hold a handler's lock, or the log pipe may be full), so the last word
        # gets half a second on a thread of its own, then the process ends regardless.
        last = threading.Thread(
            target=log.error,
            daemon=True,
            args=(
                "slot still running %.0fs after its worker process died: exiting now; the reaper "
                "recovers its trial after the lease timeout",
                2 * self.grace_s,
            ),
        )
        last.start()
        last.join(0.5)
        os._exit(1)


def arm_parent_death_signal(parent_pid: int) -> bool:
    """Ask Linux to send this process SIGTERM when its parent dies (``PR_SET_PDEATHSIG``),
    so a slot starts stopping at once rather than at the next poll. True when armed while
    the parent is still ``parent_pid`` (it may have died before the call: then no signal
    comes, and the poll in ParentWatch sends it). False where prctl is unavailable."""
    if platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The signal fires when the parent *thread* that started us exits: the fleet starts its
    # slots from its main thread, whose exit is the process's.
    return os.getppid() == parent_pid
