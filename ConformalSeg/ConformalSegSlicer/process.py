"""Run a command out of process, report its output and progress, and cancel it with all its children.

No Slicer, VTK or Qt here: :class:`ProcessRunner` starts the child with :class:`subprocess.Popen`
(stdout and stderr merged), a daemon thread reads the output as it comes and queues it, and
:meth:`ProcessRunner.poll` -- called from the owner's thread (in Slicer by a ``qt.QTimer``; in
scripts by :meth:`ProcessRunner.wait`) -- delivers the callbacks there, so callbacks may touch the
GUI. Output is split into lines at ``\\n``, ``\\r\\n`` *and* ``\\r`` (tqdm redraws its bar with
``\\r``); lines that are progress reports go to ``on_progress``, the others to ``on_output``.

Cancellation kills the whole process tree: the child is started in a new session / process group
(POSIX ``start_new_session``, Windows ``CREATE_NEW_PROCESS_GROUP``), so the PythonSlicer launcher,
the real Python it starts and any workers *those* start are all reached: ``SIGTERM`` to the group,
then ``SIGKILL`` to whatever is left after a grace period (Windows: ``taskkill /F /T``).

Progress lines understood by :func:`parse_progress`:

* an explicit ``PROGRESS 0.42 [label]`` or ``PROGRESS 42% [label]`` line;
* a tqdm bar ``desc:  42%|####      | 21/50 [00:03<00:04, 6.1case/s]`` (the ``done/total`` count
  is used when present, else the percentage);
* ``[label] 21/50 cases`` style counts (cases, windows, steps, splits, batches, passes, it).

Commands that draw several bars one after the other (``conformalseg evaluate``) are mapped onto one
overall fraction by :class:`StagedProgress`.
"""

from __future__ import annotations

import codecs
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike

OutputCallback = Callable[[str], None]
ProgressCallback = Callable[[float, str], None]
FinishedCallback = Callable[[int, bool], None]

_EXPLICIT = re.compile(r"^\s*PROGRESS[:\s]\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<pct>%?)\s*(?P<label>.*)$", re.IGNORECASE)
_TQDM_PERCENT = re.compile(r"^(?P<label>.*?)\s*(?P<pct>\d{1,3})%\|")
_TQDM_COUNT = re.compile(r"\|\s*(?P<done>\d+)/(?P<total>\d+)\s*\[")
_COUNT = re.compile(
    r"^(?P<label>.*?)\b(?P<done>\d+)\s*/\s*(?P<total>\d+)\s+"
    r"(?:cases?|windows?|steps?|splits?|batches?|passes|it)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Progress:
    """One progress report: ``fraction`` in [0, 1] of the bar it belongs to, and that bar's label."""

    fraction: float
    label: str = ""


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


def _clean_label(text: str) -> str:
    return text.strip().rstrip(":").strip()


def parse_progress(line: str) -> Progress | None:
    """The progress a line of output reports, or None (see the module docstring for the formats)."""
    match = _EXPLICIT.match(line)
    if match:
        value = float(match.group("value"))
        return Progress(_clamp(value / 100 if match.group("pct") else value), match.group("label").strip())
    match = _TQDM_PERCENT.match(line)
    if match:
        label = _clean_label(match.group("label"))
        count = _TQDM_COUNT.search(line)
        if count and int(count.group("total")) > 0:
            return Progress(_clamp(int(count.group("done")) / int(count.group("total"))), label)
        return Progress(_clamp(int(match.group("pct")) / 100), label)
    match = _COUNT.match(line)
    if match and int(match.group("total")) > 0:
        return Progress(
            _clamp(int(match.group("done")) / int(match.group("total"))), _clean_label(match.group("label")).strip("[]")
        )
    return None


class StagedProgress:
    """Overall progress of a command whose bars come one after the other.

    ``stages`` are (case-insensitive) substrings of the bar labels, in the order the command shows
    them; stage ``i`` of ``n`` covers ``[i/n, (i+1)/n]``. A bar whose label matches no stage counts
    as the current stage; the overall fraction never goes backwards.
    """

    def __init__(self, stages: Sequence[str] = ()):
        self.stages = tuple(s.lower() for s in stages)
        self._index = 0
        self._best = 0.0

    def overall(self, progress: Progress) -> float:
        if not self.stages:
            value = progress.fraction
        else:
            label = progress.label.lower()
            for i, stage in enumerate(self.stages):
                if stage and stage in label:
                    self._index = max(self._index, i)
                    break
            value = (self._index + progress.fraction) / len(self.stages)
        self._best = max(self._best, _clamp(value))
        return self._best


# ----------------------------------------------------------------------------- process groups


def popen_group_options() -> dict:
    """Popen keyword arguments that start the child in its own process group (and hide consoles)."""
    if os.name == "nt":
        flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200) | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen) -> bool:
    """True once the child has exited, without reaping it when the OS allows (so its pid -- the
    process group id -- cannot be reused before the group is killed)."""
    if proc.returncode is not None:
        return True
    waitid = getattr(os, "waitid", None)
    if waitid is not None and hasattr(os, "WNOWAIT"):
        try:
            return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def kill_process_tree(proc: subprocess.Popen, *, grace: float = 2.0) -> int | None:
    """Terminate ``proc`` and every process of its process group / tree; return its exit status.

    The child must have been started with :func:`popen_group_options`. POSIX: ``SIGTERM`` to the
    group, up to ``grace`` seconds for the child to exit, then ``SIGKILL`` to the group (children
    that ignored ``SIGTERM``, or outlived the child). Windows: ``taskkill /F /T /PID``.
    """
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
    else:
        pgid = proc.pid  # start_new_session: the child leads its own group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal_group(pgid, signal.SIGKILL)
    try:
        return proc.wait(timeout=max(grace, 5.0))
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
        return None


# ----------------------------------------------------------------------------- the runner


def split_lines(text: str) -> tuple[list[str], str]:
    """Complete lines of ``text`` (split at ``\\r\\n``, ``\\n`` or ``\\r``) and the unfinished rest."""
    parts = re.split(r"\r\n|\n|\r", text)
    rest = parts.pop()  # a \r\n split across two reads gives an extra empty line, which is skipped
    return parts, rest


class ProcessRunner:
    """Run ``argv`` in the background; see the module docstring.

    Callbacks: ``on_output(line)`` for every non-empty line that is not a progress report,
    ``on_progress(fraction, label)`` with the overall fraction (through :class:`StagedProgress`),
    ``on_finished(returncode, cancelled)`` once, after the last line. All of them run inside
    :meth:`poll` (or :meth:`wait`), in the caller's thread.

    ``popen`` is injectable for tests (anything with Popen's signature).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | PathLike[str] | None = None,
        on_output: OutputCallback | None = None,
        on_progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
        stages: Sequence[str] = (),
        grace: float = 2.0,
        popen: Callable[..., subprocess.Popen] = subprocess.Popen,
        max_output_lines: int = 20000,
    ):
        self.argv = [str(a) for a in argv]
        self.env = None if env is None else dict(env)
        self.cwd = None if cwd is None else str(cwd)
        self.on_output, self.on_progress, self.on_finished = on_output, on_progress, on_finished
        self.staged = StagedProgress(stages)
        self.grace = grace
        self._popen = popen
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._finished_reported = False
        self._reader_done = False
        self.cancelled = False
        self.returncode: int | None = None
        self.output: list[str] = []
        self.progress = 0.0
        self._max_lines = max_output_lines

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ProcessRunner:
        if self._proc is not None:
            raise RuntimeError("this runner was already started")
        self._proc = self._popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            bufsize=0,
            **popen_group_options(),
        )
        self._reader = threading.Thread(target=self._read, name="ConformalSeg process output", daemon=True)
        self._reader.start()
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def started(self) -> bool:
        return self._proc is not None

    @property
    def finished(self) -> bool:
        """True once ``on_finished`` has been delivered."""
        return self._finished_reported

    @property
    def running(self) -> bool:
        return self.started and not self.finished

    def _read(self) -> None:
        stream = self._proc.stdout
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        rest = ""
        try:
            while True:
                chunk = stream.read(65536)
                if not chunk:
                    break
                lines, rest = split_lines(rest + decoder.decode(chunk))
                for line in lines:
                    self._queue.put(("line", line))
            tail = rest + decoder.decode(b"", final=True)
            if tail:
                self._queue.put(("line", tail))
        except (OSError, ValueError) as exc:  # stream closed under us (cancel)
            self._queue.put(("line", f"[output reader stopped: {exc}]"))
        finally:
            self._queue.put(("eof", None))

    def poll(self) -> bool:
        """Deliver pending callbacks; return True while the process (or its output) is not finished."""
        if self._proc is None or self._finished_reported:
            return False
        eof = False
        while True:
            try:
                kind, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "eof":
                eof = True
                continue
            self._deliver(line)
        if eof:
            self._reader_done = True
        if self._reader_done and self._proc.poll() is not None:
            self.returncode = self._proc.returncode
            self._finished_reported = True
            if self.on_finished:
                self.on_finished(self.returncode, self.cancelled)
            return False
        return True

    def _deliver(self, line: str) -> None:
        text = line.rstrip()
        if not text.strip():
            return
        progress = parse_progress(text)
        if progress is not None:
            self.progress = self.staged.overall(progress)
            if self.on_progress:
                self.on_progress(self.progress, progress.label)
            return
        if len(self.output) < self._max_lines:
            self.output.append(text)
        if self.on_output:
            self.on_output(text)

    def cancel(self) -> None:
        """Kill the process and all its children (no-op once finished). ``on_finished`` still comes
        from a later :meth:`poll`, with ``cancelled=True``. Returns at once (the GUI thread calls it): the
        group gets SIGTERM here, and the grace period and SIGKILL run in a daemon thread."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self.cancelled = True
        if os.name != "nt":
            _signal_group(self._proc.pid, signal.SIGTERM)
        threading.Thread(
            target=kill_process_tree, args=(self._proc,), kwargs={"grace": self.grace}, daemon=True
        ).start()

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int | None:
        """Pump :meth:`poll` until the process has finished (or ``timeout`` seconds); return its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(interval)
        return self.returncode


def pid_alive(pid: int, *, timeout: float = 0.0) -> bool:
    """True while process ``pid`` runs; waits up to ``timeout`` seconds for it to go away. A zombie
    (exited, not yet reaped by its parent) counts as gone."""
    deadline = time.monotonic() + timeout
    while True:
        alive = _pid_running(pid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _pid_running(pid: int) -> bool:
    if os.name == "nt":
        out = subprocess.run(
            ["tasklist", "/FI", f"PID eq {int(pid)}", "/NH"], capture_output=True, text=True, check=False
        ).stdout
        return str(int(pid)) in out.split()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
