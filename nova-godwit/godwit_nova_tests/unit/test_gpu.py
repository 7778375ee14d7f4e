"""godwit's GPUs in Placement's terms, from what the real godwit reports."""

import json
import subprocess
import tempfile

from nova import exception
import testtools

from godwit_nova_tests.functional import base
from nova.virt.godwit import gpu


def godwit_json(*args):
    return json.loads(subprocess.run([base.GODWIT] + list(args), check=True,
                                     capture_output=True, text=True).stdout)


class TestGpu(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.profiles = godwit_json('gpu', 'profiles', '--json')
        d = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', d])
        subprocess.run([base.GODWIT, 'gpu', 'init', '--gpus', '3',
                        '--gpu-dir', d], check=True, capture_output=True)
        self.status = godwit_json('gpu', 'status', '--json', '--gpu-dir', d)

    def test_resource_classes_follow_profile_names(self):
        self.assertEqual('CUSTOM_GODWIT_GW8_1C', gpu.resource_class('GW8-1C'))
        self.assertEqual('host1_gpu2', gpu.provider_name('host1', 2))

    def test_each_gpu_offers_its_configured_profile(self):
        inv = gpu.inventory(self.profiles, self.status,
                            {'0': 'GW8-1C', '2': 'GW8-4C'})
        self.assertEqual({0: ('CUSTOM_GODWIT_GW8_1C', 8, 0),
                          2: ('CUSTOM_GODWIT_GW8_4C', 2, 0)}, inv)
        # Unset: every GPU offers its model's smallest profile.
        inv = gpu.inventory(self.profiles, self.status, {})
        self.assertEqual([0, 1, 2], sorted(inv))
        self.assertEqual({('CUSTOM_GODWIT_GW8_1C', 8, 0)}, set(inv.values()))

    def test_a_gpu_running_another_profile_offers_nothing(self):
        self.status[1]['profile'] = 'GW8-2C'
        inv = gpu.inventory(self.profiles, self.status, {'1': 'GW8-1C'})
        self.assertEqual({1: ('CUSTOM_GODWIT_GW8_1C', 8, 8)}, inv)

    def test_bad_configuration_is_named(self):
        for cfg, says in [({'x': 'GW8-1C'}, "'x' is not a GPU index"),
                          ({'5': 'GW8-1C'}, 'no GPU 5'),
                          ({'0': 'GW9-1C'}, "unknown profile 'GW9-1C'")]:
            e = self.assertRaises(exception.InvalidConfiguration,
                                  gpu.offered, self.profiles, self.status, cfg)
            self.assertIn(says, str(e))

    def test_a_flavor_asks_for_one_gpu_function(self):
        self.assertIsNone(gpu.requested_profile({'hw:cpu_policy': 'shared'},
                                                self.profiles))
        self.assertEqual('GW8-2C', gpu.requested_profile(
            {'resources:CUSTOM_GODWIT_GW8_2C': '1'}, self.profiles))
        self.assertEqual('GW8-2C', gpu.requested_profile(
            {'resources1:CUSTOM_GODWIT_GW8_2C': '1'}, self.profiles))
        for spec, says in [
                ({'resources:CUSTOM_GODWIT_GW8_2C': '2'}, 'one GPU function'),
                ({'resources:CUSTOM_GODWIT_GW8_3C': '1'}, 'no godwit vGPU'),
                ({'resources:CUSTOM_GODWIT_GW8_2C': '1',
                  'resources1:CUSTOM_GODWIT_GW8_1C': '1'}, 'asks for 2')]:
            e = self.assertRaises(exception.InvalidRequest,
                                  gpu.requested_profile, spec, self.profiles)
            self.assertIn(says, str(e))

    def test_the_allocation_names_the_gpu(self):
        providers = {'rp-a': 0, 'rp-b': 1}
        allocs = {'root': {'resources': {'VCPU': 1}},
                  'rp-b': {'resources': {'CUSTOM_GODWIT_GW8_1C': 1}}}
        self.assertEqual(1, gpu.gpu_in(allocs, 'CUSTOM_GODWIT_GW8_1C',
                                       providers))
        self.assertRaises(exception.InvalidRequest, gpu.gpu_in, allocs,
                          'CUSTOM_GODWIT_GW8_2C', providers)
        self.assertRaises(exception.InvalidRequest, gpu.gpu_in,
                          {'rp-x': {'resources': {
                              'CUSTOM_GODWIT_GW8_1C': 1}}},
                          'CUSTOM_GODWIT_GW8_1C', providers)
