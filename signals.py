"""
Stopping a run by a signal as one stops it with Ctrl-C. `timeout`, `docker stop`,
systemd and batch schedulers send SIGTERM; a closed terminal sends SIGHUP. During an
edit both raise `Terminated`, a KeyboardInterrupt, so the edit closes its outputs
with every finished chunk kept and exits 128 + the signal's number (143, 129; 130
for Ctrl-C). While Python is still loading (before `main` runs) any of the three
ends the process at once with one line: nothing has been written yet. Once the
command has closed its outputs, `exit_at_once` ends it without the teardown.
"""

import os
import signal
import sys
import threading
from contextlib import contextmanager

STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during the edit; `code` is the exit code it asks for."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.code = signum, 128 + signum


def quiet_until_started():
    """Until `handled()` takes over, a stopping signal ends the process with one line."""
    def stop(signum, frame):
        os.write(2, b"interrupted while starting; nothing was written\n")
        os._exit(128 + signum)
    for signum in STOPPING:
        signal.signal(signum, stop)


@contextmanager
def handled():
    """Within: Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP raise Terminated (in
    the main thread, wherever it is). Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(signum)
    before = {signum: signal.getsignal(signum) for signum in STOPPING}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def exit_at_once(code):
    """End the process with `code` now, skipping the interpreter's and CUDA's teardown
    (freeing every module, the cached GPU memory and the context: about 1 s at real
    shapes, BENCHMARKS.md "The user's command, where its time goes"). Only for a command
    whose files are all closed: standard output and error, which Python would still
    flush, are flushed here."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # the process was started with it closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone or a stream closed: nothing more can reach it
            pass
    os._exit(code)
