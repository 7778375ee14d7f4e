"""GPU flavors go where Placement has a free VF of their profile, and get
that VF."""

from nova.tests import fixtures as nova_fixtures

from godwit_nova_tests.functional import base


class TestGpuPlacement(base.GodwitTestCase):

    def setUp(self):
        super().setUp()
        # RPC casts run as calls: every request returns when its work is done
        # on the compute hosts (the other tests keep Nova's asynchronous
        # casts).
        self.useFixture(nova_fixtures.CastAsCallFixture(self))
        self.start_host('host1', ['GW8-4C'])
        # host2's GPU 0 is given to GW8-2C: a GW8-1C VM there must get GPU 1,
        # where godwit's own placement rule would have put it on GPU 0.
        self.start_host('host2', ['GW8-2C', 'GW8-1C'])
        self.start_host('host3', ['GW8-1C'])

    def test_inventory_is_one_child_provider_per_gpu(self):
        for name, h in self.hosts.items():
            root = self._get_provider_uuid_by_host(name)
            tree = self._get_all_rps_in_a_tree(root)
            children = sorted(rp['name'] for rp in tree
                              if rp['uuid'] != root)
            self.assertEqual(
                ['%s_gpu%d' % (name, g) for g in range(len(h.gpus()))],
                children)
        rp = self._get_provider_uuid_by_name('host1_gpu0')
        inv = self._get_provider_inventory(rp)
        self.assertEqual(['CUSTOM_GODWIT_GW8_4C'], list(inv))
        self.assertEqual(2, inv['CUSTOM_GODWIT_GW8_4C']['total'])
        self.assertIn('CUSTOM_GODWIT_MODEL_GW_8',
                      self._get_provider_traits(rp))
        rp = self._get_provider_uuid_by_name('host2_gpu1')
        self.assertEqual(8, self._get_provider_inventory(rp)[
            'CUSTOM_GODWIT_GW8_1C']['total'])
        # A GPU taken out of [godwit] gpu_profiles leaves Placement.
        self.hosts['host2'].profiles = ['GW8-2C']
        self.restart_host('host2')
        root = self._get_provider_uuid_by_host('host2')
        self.assertEqual(['host2_gpu0'], sorted(
            rp['name'] for rp in self._get_all_rps_in_a_tree(root)
            if rp['uuid'] != root))

    def test_gpu_flavors_land_on_free_vfs_of_their_profile(self):
        image = self.image('gpu-dirtier', base.GPU_DIRTIER_ARGS)
        big = self.flavor(256, 'GW8-4C')
        small = self.flavor(256, 'GW8-1C')
        servers = [self.boot(big, image) for _ in range(2)]
        servers += [self.boot(small, image, host='host2')]
        servers += [self.boot(small, image) for _ in range(2)]
        for s in servers[:2]:
            self.assertEqual('host1', self.host_of(s))
        for s in servers[2:]:
            self.assertIn(self.host_of(s), ('host2', 'host3'))
        self.assertEqual(('host2', 1), self.gpu_allocation(servers[2]))
        # Each VM holds exactly the VF that Placement allocated: on the GPU of
        # its allocation, under its own id.
        for s in servers:
            host, g = self.gpu_allocation(s)
            self.assertEqual(self.host_of(s), host)
            self.assertIn(s['id'], self.hosts[host].gpus()[g])
            self.gains(s, 'verify ok', 1)
        self.assertEqual(2, self._get_provider_usages(
            self._get_provider_uuid_by_name('host1_gpu0'))[
                'CUSTOM_GODWIT_GW8_4C'])
        # host1's GPU is full: the next GW8-4C VM has nowhere to go.
        server = self.boot(big, image, expected='ERROR')
        self.assertIn('No valid host', server['fault']['message'])
        # A VM without a GPU takes no VF anywhere.
        plain = self.boot(self.flavor(128), self.image(
            'dirtier', base.DIRTIER_ARGS))
        self.assertIsNone(self.gpu_allocation(plain))
        self.gains(plain, 'verify ok', 1)
        held = sum(len(v) for h in self.hosts.values()
                   for v in h.gpus().values())
        self.assertEqual(5, held)
        # Deleting a VM frees its VF, in Placement and on the GPU.
        host, g = self.gpu_allocation(servers[0])
        self._delete_server(servers[0])
        self._wait_until_deleted(servers[0])
        self.assertNotIn(servers[0]['id'], self.hosts[host].gpus()[g])
        self.assertEqual(1, self._get_provider_usages(
            self._get_provider_uuid_by_name('host1_gpu0'))[
                'CUSTOM_GODWIT_GW8_4C'])
        self.boot(big, image)
