"""The life of a multi-process job after `parallel.initialize` joined it: a lost process
stops the others with one line, host-side stages run once, and the job ends in order.

Why this exists. By default JAX's coordination service, on noticing that a process
stopped sending heartbeats, aborts every other process from a C++ thread with a
multi-line fatal log that does not say which process was lost; a process that is blocked
in a collective at that moment may instead wait on a dead peer. `parallel.initialize`
therefore joins with `jax_enable_recoverability` (the service then no longer aborts
everyone), and a `Watchdog` thread in every process exchanges heartbeats with the others
through the service. When one is gone it prints one line naming it and ends the
process (`os._exit`: a process waiting in a collective cannot be unwound, and JAX's own
exit handler would wait for the lost process). The training loop needs no change: a
resumed run continues from the last complete checkpoint.

Limit: JAX runs the coordination service inside process 0. When process 0 itself is
lost, every other process ends at once with JAX's own message ("Terminating process
because the JAX distributed service detected fatal errors"); it cannot be intercepted.

Recoverable mode also means the service no longer holds processes at exit until all
arrive, so `finish` ends the job explicitly: a barrier, then the other processes
disconnect, then process 0 (whose exit takes the service down).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from transvw_jax.errors import ConfigError, TransVWError
from transvw_jax.fileio import atomic_write_text

POLL_S = 1.0
# Long enough for any host-side stage (discovery on a full data set) on process 0: a lost
# process is the watchdog's business, not this timeout's.
STAGE_WAIT_MS = 7 * 24 * 3600 * 1000
SHUTDOWN_WAIT_S = 30.0


def _client() -> Any:
    from jax._src import distributed  # the client JAX keeps once initialize() joined

    return distributed.global_state.client


def _stderr_line(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


class _KeyValueBeats:
    """Heartbeats through the coordination service's key-value store. (The client's
    `get_live_nodes` would tell the service's own view, but it is a barrier: it returns
    only when every live process calls it, which a free-running thread cannot rely on.)"""

    PREFIX = "transvw/alive/"

    def beat(self, index: int, value: str) -> None:
        _client().key_value_set(f"{self.PREFIX}{index}", value, allow_overwrite=True)

    def read(self) -> dict[int, str]:
        return {int(k.rsplit("/", 1)[1]): v for k, v in _client().key_value_dir_get(self.PREFIX)}


class Watchdog:
    """A daemon thread that ends this process with one line when another process of the
    job is lost (see the module doc): every process writes a counter to the coordination
    service each `poll_s` and reads the others'; a counter that has not moved for the
    heartbeat timeout is a lost process, an unreachable service a lost process 0.
    `beats`, `exit`, `report` and `clock` are replaceable for tests."""

    DONE = "done"  # stopped watching on purpose (end of job)
    LEAVING = "leaving"  # about to disconnect (finish)

    def __init__(self, heartbeat_timeout_s: int, poll_s: float = POLL_S, *, index: int | None = None,
                 count: int | None = None, beats: Any = None, exit: Callable[[int], None] = os._exit,
                 report: Callable[[str], None] = _stderr_line, clock: Callable[[], float] = time.monotonic):
        self.index = jax.process_index() if index is None else index
        self.count = jax.process_count() if count is None else count
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._poll_s = poll_s
        self._beats = beats or _KeyValueBeats()
        self._exit, self._report, self._clock = exit, report, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transvw-watchdog", daemon=True)
        self._counter = 0
        self._unreachable = False
        self._seen: dict[int, tuple[str | None, float]] = {}
        self.lost: list[int] | None = None

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, and tell the others this process ended on purpose."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5 * self._poll_s)
        try:
            self._beats.beat(self.index, self.DONE)
        except Exception:  # noqa: BLE001 - the service may be gone already
            pass

    def check(self) -> list[int] | None:
        """One round: beat, read the others; the processes lost so far, or None."""
        now = self._clock()
        try:
            self._counter += 1
            self._beats.beat(self.index, str(self._counter))
            values = self._beats.read()
        except Exception:  # noqa: BLE001 - the service is gone with process 0
            self._unreachable = True
            return [0]
        lost = []
        for i in range(self.count):
            if i == self.index:
                continue
            value = values.get(i)
            last_value, since = self._seen.get(i, (None, now))
            if value != last_value or value in (self.DONE, self.LEAVING):
                self._seen[i] = (value, now)
            elif now - since > self.heartbeat_timeout_s:
                lost.append(i)
        return lost or None

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            lost = self.check()
            if lost and not self._stop.is_set():
                self._stop_process(lost)
                return

    def _stop_process(self, lost: list[int]) -> None:
        self.lost = lost
        names = ", ".join(f"process {i}" + (" (the coordinator)" if i == 0 else "") for i in lost)
        why = ("its coordination service is unreachable" if self._unreachable
               else f"no heartbeat for {self.heartbeat_timeout_s} s")
        self._report(f"lost {names} of {self.count} ({why}): stopping process {self.index}. Restart all "
                     f"{self.count} processes with the same command to resume from the last checkpoint")
        logging.shutdown()
        if self.index == 0 and self.count > 2:
            # Process 0 hosts the service: give the others time to print their own line
            # before its exit takes the service down.
            time.sleep(3 * self._poll_s)
        self._exit(1)

    def await_verdict(self) -> None:
        """Called after an unexpected error in a multi-process job (a collective that failed
        because a peer died raises before the heartbeat timeout has passed): wait until the
        watchdog has decided, up to the heartbeat timeout plus a margin, then return so that
        the caller re-raises a genuine error."""
        deadline = time.monotonic() + self.heartbeat_timeout_s + 5 * self._poll_s
        while time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(self._poll_s / 4)


def once_per_job(name: str, work: Callable[[], None]) -> None:
    """Run `work` on process 0 while the others wait; every process then continues, or,
    when process 0's work failed, raises StageFailedElsewhere with its message and exit
    code (so the whole job stops with one line each, instead of the others waiting)."""
    if jax.process_count() == 1:
        work()
        return
    client, key = _client(), f"transvw/stage/{name}"
    if jax.process_index() == 0:
        try:
            work()
        except Exception as e:
            code = e.exit_code if isinstance(e, TransVWError) else 1
            message = " ".join(str(e).split()) or type(e).__name__
            client.key_value_set(key, f"{code}|{type(e).__name__}|{message}")
            raise
        client.key_value_set(key, "ok")
        return
    outcome = client.blocking_key_value_get(key, STAGE_WAIT_MS)
    if outcome != "ok":
        code, kind, message = outcome.split("|", 2)
        raise StageFailedElsewhere(f"process 0 failed ({kind}): {message}", int(code))


_rounds: dict[str, int] = {}


def _round(name: str) -> str:
    """A key unique to this call of `name`: every process makes the same calls in the same
    order, so the n-th call has the same key everywhere."""
    _rounds[name] = _rounds.get(name, 0) + 1
    return f"transvw/{name}/{_rounds[name]}"


def gather(name: str, value: str) -> list[str]:
    """Every process's `value`, in process order (one key-value exchange through the
    coordination service: no compiled collective, so it works before any step runs)."""
    if jax.process_count() == 1:
        return [value]
    client, key = _client(), _round(name)
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    return [client.blocking_key_value_get(f"{key}/{i}", STAGE_WAIT_MS) for i in range(jax.process_count())]


def processes_failing(name: str, ok: bool, detail: str = "") -> list[tuple[int, str]]:
    """(process index, its `detail`) for every process whose `ok` is false; the same list on
    every process, so that all of them can stop with the same line."""
    views = gather(name, f"{int(ok)} {detail}")
    return [(i, v.split(" ", 1)[1]) for i, v in enumerate(views) if not v.startswith("1")]


def from_process_zero(name: str, value: str) -> str:
    """Process 0's `value`, on every process: one decision where each process could make
    its own (e.g. from a file system that shows them different things)."""
    if jax.process_count() == 1:
        return value
    client, key = _client(), _round(name)
    if jax.process_index() == 0:
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, STAGE_WAIT_MS)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        _client().wait_at_barrier(_round(name), STAGE_WAIT_MS)


SHARED_WAIT_S = 15.0  # NFS clients may cache a directory's listing for seconds


def check_shared_directory(directory: Path, what: str) -> None:
    """Raise ConfigError on every process unless all of them see the same `directory`.

    Checkpoints are written shard by shard by every process into one directory and read
    back by all: with per-host disks, each process would see only its own files and the
    job would hang or resume from different steps. Process 0 writes a file with a random
    name into `directory`; every process looks for it (for up to SHARED_WAIT_S, as network
    file systems may show it late), and all raise the same one-line error when one cannot.
    """
    if jax.process_count() == 1:
        return
    index = jax.process_index()
    nonce = from_process_zero("shared-nonce", uuid.uuid4().hex if index == 0 else "")
    probe = directory / f".transvw-shared-{nonce}"
    if index == 0:
        atomic_write_text(probe, nonce)
    barrier("shared-written")
    deadline = time.monotonic() + SHARED_WAIT_S
    seen = False
    while True:
        try:
            seen = probe.read_text() == nonce
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    blind = processes_failing("shared-seen", seen, socket.gethostname())
    if index == 0:
        probe.unlink(missing_ok=True)
    if blind:
        who = ", ".join(f"process {i} (host {host})" for i, host in blind)
        count = jax.process_count()
        raise ConfigError(f"{what} {directory} is not shared by all {count} processes: {who} cannot see "
                          f"the file process 0 wrote there; put it on storage every process mounts at the "
                          f"same path (NFS, Filestore, gcsfuse)")


class Preemption:
    """Whether the job has been asked to stop (SIGTERM), decided at the same step on every
    process, so that all of them save that step and leave.

    In a `jax.distributed` job JAX's preemption service catches SIGTERM on any process
    and agrees on a step every process can still reach (`reached_preemption_sync_point`,
    which every process must ask at every step). A single process has no service: a
    SIGTERM handler, installed for the duration of the `with` block, sets a flag.
    """

    def __init__(self) -> None:
        from jax._src import distributed

        self._service = distributed.global_state.preemption_sync_manager is not None
        self._signalled = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._signalled.set())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        """Call once per step, with the step just completed, on every process."""
        if self._service:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled.is_set()


class StageFailedElsewhere(TransVWError):
    """A host-side stage failed on process 0 (this process saw its message)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class AlignedFirstCall:
    """A jitted step whose first call compiles ahead of time and then waits at a
    coordination-service barrier for every process before running.

    Why: a program's first run sets up its cross-process collectives, and on CPU (gloo)
    that set-up gives up after 30 s; one process that compiles longer than another (another
    load, a persistent-cache hit on one side only) would make the job fail there. Later
    calls run the compiled program directly. In a single-process job this is the plain
    jitted function.
    """

    _count = 0

    def __init__(self, fn: Callable, name: str):
        self._fn, self._name = fn, name
        self._compiled: Any = None

    def __call__(self, *args: Any) -> Any:
        if jax.process_count() == 1:
            return self._fn(*args)
        if self._compiled is None:
            compiled = self._fn.lower(*args).compile()
            AlignedFirstCall._count += 1
            barrier = f"transvw/compiled/{self._name}/{AlignedFirstCall._count}"
            _client().wait_at_barrier(barrier, STAGE_WAIT_MS)
            self._compiled = compiled
        return self._compiled(*args)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn.lower(*args, **kwargs)


def aligned(steps: Any) -> Any:
    """`steps` (a dataclass of jitted functions, e.g. training.Steps) with every function an
    AlignedFirstCall."""
    import dataclasses

    return dataclasses.replace(steps, **{
        f.name: AlignedFirstCall(getattr(steps, f.name), f.name)
        for f in dataclasses.fields(steps) if getattr(steps, f.name) is not None})


def may_be_a_lost_process(error: BaseException) -> bool:
    """Whether `error` can come from another process dying (a failed collective, barrier or
    coordination call): then the watchdog's verdict is worth waiting for."""
    if isinstance(error, TransVWError):
        return False
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, jax.errors.JaxRuntimeError) or any(
        word in text for word in ("gloo", "barrier", "coordination", "unavailable", "deadline_exceeded",
                                  "connection reset", "socket closed"))


def finish(watchdog: Watchdog | None, ok: bool) -> None:
    """End a multi-process job in order (see the module doc). `ok`: every process got here
    without an error, so a barrier is safe; after an error some processes may never come,
    so each leaves on its own (process 0 last, up to SHUTDOWN_WAIT_S)."""
    if watchdog is None or jax.process_count() == 1:
        return
    watchdog.stop()
    if ok:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("transvw: end of job")
    beats = _KeyValueBeats()
    if jax.process_index() != 0:
        try:
            beats.beat(jax.process_index(), Watchdog.LEAVING)
        except Exception:  # noqa: BLE001 - the service is gone already
            pass
    else:
        # Process 0's exit takes the service down: wait for the others to leave first.
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while time.monotonic() < deadline:
            try:
                values = beats.read()
            except Exception:  # noqa: BLE001 - nothing more to wait for
                break
            if all(values.get(i) == Watchdog.LEAVING for i in range(1, jax.process_count())):
                time.sleep(0.5)  # their shutdown call follows the mark
                break
            time.sleep(0.1)
    jax.distributed.shutdown()
