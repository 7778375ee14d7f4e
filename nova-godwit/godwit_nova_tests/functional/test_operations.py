"""A godwit VM's life through Nova's API: boot, console, pause, stop, start,
reboot, a restart of nova-compute under running VMs, delete."""

import os

from godwit_nova_tests.functional import base


class TestOperations(base.GodwitTestCase):
    HOSTS = ('host1',)

    def setUp(self):
        super().setUp()
        self.host = self.start_host('host1', ['GW8-2C'])

    def vm_state(self, server):
        p = base.godwit('info', '--api-socket', os.path.join(
            self.host.run_dir, server['id'] + '.sock'), check=False)
        if p.returncode != 0:
            return None
        return base.json.loads(p.stdout)['state']

    def test_a_vm_through_its_life(self):
        server = self.boot(self.flavor(256, 'GW8-2C'),
                           self.image('gpu-dirtier', base.GPU_DIRTIER_ARGS))
        self.gains(server, 'verify ok', 1)
        self.assertEqual('running', self.vm_state(server))
        self.assertEqual(1, self.admin_api.get_server(server['id'])[
            'OS-EXT-STS:power_state'])
        self.assertEqual([server['id']], self.host.gpus()[0])

        self.admin_api.post_server_action(server['id'], {'pause': None})
        self._wait_for_state_change(server, 'PAUSED')
        self.assertEqual('paused', self.vm_state(server))
        self.admin_api.post_server_action(server['id'], {'unpause': None})
        self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual('running', self.vm_state(server))

        # nova-compute restarts: its new driver finds the VM by its socket.
        self.restart_host('host1')
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual(1, server['OS-EXT-STS:power_state'])
        self.assertEqual('running', self.vm_state(server))
        self.gains(server, 'verify ok', 1)

        # Stop ends the godwit and frees its VF; start boots the VM again
        # on the GPU Placement still holds for it.
        self.admin_api.post_server_action(server['id'], {'os-stop': None})
        self._wait_for_state_change(server, 'SHUTOFF')
        self.assertIsNone(self.vm_state(server))
        self.assertEqual([], self.host.gpus()[0])
        self.admin_api.post_server_action(server['id'], {'os-start': None})
        self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual('running', self.vm_state(server))
        self.assertEqual([server['id']], self.host.gpus()[0])
        self.gains(server, 'verify ok', 1)

        self.admin_api.post_server_action(server['id'],
                                          {'reboot': {'type': 'HARD'}})
        self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual('running', self.vm_state(server))
        self.gains(server, 'verify ok', 1)

        self._delete_server(server)
        self._wait_until_deleted(server)
        self.assertEqual([], os.listdir(self.host.run_dir))
        self.assertEqual([], self.host.gpus()[0])

    def test_a_guest_godwit_cannot_start_fails_the_boot_cleanly(self):
        # An image that names no built-in guest is fetched from Glance; the
        # harness's Glance serves bytes that are no godwit image.
        image = self.image('no-such-guest', '')
        server = self.boot(self.flavor(128, 'GW8-2C'), image,
                           expected='ERROR')
        # Nova's fault says the build failed; nova-compute's log says what
        # godwit said.
        self.assertIn('Exhausted all hosts', server['fault']['message'])
        self.assertIn('godwit exited with 1: godwit: error: no built-in guest '
                      'or file named "no-such-guest"',
                      self.stdlog.logger.output)
        self.assertEqual([], self.host.gpus()[0])
        self.assertEqual([], os.listdir(self.host.run_dir))
