"""An operator's hands on a live migration in progress, through Nova's API:
abort it (the VM stays where it was), or force it to complete (godwit
switches to post-copy: the VM runs at the destination at once, its memory
follows)."""

from godwit_nova_tests.functional import base

# A working set the capped link needs seconds to carry: the migration is still
# running when the operator acts.
BIG = 'wss=96 rate=8 seconds=0 verify-every=1 report-every=250'


class TestMigrationControl(base.GodwitTestCase):
    HOSTS = ('host1', 'host2')

    def setUp(self):
        super().setUp()
        for name in self.HOSTS:
            self.start_host(name, ['GW8-1C'], bandwidth=16)
        self.server = self.boot(self.flavor(256, 'GW8-1C'),
                                self.image('dirtier', BIG), host='host1')
        self.gains(self.server, 'verify ok', 1)

    def migration_id(self):
        m = self.wait_migration(self.server, ['running'])
        return m['id']

    def test_abort_leaves_the_vm_on_its_host(self):
        self.live_migrate(self.server, 'host2')
        mid = self.migration_id()
        # Nova shows godwit's progress on the migration in progress.
        url = '/servers/%s/migrations/%s' % (self.server['id'], mid)
        end = base.time.monotonic() + base.WAIT
        while base.time.monotonic() < end:
            m = self.admin_api.api_get(url).body['migration']
            if m['memory_processed_bytes']:
                break
            base.time.sleep(0.2)
        self.assertGreater(m['memory_total_bytes'], 256 << 20)
        self.assertGreater(m['memory_processed_bytes'], 0)
        self.assertGreater(m['memory_remaining_bytes'], 0)
        self.admin_api.api_delete('/servers/%s/migrations/%s' % (
            self.server['id'], mid))
        self.wait_migration(self.server, ['cancelled'])
        server = self._wait_for_state_change(self.server, 'ACTIVE')
        self.assertEqual('host1', self.host_of(server))
        self.assert_emptied(self.hosts['host2'].run_dir)
        self.assertEqual({0: []}, self.hosts['host2'].gpus())
        self.assertEqual({0: [server['id']]}, self.hosts['host1'].gpus())
        self.gains(server, 'verify ok', 2)

    def test_force_complete_switches_to_post_copy(self):
        self.live_migrate(self.server, 'host2')
        mid = self.migration_id()
        self.admin_api.api_post(
            '/servers/%s/migrations/%s/action' % (self.server['id'], mid),
            {'force_complete': None}, check_response_status=[202])
        self.wait_migration(self.server, ['completed'])
        server = self._wait_for_state_change(self.server, 'ACTIVE')
        self.assertEqual('host2', self.host_of(server))
        self.assertIn('(asked for (migrate-postcopy))',
                      self.stdlog.logger.output)
        self.assertEqual({0: []}, self.hosts['host1'].gpus())
        self.assertEqual({0: [server['id']]}, self.hosts['host2'].gpus())
        self.gains(server, 'verify ok', 2)


class TestGuestEndsMidMigration(base.GodwitTestCase):
    """A guest that exits while it moves: the migration fails at once, the
    destination keeps nothing, and Nova rolls back to the source host, where
    the VM has ended as it would have without a migration."""
    HOSTS = ('host1', 'host2')

    def test_the_migration_fails_and_nothing_is_left_at_the_destination(self):
        for name in self.HOSTS:
            self.start_host(name, ['GW8-1C'], bandwidth=16)
        # 192 MiB take twelve seconds on the capped link; the guest's time
        # is up eight seconds after it starts.
        server = self.boot(self.flavor(256, 'GW8-1C'),
                           self.image('dirtier', 'wss=192 rate=8 seconds=8 '
                                      'verify-every=1 report-every=250'),
                           host='host1')
        self.gains(server, 'verify ok', 1)
        self.live_migrate(server, 'host2')
        self.wait_migration(server, ['failed'])
        self.assertIn('%s ended while it migrated to host2' % server['id'],
                      self.stdlog.logger.output)
        self.assertIn('the VM ended while it migrated (its guest exited with '
                      'status 0)', self.stdlog.logger.output)
        self.assertNotIn('may run on host2', self.stdlog.logger.output)
        self.assertEqual('host1', self.host_of(server))
        self.assert_emptied(self.hosts['host2'].run_dir)
        self.assertEqual({0: []}, self.hosts['host2'].gpus())
        self.assertIn('dirtier: done', self.console(server))
