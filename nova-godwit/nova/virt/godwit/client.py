"""How the driver talks to godwit: its CLI and the HTTP/JSON API on each
VM's Unix socket (documented in godwit's docs/openapi.yaml). Nothing else of
godwit is used."""

import http.client
import json
import os
import signal
import socket
import subprocess
import time


class GodwitError(Exception):
    """A godwit command or API call failed; the message is godwit's own."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__('localhost', timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def api(sock, method, endpoint, body=None, timeout=30):
    """One API call: (HTTP status, decoded JSON body). Raises OSError when
    nobody answers on the socket."""
    conn = _UnixHTTPConnection(sock, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else b''
        conn.request(method, '/api/v1/' + endpoint, body=data,
                     headers={'Content-Type': 'application/json'})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw or b'{}')
    except ValueError:
        return resp.status, {'error': raw.decode(errors='replace')}


def api_ok(sock, method, endpoint, body=None, timeout=30):
    """An API call that must answer 200; its body."""
    code, v = api(sock, method, endpoint, body, timeout)
    if code != 200:
        raise GodwitError('%s %s: %s (HTTP %d)' % (
            method, endpoint, v.get('error', v), code))
    return v


class Godwit:
    """The godwit executable, run directly or in a network namespace."""

    def __init__(self, binary, netns=None):
        self.binary = binary
        self.netns = netns

    def _prefix(self):
        return ['ip', 'netns', 'exec', self.netns] if self.netns else []

    def run_json(self, *args, timeout=60):
        """A godwit command that prints JSON on success."""
        p = subprocess.run([self.binary] + list(args), capture_output=True,
                           timeout=timeout, text=True)
        if p.returncode != 0:
            raise GodwitError('godwit %s: %s' % (
                ' '.join(args), p.stderr.strip() or 'exit %d' % p.returncode))
        return json.loads(p.stdout)

    def profiles(self):
        return self.run_json('gpu', 'profiles', '--json')

    def gpu_status(self, gpu_dir):
        return self.run_json('gpu', 'status', '--json', '--gpu-dir', gpu_dir)

    def list(self, run_dir):
        return self.run_json('list', run_dir, '--json')

    def start(self, args, log_path):
        """Starts `godwit run ARGS` on its own (its own session: it outlives
        nova-compute, which finds it again through its socket), output to
        log_path."""
        with open(log_path, 'ab') as log:
            return subprocess.Popen(
                self._prefix() + [self.binary, 'run'] + list(args),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True)

    def migrate(self, args):
        """`godwit migrate ARGS --json` started; the caller polls and reads
        it."""
        return subprocess.Popen(
            [self.binary, 'migrate', '--json'] + list(args),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child has exited: it only waits to be reaped.
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def runs_socket(pid, sock):
    """Whether pid is a godwit serving sock (not a recycled pid)."""
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            argv = f.read().split(b'\0')
    except OSError:
        return False
    return os.fsencode(sock) in argv


def stop(pid, sock, grace=10.0):
    """SIGTERM, then SIGKILL after grace seconds, for the godwit on sock."""
    if not runs_socket(pid, sock):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not alive(pid):
                return
            time.sleep(0.05)
