"""Draining a host for maintenance the way `nova host-evacuate-live` does:
the compute service is disabled, then every instance on it is live-migrated
with no target host, and the scheduler places each where a VF of its profile
is free."""

import os

from nova.tests import fixtures as nova_fixtures

from godwit_nova_tests.functional import base


class TestDrain(base.GodwitTestCase):

    def setUp(self):
        super().setUp()
        # RPC casts run as calls: every request returns when its work is done
        # on the compute hosts (the other tests keep Nova's asynchronous
        # casts).
        self.useFixture(nova_fixtures.CastAsCallFixture(self))
        self.start_host('host1', ['GW8-1C'])
        self.start_host('host2', ['GW8-1C'])
        self.start_host('host3', ['GW8-2C'])

    def test_draining_a_host_moves_every_vm_off_it(self):
        gpu_image = self.image('gpu-dirtier', base.GPU_DIRTIER_ARGS)
        one = self.flavor(256, 'GW8-1C')
        two = self.flavor(256, 'GW8-2C')
        servers = [
            self.boot(one, gpu_image, host='host1'),
            self.boot(one, gpu_image, host='host1'),
            self.boot(self.flavor(128), self.image('dirtier',
                                                   base.DIRTIER_ARGS),
                      host='host1'),
        ]
        other = self.boot(two, gpu_image, host='host3')
        for s in servers + [other]:
            self.gains(s, 'verify ok', 1)
        self.assertEqual(2, len(self.hosts['host1'].gpus()[0]))

        svc = self.admin_api.api_get(
            '/os-services?binary=nova-compute&host=host1'
        ).body['services'][0]
        self.admin_api.api_put('/os-services/%s' % svc['id'],
                               {'status': 'disabled',
                                'disabled_reason': 'maintenance'})
        # As host-evacuate-live does: every instance, no target host (casts
        # as calls: each request returns once its migration has ended).
        for s in servers:
            self.live_migrate(s)
        for s in servers:
            m = self.wait_migration(s, ['completed'])
            self.assertEqual('host1', m['source_compute'])
        for s in servers:
            self._wait_for_state_change(s, 'ACTIVE')
            host = self.host_of(s)
            self.assertNotEqual('host1', host)
            if self.gpu_allocation(s):
                # Only host2 has GW8-1C VFs: host3's GPU runs GW8-2C.
                self.assertEqual('host2', host)
                at, g = self.gpu_allocation(s)
                self.assertEqual(('host2', 0), (at, g))
                self.assertIn(s['id'], self.hosts['host2'].gpus()[0])
            self.gains(s, 'verify ok', 2)
        # host1 is empty: no VM, no allocation, no VF held.
        root = self._get_provider_uuid_by_host('host1')
        for rp in self._get_all_rp_uuids_in_a_tree(root):
            self.assertEqual({}, self._get_allocations_by_provider_uuid(rp))
        self.assertEqual({0: []}, self.hosts['host1'].gpus())
        self.assertEqual([], os.listdir(self.hosts['host1'].run_dir))
        # The VM elsewhere was not touched.
        self.assertEqual('host3', self.host_of(other))
        self.gains(other, 'verify ok', 1)
