"""What `ramjet demo` shows on a terminal.

Runs the demo under a pseudo-terminal (stdout and stderr both on it, as in a shell), reads
everything it writes through a VT100 screen (pyte), and checks what a user sees: every event
line of both sides is still on screen at the end (the progress bars, drawn and cleared on the
same terminal, never overwrite them), the progress line tells the real round and the bytes it
still has to send while round 1 runs, and never shows an expected downtime of 0.0ns (one that
was not measured yet). The screen is large enough that nothing scrolls off.

Run: PY test_terminal.py /path/to/ramjet (PY from tools/tests/python/venv). Prints `ok NAME`
for each case that passed; exits non-zero with the reason and the screen on failure.
"""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pyte

COLUMNS, ROWS = 200, 300

# Small and quick, yet round 1 lasts long enough to be sampled (the progress is sampled every
# 100 ms): the link is capped, so the round's ~70 MiB on the wire take most of a second.
DEMO = ["demo", "--size", "256M", "--max-bandwidth", "100M/s", "--dirty-rate", "5000"]

# Only a guard against a hung demo, never a measure of speed.
HANG = 300

EVENT = re.compile(r"^(source|destination) +MIGRATION\S* ")
PROGRESS = re.compile(r"\bmigration round (\d+)\b")
REMAINING = re.compile(r"\bremaining (\d+(?:\.\d+)?) (B|KiB|MiB|GiB)\b")
# Escape sequences that erase: a snapshot is taken before each, so every line is seen before
# anything clears it.
ERASE = re.compile(rb"\x1b\[[0-9;?]*[JK]")
# For reading the events out of the raw bytes.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


class Terminal:
    """A pyte screen fed with what the program writes, remembering every line it showed."""

    def __init__(self):
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        # Every text a screen line held at some point, in order of appearance.
        self.seen = []

    def feed(self, data):
        self.raw += data
        at = 0
        for match in ERASE.finditer(data):
            self.stream.feed(data[at : match.start()])
            self.snapshot()
            at = match.start()
        self.stream.feed(data[at:])
        self.snapshot()

    def line(self, y):
        row = self.screen.buffer[y]
        return "".join(row[x].data for x in range(self.screen.columns)).rstrip()

    def snapshot(self):
        for y in sorted(self.screen.dirty):
            text = self.line(y)
            if text:
                self.seen.append(text)
        self.screen.dirty.clear()

    def display(self):
        return [line.rstrip() for line in self.screen.display]


def run_demo(ramjet):
    """Runs the demo on a fresh pseudo-terminal; its exit status and the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(COLUMNS), LINES=str(ROWS))
    child = subprocess.Popen(
        [ramjet, *DEMO],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    os.close(slave)
    terminal = Terminal()
    deadline = time.monotonic() + HANG
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(child.pid, signal.SIGKILL)
                raise Failure(f"ramjet demo did not end within {HANG}s")
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal.
                break
            if not data:
                break
            terminal.feed(data)
        status = child.wait(timeout=HANG)
    finally:
        os.close(master)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return status, terminal


def events_written(terminal):
    """The event lines in the order the program wrote them, read from the raw bytes."""
    text = ANSI.sub("", terminal.raw.decode("utf-8", "replace"))
    lines = []
    for piece in re.split(r"[\r\n]+", text):
        found = re.search(r"(source|destination) +MIGRATION\S* .*", piece)
        if found:
            lines.append(found.group(0).rstrip())
    return lines


def remaining_bytes(line):
    found = REMAINING.search(line)
    if not found:
        return None
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[found.group(2)]
    return float(found.group(1)) * scale


def every_event_stays_on_screen(terminal):
    screen = terminal.display()
    shown = [line for line in screen if EVENT.match(line)]
    written = events_written(terminal)
    check(written, "the demo wrote no event line")
    check(
        shown == written,
        "the final screen does not show every event line the demo wrote, in order:\n"
        f"written: {written}\non screen: {shown}",
    )
    for side in ("source", "destination"):
        for status in ("setup", "active", "completed"):
            want = f"{side:<11} MIGRATION {status}"
            check(want in screen, f"the final screen lacks `{want}`")
    check(
        "verified: destination identical" in screen,
        "the final screen lacks the demo's verification line",
    )


def round_1_shows_its_round_and_remaining_bytes(terminal):
    progress = [line for line in terminal.seen if PROGRESS.search(line)]
    check(progress, "no progress line was ever shown")
    round_1 = [line for line in progress if PROGRESS.search(line).group(1) == "1"]
    check(round_1, f"no progress line showed round 1; they were: {progress[:20]}")
    check(
        any((remaining_bytes(line) or 0) > 0 for line in round_1),
        f"no round 1 progress line showed bytes remaining: {round_1[:20]}",
    )
    check(
        all("%" in line for line in round_1),
        f"a round 1 progress line has no percentage: {round_1[:20]}",
    )
    rounds = [int(PROGRESS.search(line).group(1)) for line in progress]
    check(0 not in rounds, "a progress line showed round 0")


def no_unmeasured_downtime_is_shown(terminal):
    zero = [line for line in terminal.seen if "0.0ns" in line]
    check(not zero, f"a line showed a downtime of 0.0ns: {zero[:5]}")


def preparing_shows_progress_and_leaves_nothing(terminal):
    preparing = [line for line in terminal.seen if line.lstrip().startswith("preparing [")]
    check(preparing, "no progress was shown while the guest was prepared")
    screen = terminal.display()
    left = [
        line
        for line in screen
        if line.lstrip().startswith("preparing [")
        or PROGRESS.search(line)
        or re.match(r"^ +ch\d+ ", line)
    ]
    check(not left, f"progress lines were left on the final screen: {left}")


CASES = [
    every_event_stays_on_screen,
    round_1_shows_its_round_and_remaining_bytes,
    no_unmeasured_downtime_is_shown,
    preparing_shows_progress_and_leaves_nothing,
]


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} /path/to/ramjet")
    ramjet = sys.argv[1]
    status, terminal = run_demo(ramjet)
    screen = "\n".join(line for line in terminal.display() if line)
    if status != 0:
        sys.exit(f"FAIL: ramjet demo exited with {status}; the screen:\n{screen}")
    failed = 0
    for case in CASES:
        try:
            case(terminal)
        except Failure as e:
            failed += 1
            print(f"FAIL {case.__name__}: {e}", flush=True)
        else:
            print(f"ok {case.__name__}", flush=True)
    if failed:
        sys.exit(f"{failed} of {len(CASES)} cases failed; the final screen:\n{screen}")


if __name__ == "__main__":
    main()
