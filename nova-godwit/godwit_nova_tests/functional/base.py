"""Nova's own functional harness (in-process API, conductor, scheduler,
sqlite, its Placement fixture) with compute services on the godwit driver,
each a real host: its own godwit processes under /dev/kvm, its own GPU
manager directory, and, where this machine lets the test make them, its own
network namespace, so that live migrations cross veth pairs over TLS."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import fixtures
from nova import conf as nova_conf
from nova.tests.functional import integrated_helpers
from nova.virt.godwit import conf as godwit_conf

from godwit_nova_tests.functional import netns

# The [godwit] options, which each host's start sets.
godwit_conf.register_opts(nova_conf.CONF)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, '..', '..', '..'))
GODWIT = os.environ.get('GODWIT_BIN') or os.path.join(
    REPO, 'target', 'debug', 'godwit')

# How long the guests' own checks and the services may take on a loaded
# machine: waits end as soon as what they wait for holds.
WAIT = 120

DIRTIER_ARGS = 'wss=32 rate=20 seconds=0 verify-every=1 report-every=250'
GPU_DIRTIER_ARGS = ('aperture=16 engine=16 dma=4 rate=48 seconds=0 '
                    'verify-every=1 report-every=250')


def godwit(*args, check=True):
    p = subprocess.run([GODWIT] + list(args), capture_output=True, text=True,
                       timeout=60)
    if check and p.returncode != 0:
        raise AssertionError('godwit %s: %s' % (' '.join(args), p.stderr))
    return p


class Host:
    def __init__(self, name, ns, addr, root):
        self.name = name
        self.ns = ns
        self.addr = addr
        self.run_dir = os.path.join(root, name, 'run')
        self.gpu_dir = os.path.join(root, name, 'gpu')
        self.service = None

    def gpus(self):
        """{GPU index: [holder ids]} from `godwit gpu status`."""
        st = json.loads(godwit('gpu', 'status', '--json', '--gpu-dir',
                               self.gpu_dir).stdout)
        return {g['id']: sorted(v['holder']['vm'] for v in g['vfs'])
                for g in st}


class GodwitTestCase(integrated_helpers.ProviderUsageBaseTestCase):
    compute_driver = 'godwit.GodwitDriver'
    HOSTS = ('host1', 'host2', 'host3')

    def setUp(self):
        if os.environ.get('GODWIT_SKIP_KVM_TESTS') == '1':
            self.skipTest('GODWIT_SKIP_KVM_TESTS=1')
        if not os.access('/dev/kvm', os.R_OK | os.W_OK):
            self.fail('these tests run real VMs: /dev/kvm is missing or not '
                      'usable (GODWIT_SKIP_KVM_TESTS=1 skips them)')
        if not os.access(GODWIT, os.X_OK):
            self.fail('no godwit binary at %s (cargo build, or set '
                      'GODWIT_BIN)' % GODWIT)
        # Nova's tests expect a source tree; installed, its api-paste.ini is
        # under the environment's etc/.
        self.flags(group='wsgi', api_paste_config=os.path.join(
            sys.prefix, 'etc', 'nova', 'api-paste.ini'))
        super().setUp()
        # What a call still in flight when a test fails may wait: a migration's
        # post-processing asks a destination whose service the cleanup has
        # already stopped, and with Nova's default (1800 s) the cleanup, which
        # waits for that migration, held the run for half an hour before the
        # failure was reported.
        self.flags(long_rpc_timeout=WAIT)
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.network = netns.Network(self.HOSTS)
        why = self.network.create()
        self.addCleanup(self.network.destroy)
        if why and os.geteuid() == 0:
            self.fail('root, but no network namespaces: %s' % why)
        self.isolated = why is None
        if self.isolated:
            addrs = [a for _, a in self.network.hosts.values()]
        else:
            # No namespaces here (not root): every host on loopback.
            addrs = ['127.0.0.1']
        self.tls = os.path.join(self.tmp, 'tls')
        godwit('tls-creds', self.tls, '--hosts', ','.join(addrs))
        self.hosts = {}
        self.images = {}

    # -- hosts ----------------------------------------------------------------

    def start_host(self, name, profiles, bandwidth=0, prefault=False,
                   seccomp='refuse'):
        """A compute service on the godwit driver with GPUs offering `profiles`
        (one per GPU, by index)."""
        ns, addr = self.network.hosts[name]
        h = Host(name, ns if self.isolated else None,
                 addr if self.isolated else '127.0.0.1', self.tmp)
        h.profiles = profiles
        h.bandwidth = bandwidth
        h.prefault = prefault
        h.seccomp = seccomp
        os.makedirs(h.run_dir)
        godwit('gpu', 'init', '--gpus', str(len(profiles)), '--gpu-dir',
               h.gpu_dir)
        # Every godwit of the host ends with the test, before its namespace.
        self.addCleanup(self._stop_godwits, h)
        self._host_flags(h)
        h.service = self.start_service('compute', host=name)
        self.hosts[name] = h
        return h

    def _host_flags(self, h):
        # Each driver reads its options when it is made: these are this host's.
        self.flags(group='godwit', binary=GODWIT, run_dir=h.run_dir,
                   gpu_dir=h.gpu_dir,
                   gpu_profiles={str(i): p for i, p in enumerate(h.profiles)},
                   netns=h.ns, live_migration_inbound_addr=h.addr,
                   live_migration_tls_dir=self.tls,
                   live_migration_bandwidth=h.bandwidth,
                   live_migration_prefault=h.prefault,
                   seccomp=h.seccomp,
                   node_uuid=str(uuid.uuid5(uuid.NAMESPACE_URL,
                                            self.id() + h.name)))

    def restart_host(self, name):
        """A new nova-compute for the host, with a new driver that knows
        nothing but what it finds (the godwits go on running meanwhile)."""
        h = self.hosts[name]
        self._host_flags(h)
        h.service = self.restart_compute_service(
            h.service, keep_hypervisor_state=False)
        return h

    def _pids(self, h):
        """{instance id: pid} of the host's running godwits."""
        p = godwit('list', h.run_dir, '--json', check=False)
        pids = {}
        for e in json.loads(p.stdout or '[]'):
            pid = e.get('pid')
            if pid is None:
                try:
                    pid = json.loads(subprocess.run(
                        [GODWIT, 'info', '--api-socket', e['socket']],
                        capture_output=True, text=True).stdout)['pid']
                except (ValueError, KeyError):
                    continue
            pids[e.get('id')] = pid
        return pids

    def _stop_godwits(self, h):
        for pid in self._pids(h).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- images, flavors, servers ---------------------------------------------

    def image(self, guest, args, data=None):
        """A Glance image for a built-in guest (the image property
        godwit_guest names it), or, with data (a file), an image whose bytes
        are the guest."""
        key = (guest, args, data)
        if key not in self.images:
            props = {'godwit_guest_args': args}
            if data is None:
                props['godwit_guest'] = guest
            image_id = str(uuid.uuid4())
            self.glance.create(None, {
                'id': image_id,
                'name': 'godwit-' + guest,
                'created_at': datetime.datetime(2026, 1, 1),
                'updated_at': datetime.datetime(2026, 1, 1),
                'deleted_at': None,
                'deleted': False,
                'status': 'active',
                'is_public': True,
                'container_format': 'bare',
                'disk_format': 'raw',
                'size': 1024,
                'min_ram': 0,
                'min_disk': 0,
                'protected': False,
                'visibility': 'public',
                'tags': [],
                'properties': props,
            }, data=open(data, 'rb') if data else None)
            self.images[key] = image_id
        return self.images[key]

    def flavor(self, memory_mb, profile=None):
        spec = None
        if profile:
            rc = 'CUSTOM_GODWIT_' + profile.replace('-', '_')
            spec = {'resources:%s' % rc: '1'}
        return self._create_flavor(memory_mb=memory_mb, vcpu=1, disk=0,
                                   ephemeral=0, extra_spec=spec)

    def boot(self, flavor, image, host=None, expected='ACTIVE'):
        server = self._build_server(image_uuid=image, flavor_id=flavor,
                                    networks='none', host=host)
        server = self.admin_api.post_server({'server': server})
        return self._wait_for_state_change(server, expected,
                                           max_retries=WAIT * 2)

    def console(self, server):
        return self.admin_api.post_server_action(
            server['id'], {'os-getConsoleOutput': {}})['output']

    def gains(self, server, line, n):
        """Waits until the server's console (through Nova's API) shows
        `line` n more times than now; fails on a guest's FAILED."""
        start = self.console(server).count(line)
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            out = self.console(server)
            self.assertNotIn('FAILED', out)
            if out.count(line) >= start + n:
                return out
            time.sleep(0.2)
        self.fail('%s: %r did not appear %d more times:\n%s' % (
            server['id'], line, n, self.console(server)[-2000:]))

    def wait_migration(self, server, statuses):
        end = time.monotonic() + WAIT
        seen = None
        while time.monotonic() < end:
            for m in self.admin_api.api_get(
                    '/os-migrations?instance_uuid=%s' % server['id']
            ).body['migrations']:
                if m['migration_type'] != 'live-migration':
                    continue
                seen = m['status']
                if seen in statuses:
                    return m
            time.sleep(0.2)
        self.fail('migration of %s: %s, not %s' % (
            server['id'], seen, statuses))

    def assert_emptied(self, path):
        """Waits until directory `path` holds nothing: after a failed live
        migration, Nova sets the migration's status before its rollback at
        the destination (a cast) has cleaned up there."""
        end = time.monotonic() + WAIT
        while os.listdir(path) and time.monotonic() < end:
            time.sleep(0.2)
        self.assertEqual([], os.listdir(path))

    def live_migrate(self, server, host=None):
        self.admin_api.post_server_action(
            server['id'], {'os-migrateLive': {'host': host,
                                              'block_migration': 'auto'}})

    def host_of(self, server):
        return self.admin_api.get_server(server['id'])[
            'OS-EXT-SRV-ATTR:host']

    def gpu_allocation(self, server):
        """(host, GPU index) of the GPU provider the server's allocation
        uses, or None."""
        for rp, alloc in self._get_allocations_by_server_uuid(
                server['id']).items():
            if any(rc.startswith('CUSTOM_GODWIT_')
                   for rc in alloc['resources']):
                name = self._get_resource_provider_by_uuid(rp)['name']
                host, gpu = name.rsplit('_gpu', 1)
                return host, int(gpu)
        return None
