"""What a command line shows while it runs: its own lines, and one live progress line (a tqdm bar in a terminal, a plain
line every PLAIN_EVERY_S elsewhere). The trial command (trial/progress.py) and the sweeps (sweep/progress.py) draw on it.

Ray's own output (its banners, Tune's tables and result boxes, the workers' logs that Ray forwards to the driver)
goes to a log file in the run's folder instead (`output_to`), unless the user asks for it (-v). The command's lines
still reach the terminal: they are written to a copy of the terminal's file descriptor taken before the redirection.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, TextIO

from tqdm import tqdm

from ..storage import is_remote

PLAIN_EVERY_S = 15.0  # how often a progress line is printed when the output is not a terminal


class Console:
    """The stream a command's own lines go to, and the progress line drawn at its bottom when it is a terminal."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.bar: Optional[tqdm] = None
        self.printed = 0.0  # when the last plain progress line was printed (time.monotonic)

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)  # above the bar, which is drawn again below it
        else:
            print(line, file=self.stream, flush=True)

    def show(self, line: str, now: bool = False) -> None:
        """The progress line: the bar's text in a terminal; elsewhere a line of its own, at most one every
        PLAIN_EVERY_S unless `now`."""
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=0, file=self.stream, bar_format="{desc}", dynamic_ncols=True, leave=False)
            self.bar.set_description_str(line)
        elif now or time.monotonic() - self.printed >= PLAIN_EVERY_S:
            self.say(line)
            self.printed = time.monotonic()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_redirected: Optional[Console] = None  # while output_to sends the process's output to a log: the terminal
_plain: Optional[Console] = None


def console() -> Console:
    """Where a command's lines go now: the terminal, also while Ray's output goes to a log file; else standard output
    as it is now (a caller may have replaced sys.stdout)."""
    global _plain
    if _redirected is not None:
        return _redirected
    if _plain is None or _plain.stream is not sys.stdout:
        _plain = Console(sys.stdout)
    return _plain


class Redirect:
    """The file that this process's output goes to inside output_to: a temporary one until move_to names the log."""

    def __init__(self, file: Optional[TextIO]):
        self.file = file
        self.temporary = file is not None

    def move_to(self, log: Path) -> None:
        """Go on in `log` (appended to; its folder created), the output so far first. Called once the run is sure to
        go ahead, so that a run its checks refuse leaves no folder behind."""
        if self.file is None:
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        final = open(log, "a", buffering=1)
        for stream in (sys.stdout, sys.stderr, self.file):
            stream.flush()
        final.write(Path(self.file.name).read_text())
        for fd in (1, 2):
            os.dup2(final.fileno(), fd)
        sys.stdout = sys.stderr = final  # output_to's redirect_stdout and redirect_stderr put the originals back
        self.close()
        self.file, self.temporary = final, False

    def close(self) -> None:
        """Close the file; a temporary one that was never moved is removed."""
        if self.file is not None:
            self.file.close()
            if self.temporary:
                os.remove(self.file.name)


@contextlib.contextmanager
def output_to(quiet: bool) -> Iterator[Redirect]:
    """With `quiet`, send everything this process writes to its standard output and error (Ray, Tune, the workers'
    forwarded logs, warnings) to a file for the duration of the block, while console() keeps writing where standard
    output went before; the file is temporary until the Redirect yielded moves it to the run's log. Without `quiet`
    (verbose), leave the output as it is.

    Both the file descriptors (what Ray's C++ core and subprocesses write) and Python's sys.stdout and sys.stderr
    (which a notebook or pytest may have pointed elsewhere) are redirected.
    """
    global _redirected
    if not quiet:
        yield Redirect(None)
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    previous = _redirected
    # A process's own standard output is about to become the log: write to a copy of it. Any other stream stays as it is.
    owned = writes_to_fd_1(sys.stdout)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1) if owned else sys.stdout
    redirect = Redirect(tempfile.NamedTemporaryFile("w", prefix="densetune-", suffix=".log", delete=False, buffering=1))
    with contextlib.redirect_stdout(redirect.file), contextlib.redirect_stderr(redirect.file):
        for fd in (1, 2):
            os.dup2(redirect.file.fileno(), fd)
        _redirected = Console(terminal)
        try:
            yield redirect
        finally:
            _redirected.close_bar()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            _redirected = previous
            redirect.close()
            if owned:
                terminal.close()


def writes_to_fd_1(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


def local_folder(folder: str, name: str) -> Path:
    """Where the driver writes a run's own files (its log, a sweep's summary): the run's folder, or for a run on a
    remote storage path, a folder of the same name in this machine's temporary folder."""
    return Path(folder) if not is_remote(folder) else Path(tempfile.gettempdir()) / "densetune" / name


def clock(seconds: float) -> str:
    """1:02:03, 4:05."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
