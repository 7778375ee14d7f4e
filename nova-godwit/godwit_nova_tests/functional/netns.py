"""Test hosts with network namespaces of their own, joined by veth pairs.

Each host namespace has one veth end with its address; the other ends meet
on a bridge inside a switch namespace of the test's own, so that nothing of
the machine's own network (its firewall included) is touched or in the way."""

import os
import subprocess


def _ip(*args):
    subprocess.run(('ip',) + args, check=True, capture_output=True,
                   timeout=30)


class Network:
    def __init__(self, hosts):
        tag = 'gw%d' % (os.getpid() % 100000)
        self.switch = tag + 's'
        self.net = '10.213.%d' % (os.getpid() % 250)
        self.hosts = {h: (tag + 'h%d' % i, '%s.%d' % (self.net, i + 1))
                      for i, h in enumerate(hosts)}
        self._tag = tag
        self._made = []

    def create(self):
        """Makes the namespaces; None, or why not (with nothing left behind)
        where this machine does not let the test (no root, no iproute2)."""
        try:
            _ip('netns', 'add', self.switch)
            self._made.append(self.switch)
            _ip('-n', self.switch, 'link', 'add', 'br0', 'type', 'bridge')
            _ip('-n', self.switch, 'link', 'set', 'br0', 'up')
            for i, (ns, addr) in enumerate(self.hosts.values()):
                _ip('netns', 'add', ns)
                self._made.append(ns)
                _ip('-n', ns, 'link', 'add', 'eth0', 'type', 'veth', 'peer',
                    'name', 'p%d' % i, 'netns', self.switch)
                _ip('-n', self.switch, 'link', 'set', 'p%d' % i, 'master',
                    'br0', 'up')
                _ip('-n', ns, 'addr', 'add', addr + '/24', 'dev', 'eth0')
                _ip('-n', ns, 'link', 'set', 'eth0', 'up')
                _ip('-n', ns, 'link', 'set', 'lo', 'up')
            return None
        except subprocess.CalledProcessError as e:
            self.destroy()
            return '%s: %s' % (' '.join(e.cmd), e.stderr.decode().strip())
        except (OSError, subprocess.SubprocessError) as e:
            self.destroy()
            return str(e)

    def destroy(self):
        for ns in reversed(self._made):
            subprocess.run(['ip', 'netns', 'del', ns], capture_output=True,
                           timeout=30)
        self._made = []
