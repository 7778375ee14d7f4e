"""Live migration through Nova's API: the VM moves with its GPU function
between godwit processes on two hosts, over TLS across the hosts' own
network namespaces, and its guest goes on verifying its memory and its VRAM
where it lands."""

import os
import re
import signal

from nova.virt.godwit import client

from godwit_nova_tests.functional import base


class TestLiveMigration(base.GodwitTestCase):

    def setUp(self):
        super().setUp()
        # host2 readies an arriving instance's memory before it listens, and
        # runs its godwits with --seccomp kill: a system call outside godwit's
        # filter would kill the instance there (on arrival, or leaving again).
        for name in self.HOSTS:
            self.start_host(name, ['GW8-1C'], prefault=name == 'host2',
                            seccomp='kill' if name == 'host2' else 'refuse')
        self.gpu_image = self.image('gpu-dirtier', base.GPU_DIRTIER_ARGS)
        self.gpu_flavor = self.flavor(256, 'GW8-1C')

    def assert_runs_on(self, server, host):
        """server runs on host alone: there in Nova, in Placement and on the
        GPU, nowhere else."""
        self.assertEqual(host, self.host_of(server))
        self.assertEqual('ACTIVE',
                         self.admin_api.get_server(server['id'])['status'])
        allocs = self._get_allocations_by_server_uuid(server['id'])
        hosts = {self._get_resource_provider_by_uuid(rp)['name'].split(
            '_gpu')[0] for rp in allocs}
        self.assertEqual({host}, hosts)
        at, g = self.gpu_allocation(server)
        self.assertEqual(host, at)
        for name, h in self.hosts.items():
            held = [vm for vms in h.gpus().values() for vm in vms]
            if name == host:
                self.assertIn(server['id'], h.gpus()[g])
            else:
                self.assertNotIn(server['id'], held)

    def test_a_gpu_vm_moves_and_its_guest_verifies_on_arrival(self):
        server = self.boot(self.gpu_flavor, self.gpu_image, host='host1')
        self.gains(server, 'verify ok', 1)
        self.assert_runs_on(server, 'host1')
        self.live_migrate(server, 'host2')
        self.wait_migration(server, ['completed'])
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assert_runs_on(server, 'host2')
        # It came over the hosts' own network, over TLS.
        with open(os.path.join(self.hosts['host2'].run_dir, server['id'],
                               'godwit.log')) as f:
            log = f.read()
        self.assertIn('waiting for a migration on tcp:%s:' %
                      self.hosts['host2'].addr, log)
        # Its memory and its VRAM were in place before it listened
        # (live_migration_prefault).
        self.assertIn('guest memory prefaulted: 256 MiB', log)
        self.assertIn('VRAM prefaulted: 1024 MiB (GW8-1C)', log)
        self.assertLess(log.index('VRAM prefaulted'),
                        log.index('waiting for a migration'))
        if self.isolated:
            self.assertNotEqual('127.0.0.1', self.hosts['host2'].addr)
        # The console through Nova is now the destination's: the guest goes
        # on checking every page of RAM and VRAM it wrote before the move.
        self.gains(server, 'verify ok', 2)
        self.assertEqual([], os.listdir(self.hosts['host1'].run_dir))
        # Under its filter, in the mode host2's option (seccomp) says.
        pid = self._pids(self.hosts['host2'])[server['id']]
        with open('/proc/%d/status' % pid) as f:
            self.assertIn('Seccomp:\t2', f.read())
        with open('/proc/%d/cmdline' % pid) as f:
            self.assertIn('\0--seccomp\0kill\0', '\0' + f.read())
        sock = os.path.join(self.hosts['host2'].run_dir,
                            server['id'] + '.sock')
        self.assertEqual(
            'kill', client.api_ok(sock, 'GET', 'vm.info')['seccomp'])
        # And on to a host the scheduler picks.
        self.live_migrate(server)
        self.wait_migration(server, ['completed'])
        # (Two migrations of one server: wait for the second to complete.)
        end = base.time.monotonic() + base.WAIT
        while self.host_of(server) == 'host2' and \
                base.time.monotonic() < end:
            base.time.sleep(0.2)
        self.assertIn(self.host_of(server), ('host1', 'host3'))
        self.assert_runs_on(server, self.host_of(server))
        self.gains(server, 'verify ok', 2)

    def test_a_migration_that_fails_at_the_destination_rolls_back(self):
        server = self.boot(self.gpu_flavor, self.gpu_image, host='host1')
        self.gains(server, 'verify ok', 1)
        dest = self.hosts['host2']
        drv = dest.service.manager.driver
        real = drv.pre_live_migration
        killed = []

        def dies_after_start(context, instance, *a, **k):
            # The destination's godwit starts listening, then dies: its host
            # failed under it.
            data = real(context, instance, *a, **k)
            sock = os.path.join(dest.run_dir, instance.uuid + '.sock')
            pid = client.api(sock, 'GET', 'vmm.ping')[1]['pid']
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return data

        drv.pre_live_migration = dies_after_start
        self.addCleanup(vars(drv).pop, 'pre_live_migration', None)
        self.live_migrate(server, 'host2')
        self.wait_migration(server, ['error', 'failed'])
        self.assertTrue(killed)
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assert_runs_on(server, 'host1')
        self.assert_emptied(dest.run_dir)
        self.gains(server, 'verify ok', 2)
        # Nothing was left behind that stops a later migration.
        del drv.pre_live_migration
        self.live_migrate(server, 'host2')
        end = base.time.monotonic() + base.WAIT
        while self.host_of(server) != 'host2' and \
                base.time.monotonic() < end:
            base.time.sleep(0.2)
        self._wait_for_state_change(server, 'ACTIVE')
        self.assert_runs_on(server, 'host2')
        self.gains(server, 'verify ok', 2)

    def test_a_vm_booted_from_a_glance_image_reboots_where_it_moved(self):
        out = os.path.join(self.tmp, 'guests')
        base.godwit('guests', 'export', '--out', out)
        image = self.image('dirtier', base.DIRTIER_ARGS,
                           data=os.path.join(out, 'dirtier.elf'))
        server = self.boot(self.flavor(128), image, host='host1')
        self.gains(server, 'verify ok', 1)
        self.live_migrate(server, 'host3')
        self.wait_migration(server, ['completed'])
        end = base.time.monotonic() + base.WAIT
        while self.host_of(server) != 'host3' and \
                base.time.monotonic() < end:
            base.time.sleep(0.2)
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.gains(server, 'verify ok', 2)
        # A reboot on the new host boots the guest anew from the image there.
        self.admin_api.post_server_action(server['id'],
                                          {'reboot': {'type': 'HARD'}})
        self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual('host3', self.host_of(server))
        self.assertTrue(os.path.exists(os.path.join(
            self.hosts['host3'].run_dir, server['id'], 'guest.img')))
        self.gains(server, 'verify ok', 1)

    def test_a_gpu_job_moved_mid_run_ends_as_one_never_moved(self):
        # gpu-train, a Jacobi solve on the GPU: the same run twice, one of them
        # live-migrated mid-solve; both must end with the same iteration count
        # and solution hash. The solve must outlast the migration's set-up:
        # host2 prefaults 1 GiB of VRAM first, 4-5 s on a fresh machine, and
        # grid=160 (7 s) once converged before the switchover; grid=224 takes
        # about four times as long.
        image = self.image('gpu-train', 'grid=224')
        moved = self.boot(self.gpu_flavor, image, host='host1')
        still = self.boot(self.gpu_flavor, image, host='host3')
        self.gains(moved, 'gpu-train: iteration ', 1)
        self.live_migrate(moved, 'host2')
        self.wait_migration(moved, ['completed'])
        answers = []
        for server in (moved, still):
            end = base.time.monotonic() + base.WAIT
            while 'converged' not in self.console(server) and \
                    base.time.monotonic() < end:
                base.time.sleep(0.5)
            out = self.console(server)
            m = re.search(r'converged iterations=(\d+) .* hash=(0x[0-9a-f]+)',
                          out)
            self.assertIsNotNone(m, out[-2000:])
            answers.append(m.groups())
        self.assertEqual(answers[0], answers[1])
        # The console is the destination's: the solve went on there.
        self.assertEqual('host2', self.host_of(moved))
        self.assertIn('gpu-train: iteration ', self.console(moved).split(
            'converged')[0])
