"""QEMU's own QMP client (qemu.qmp) drives `ramjet recv --qmp` and `ramjet send --qmp` as
management software drives two QEMUs: capabilities and parameters, migrate-incoming, migrate,
MIGRATION events until the end, query-migrate on both sides. Each case prints `ok NAME`.

Usage: python test_qmp.py /path/to/ramjet
"""

import asyncio
import filecmp
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient

RAMJET = sys.argv[1]
# Every wait is bounded: a hang fails the case with what was seen, never the whole run.
LIMIT = 60.0
TERMINAL = ("completed", "failed", "cancelled")


class Side:
    """One ramjet process and the QMP client connected to it."""

    def __init__(self, name, argv, sock):
        self.name = name
        self.sock = sock
        self.log = open(sock + ".log", "w+")
        self.proc = subprocess.Popen([RAMJET] + argv, stdout=self.log, stderr=self.log)
        self.qmp = QMPClient(name)
        self.statuses = []

    async def connect(self):
        deadline = time.monotonic() + LIMIT
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never listened:\n{self.output()}")
            await asyncio.sleep(0.02)
        await asyncio.wait_for(self.qmp.connect(self.sock), LIMIT)
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
        )

    async def execute(self, cmd, args=None):
        return await asyncio.wait_for(self.qmp.execute(cmd, args), LIMIT)

    async def refused(self, cmd, args=None):
        """Runs a command that must fail; returns its error class and text."""
        try:
            reply = await self.execute(cmd, args)
        except ExecuteError as e:
            return e.error_class, str(e)
        raise AssertionError(f"{self.name}: {cmd} {args} succeeded: {reply}")

    async def until(self, *statuses):
        """Reads MIGRATION events until one of `statuses`; returns it."""

        async def read():
            async for event in self.qmp.events:
                if event["event"] == "MIGRATION":
                    status = event["data"]["status"]
                    self.statuses.append(status)
                    if status in statuses:
                        return status
            raise AssertionError(f"{self.name}: events ended")

        try:
            return await asyncio.wait_for(read(), LIMIT)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"{self.name}: no {statuses} after {self.statuses}\n{self.output()}"
            ) from None

    async def quit(self, status=0):
        await self.execute("quit")
        try:
            await self.qmp.disconnect()
        except EOFError:
            # The server closed the stream after quit, as QEMU does (QEMU's own
            # machine.py accepts this EOF once quit was issued).
            pass
        code = self.proc.wait(LIMIT)
        assert code == status, f"{self.name} exited {code}:\n{self.output()}"

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def image(dir, size="32M"):
    path = os.path.join(dir, "guest.img")
    subprocess.run([RAMJET, "image", "--size", size, path], check=True, capture_output=True)
    return path


def destination(dir, name="dst", size="32M", extra=()):
    sock = os.path.join(dir, name + ".qmp")
    out = os.path.join(dir, name + ".out")
    argv = ["recv", "--qmp", "unix:" + sock, "--memory", size, "--out", out, *extra]
    return Side(name, argv, sock), out


def source(dir, img, extra=()):
    sock = os.path.join(dir, "src.qmp")
    return Side("src", ["send", "--qmp", "unix:" + sock, "--image", img, *extra], sock)


async def case(name, body):
    sides = []
    with tempfile.TemporaryDirectory(prefix="ramjet-qmp-") as dir:
        try:
            await body(dir, sides)
        except BaseException:
            for side in sides:
                print(f"--- {side.name}:\n{side.output()}", file=sys.stderr)
            raise
        finally:
            for side in sides:
                side.kill()
    print(f"ok {name}")


async def migrates(dir, sides):
    """The whole exchange, as libvirt does it, and a byte-identical copy."""
    img = image(dir)
    dst, out = destination(dir)
    src = source(dir, img)
    sides += [dst, src]
    await dst.connect()
    await src.connect()
    assert dst.qmp.greeting.QMP.version["qemu"]["major"] == 10
    caps = await src.execute("query-migrate-capabilities")
    assert {"capability": "events", "state": True} in caps, caps
    params = {"multifd-channels": 3, "downtime-limit": 500, "max-bandwidth": 0}
    await src.execute("migrate-set-parameters", params)
    got = await src.execute("query-migrate-parameters")
    assert all(got[k] == v for k, v in params.items()), got
    assert (await dst.execute("query-migrate"))["status"] == "none"
    assert (await dst.execute("query-status"))["status"] == "inmigrate"
    uri = "unix:" + os.path.join(dir, "migration.sock")
    assert await dst.execute("migrate-incoming", {"uri": uri}) == {}
    # One incoming migration per process, as in QEMU.
    cls, text = await dst.refused("migrate-incoming", {"uri": uri})
    assert cls == "GenericError" and "already been started" in text, text
    assert await src.execute("migrate", {"uri": uri}) == {}
    assert await src.until(*TERMINAL) == "completed", src.statuses
    assert await dst.until(*TERMINAL) == "completed", dst.statuses
    assert src.statuses == ["setup", "active", "device", "completed"], src.statuses
    assert dst.statuses == ["setup", "active", "completed"], dst.statuses
    for side in (src, dst):
        info = await side.execute("query-migrate")
        assert info["status"] == "completed", info
        ram = info["ram"]
        assert ram["total"] == 32 << 20 and ram["transferred"] > 0, ram
        assert ram["normal"] + ram["duplicate"] == 8192, ram
        assert "total-time" in info, info
    assert (await src.execute("query-status"))["status"] == "postmigrate"
    # `completed` came after --out was written.
    assert filecmp.cmp(img, out, shallow=False), "the copy differs"
    # Handed over: the guest never runs at the source again.
    cls, text = await src.refused("migrate", {"uri": uri})
    assert "handed over" in text, text
    cls, text = await src.refused("cont")
    assert "handed over" in text, text
    await src.quit()
    await dst.quit()


async def cancels(dir, sides):
    """A cancel leaves the guest running at the source, which then migrates it elsewhere."""
    img = image(dir)
    dst, _ = destination(dir)
    src = source(dir, img, ["--live-dirty-rate", "2000"])
    sides += [dst, src]
    await dst.connect()
    await src.connect()
    assert (await src.execute("query-status"))["status"] == "running"
    # Slow enough to be cancelled while active.
    await src.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
    uri = "unix:" + os.path.join(dir, "migration.sock")
    await dst.execute("migrate-incoming", {"uri": uri, "exit-on-error": False})
    await src.execute("migrate", {"uri": uri})
    await src.until("active")
    assert await src.execute("migrate_cancel") == {}
    assert await src.until(*TERMINAL) == "cancelled", src.statuses
    assert src.statuses == ["setup", "active", "cancelling", "cancelled"], src.statuses
    assert await dst.until(*TERMINAL) == "failed", dst.statuses
    info = await dst.execute("query-migrate")
    assert info["status"] == "failed" and info["error-desc"], info
    assert (await src.execute("query-migrate"))["status"] == "cancelled"
    # The source kept the guest, running.
    assert (await src.execute("query-status"))["status"] == "running"
    # Cancelling when nothing runs is no error.
    assert await src.execute("migrate_cancel") == {}
    # The same source migrates it again, to a new destination, at full speed.
    dst2, _ = destination(dir, "dst2")
    sides.append(dst2)
    await dst2.connect()
    uri2 = "unix:" + os.path.join(dir, "migration2.sock")
    await dst2.execute("migrate-incoming", {"uri": uri2})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
    src.statuses.clear()
    await src.execute("migrate", {"uri": uri2})
    assert await src.until(*TERMINAL) == "completed", src.statuses
    assert await dst2.until(*TERMINAL) == "completed", dst2.statuses
    assert (await src.execute("query-status"))["status"] == "postmigrate"
    await src.quit()
    await dst2.quit()
    # The first destination, its migration failed, still answers (exit-on-error off).
    await dst.quit()


async def pauses_before_switchover(dir, sides):
    """pause-before-switchover holds the migration in pre-switchover until migrate-continue."""
    img = image(dir)
    dst, out = destination(dir)
    src = source(dir, img)
    sides += [dst, src]
    await dst.connect()
    await src.connect()
    await src.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "pause-before-switchover", "state": True}]},
    )
    uri = "unix:" + os.path.join(dir, "migration.sock")
    await dst.execute("migrate-incoming", {"uri": uri})
    cls, _ = await src.refused("migrate-continue", {"state": "pre-switchover"})
    assert cls == "GenericError"
    await src.execute("migrate", {"uri": uri})
    await src.until("pre-switchover")
    assert (await src.execute("query-migrate"))["status"] == "pre-switchover"
    # Capabilities stay as they are while a migration runs.
    cls, text = await src.refused(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "pause-before-switchover", "state": False}]},
    )
    assert "in progress" in text, text
    cls, text = await src.refused("migrate-continue", {"state": "active"})
    assert "pre-switchover" in text, text
    assert await src.execute("migrate-continue", {"state": "pre-switchover"}) == {}
    assert await src.until(*TERMINAL) == "completed", src.statuses
    assert src.statuses == ["setup", "active", "pre-switchover", "device", "completed"]
    assert await dst.until(*TERMINAL) == "completed", dst.statuses
    assert filecmp.cmp(img, out, shallow=False), "the copy differs"
    await src.quit()
    await dst.quit()


async def nobody_listens(dir, sides):
    """A receiver that is not listening: the migration fails with why, the guest stays."""
    img = image(dir)
    src = source(dir, img, ["--timeout", "2"])
    sides.append(src)
    await src.connect()
    uri = "unix:" + os.path.join(dir, "nobody.sock")
    await src.execute("migrate", {"uri": uri})
    assert await src.until(*TERMINAL) == "failed", src.statuses
    info = await src.execute("query-migrate")
    assert info["status"] == "failed" and "nobody.sock" in info["error-desc"], info
    # An image has no vCPU: it stays paused, here, ready to be migrated again.
    assert (await src.execute("query-status"))["status"] == "paused"
    cls, text = await src.refused("cont")
    assert "no vCPU" in text, text
    # A bad URI is the command's own error.
    cls, text = await src.refused("migrate", {"uri": "rdma:host:1"})
    assert cls == "GenericError" and "tcp: or unix:" in text, text
    await src.quit()


async def destination_exits_on_error(dir, sides):
    """As QEMU: an incoming migration that fails ends the destination's process."""
    dst, _ = destination(dir)
    sides.append(dst)
    await dst.connect()
    sock = os.path.join(dir, "migration.sock")
    await dst.execute("migrate-incoming", {"uri": "unix:" + sock})
    # A sender whose guest has another size: refused, and the migration fails on both.
    src = source(dir, image(dir, "16M"))
    sides.append(src)
    await src.connect()
    await src.execute("migrate", {"uri": "unix:" + sock})
    assert await src.until(*TERMINAL) == "failed", src.statuses
    info = await src.execute("query-migrate")
    assert "memory layouts differ" in info["error-desc"], info
    assert await dst.until(*TERMINAL) == "failed", dst.statuses
    code = dst.proc.wait(LIMIT)
    assert code == 1, f"dst exited {code}"
    try:
        await dst.qmp.disconnect()
    except EOFError:
        pass  # it closed the stream when it exited
    await src.quit()


async def postcopy(dir, sides):
    """migrate-start-postcopy, then migrate-pause and a resume: postcopy with recovery."""
    img = image(dir, "16M")
    dst, _ = destination(dir, size="16M")
    src = source(dir, img, ["--live-dirty-rate", "5000"])
    sides += [dst, src]
    await dst.connect()
    await src.connect()
    cls, text = await src.refused("migrate-start-postcopy")
    assert "Enable postcopy" in text, text
    for side in (src, dst):
        await side.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "postcopy-ram", "state": True}]},
        )
    # Slow enough that postcopy is still pushing when it is paused.
    await src.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
    uri = "unix:" + os.path.join(dir, "migration.sock")
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})
    await src.until("active")
    assert await src.execute("migrate-start-postcopy") == {}
    await src.until("postcopy-active")
    await dst.until("postcopy-active")
    # Postcopy cannot be cancelled: the guest runs on the destination.
    cls, text = await src.refused("migrate_cancel")
    assert cls == "GenericError", text
    assert await src.execute("migrate-pause") == {}
    await src.until("postcopy-paused")
    await dst.until("postcopy-paused")
    cls, text = await dst.refused("migrate-recover", {"uri": "unix:/elsewhere.sock"})
    assert "not supported" in text, text
    assert await dst.execute("migrate-recover", {"uri": uri}) == {}
    # Parameters are read when a migration starts, not while it runs.
    cls, text = await src.refused("migrate-set-parameters", {"max-bandwidth": 0})
    assert "in progress" in text, text
    assert await src.execute("migrate", {"uri": uri, "resume": True}) == {}
    assert await src.until(*TERMINAL) == "completed", src.statuses
    assert await dst.until(*TERMINAL) == "completed", dst.statuses
    seen = src.statuses
    for status in ("postcopy-recover-setup", "postcopy-recover", "postcopy-active"):
        assert status in seen[seen.index("postcopy-paused"):], seen
    info = await src.execute("query-migrate")
    assert info["status"] == "completed", info
    await src.quit()
    await dst.quit()


CASES = [
    ("a_migration_driven_like_qemu_completes_byte_identical", migrates),
    ("a_cancel_keeps_the_guest_running_and_it_migrates_again", cancels),
    ("pause_before_switchover_waits_for_migrate_continue", pauses_before_switchover),
    ("a_receiver_that_is_not_listening_fails_the_migration", nobody_listens),
    ("a_failed_incoming_migration_ends_the_destination", destination_exits_on_error),
    ("postcopy_started_paused_and_resumed_over_qmp", postcopy),
]


async def main():
    only = sys.argv[2:]
    for name, body in CASES:
        if not only or name in only:
            await case(name, body)


asyncio.run(main())
