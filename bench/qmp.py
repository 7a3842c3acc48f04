"""A minimal QMP client for bench/migrate (python3 standard library only).

One connection per QEMU process over its unix socket.  Commands are sent
one at a time; events that arrive in between are queued and can be waited
for with wait_event().  HMP commands (for 'xp', reading guest memory) go
through human-monitor-command.
"""
import json
import re
import socket
import time


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError("cannot connect to QMP socket %s" % path)
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        self._read()                        # greeting
        self.cmd("qmp_capabilities")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _read(self, timeout=None):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not data:
                raise QMPError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read(60.0)
            if r is None:
                raise QMPError("%s: no reply" % name)
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QMPError("%s: %s" % (name, r["error"].get("desc", r["error"])))
            return r.get("return")

    def wait_event(self, pred, timeout):
        """First queued or arriving event for which pred(ev) is true, or None."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if pred(ev):
                    del self.events[i]
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r = self._read(left)
            if r is not None:
                self.events.append(r)

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def read_u64s(self, gpa, count):
        """count little-endian u64 words of guest-physical memory at gpa."""
        out = self.hmp("xp /%dgx 0x%x" % (count, gpa))
        words = [int(w, 16) for w in re.findall(r"0x([0-9a-fA-F]{16})", out)]
        if len(words) < count:
            raise QMPError("xp returned %r" % out)
        return words[:count]
