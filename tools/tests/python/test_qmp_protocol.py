"""The QMP protocol's edge cases over a raw socket, against `ramjet send --qmp`: what QEMU's
monitor does with commands before negotiation, unknown commands, wrong arguments, malformed
and oversized JSON, a second client, and a client that disappears. Each case prints
`ok NAME`.

Usage: python test_qmp_protocol.py /path/to/ramjet
"""

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time

RAMJET = sys.argv[1]
LIMIT = 30.0


class Client:
    """One raw connection: bytes out, JSON lines in."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(LIMIT)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def ready(self, wait):
        """Whether a line (or the end) arrives within `wait` seconds."""
        if b"\n" in self.buf:
            return True
        return bool(select.select([self.sock], [], [], wait)[0])

    def recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self):
        """The next reply, skipping events."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def execute(self, name, args=None, id=None):
        cmd = {"execute": name}
        if args is not None:
            cmd["arguments"] = args
        if id is not None:
            cmd["id"] = id
        self.send(json.dumps(cmd))
        return self.reply()

    def negotiate(self):
        greeting = self.recv()
        assert "QMP" in greeting, greeting
        assert self.execute("qmp_capabilities") == {"return": {}}
        return greeting

    def close(self):
        self.sock.close()


def error(reply, cls):
    assert "error" in reply, reply
    assert reply["error"]["class"] == cls, reply
    return reply["error"]["desc"]


def main():
    with tempfile.TemporaryDirectory(prefix="ramjet-qmp-raw-") as dir:
        img = os.path.join(dir, "guest.img")
        subprocess.run([RAMJET, "image", "--size", "4M", img], check=True, capture_output=True)
        path = os.path.join(dir, "qmp.sock")
        log = open(os.path.join(dir, "log"), "w+")
        proc = subprocess.Popen(
            [RAMJET, "send", "--qmp", "unix:" + path, "--image", img], stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + LIMIT
            while not os.path.exists(path):
                assert proc.poll() is None and time.monotonic() < deadline, "never listened"
                time.sleep(0.02)
            cases(path, proc)
        except BaseException:
            log.seek(0)
            print(log.read(), file=sys.stderr)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def cases(path, proc):
    c = Client(path)
    greeting = c.recv()
    version = greeting["QMP"]["version"]
    assert version["qemu"] == {"major": 10, "minor": 0, "micro": 0}, greeting
    assert version["package"].startswith("ramjet"), greeting
    assert greeting["QMP"]["capabilities"] == [], greeting
    print("ok the_greeting_has_qemus_shape")

    desc = error(c.execute("query-status", id="early"), "CommandNotFound")
    assert "qmp_capabilities" in desc, desc
    # Out-of-band execution is not offered, so it cannot be enabled.
    desc = error(c.execute("qmp_capabilities", {"enable": ["oob"]}), "GenericError")
    assert "oob" in desc, desc
    assert c.execute("qmp_capabilities", id=1) == {"return": {}, "id": 1}
    desc = error(c.execute("qmp_capabilities"), "CommandNotFound")
    assert "already complete" in desc, desc
    print("ok commands_before_qmp_capabilities_are_refused")

    reply = c.execute("frobnicate", id={"any": ["json", 1]})
    assert reply["id"] == {"any": ["json", 1]}, reply
    assert error(reply, "CommandNotFound") == "The command frobnicate has not been found"
    names = {cmd["name"] for cmd in c.execute("query-commands")["return"]}
    for name in ("migrate", "migrate_cancel", "query-migrate", "migrate-set-capabilities", "quit"):
        assert name in names, names
    print("ok an_unknown_command_is_command_not_found")

    desc = error(c.execute("migrate", {"uri": 42}), "GenericError")
    assert "'uri'" in desc and "string" in desc, desc
    desc = error(c.execute("migrate", {}), "GenericError")
    assert "uri" in desc, desc
    desc = error(c.execute("migrate", {"uri": "unix:/x", "blk": True}), "GenericError")
    assert "blk" in desc, desc
    desc = error(c.execute("query-status", {"verbose": True}), "GenericError")
    assert "verbose" in desc, desc
    desc = error(
        c.execute("migrate-set-capabilities", {"capabilities": [{"capability": 1, "state": 2}]}),
        "GenericError",
    )
    assert "capabilit" in desc, desc
    c.send('{"execute": "query-status", "arguments": [1]}')
    assert "must be an object" in error(c.reply(), "GenericError")
    c.send('{"execute": 5}')
    assert "must be a string" in error(c.reply(), "GenericError")
    c.send('{"arguments": {}}')
    assert "lacks member 'execute'" in error(c.reply(), "GenericError")
    c.send('{"execute": "query-status", "extra": 1}')
    assert "'extra' is unexpected" in error(c.reply(), "GenericError")
    print("ok wrong_arguments_are_generic_errors_naming_them")

    c.send('{"execute": "query-status", }')
    assert error(c.reply(), "GenericError").startswith("JSON parse error")
    c.send("[1, 2]")
    assert error(c.reply(), "GenericError") == "QMP input must be a JSON object"
    c.send("nonsense ")
    assert error(c.reply(), "GenericError").startswith("JSON parse error")
    c.send("}")
    assert error(c.reply(), "GenericError").startswith("JSON parse error")
    # Not valid UTF-8 inside a string.
    c.send(b'{"execute": "\xff\xfe"}')
    assert error(c.reply(), "GenericError").startswith("JSON parse error")
    # The connection goes on, and a command split across writes is one command.
    c.send('{"execute": "query-')
    time.sleep(0.05)
    c.send('status"}')
    assert c.reply()["return"]["status"] == "paused"
    print("ok malformed_json_is_an_error_and_the_connection_goes_on")

    big = '{"execute": "query-status", "arguments": {"pad": "%s"}}' % ("x" * (2 << 20))
    c.send(big)
    desc = error(c.reply(), "GenericError")
    assert "larger than" in desc, desc
    c.send('{"execute": "query-status", "id": "after"}')
    reply = c.reply()
    assert reply["id"] == "after" and "return" in reply, reply
    print("ok oversized_input_is_refused_and_skipped")

    # A second client waits, as on QEMU's monitor socket: its greeting comes once the first
    # has gone.
    second = Client(path)
    assert not second.ready(0.5), "the second client was served while the first is connected"
    c.close()
    second.negotiate()
    print("ok a_second_client_is_served_when_the_first_leaves")

    # A client that disappears mid-command: the half command never runs.
    second.send('{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 1')
    second.close()
    third = Client(path)
    third.negotiate()
    assert third.execute("query-migrate-parameters")["return"]["downtime-limit"] == 300
    # A whole command whose client leaves before the reply still runs, as in QEMU.
    third.send('{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 77}}')
    third.close()
    fourth = Client(path)
    fourth.negotiate()
    reply = fourth.execute("query-migrate-parameters")
    assert reply["return"]["downtime-limit"] == 77, reply
    print("ok a_client_that_disappears_leaves_no_half_command")

    # quit: the reply, the SHUTDOWN event, the end of the stream, and the process exits 0.
    fourth.send('{"execute": "quit"}')
    assert fourth.recv() == {"return": {}}
    shutdown = fourth.recv()
    assert shutdown["event"] == "SHUTDOWN", shutdown
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}, shutdown
    assert set(shutdown["timestamp"]) == {"seconds", "microseconds"}, shutdown
    try:
        extra = fourth.recv()
        raise AssertionError(f"more after SHUTDOWN: {extra}")
    except (EOFError, ConnectionResetError):
        pass
    assert proc.wait(LIMIT) == 0
    assert not os.path.exists(path), "the socket file is left behind"
    print("ok quit_replies_then_says_shutdown_and_exits")


main()
