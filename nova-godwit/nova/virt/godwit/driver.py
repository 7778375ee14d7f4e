"""A Nova compute driver for godwit: one godwit process per instance, driven
like libvirt drives QEMU, through godwit's CLI and each VM's API socket.

The instance's godwit serves its API on ``<run_dir>/<uuid>.sock`` and keeps
its files in ``<run_dir>/<uuid>/``: ``instance.json`` (how to start it
again: guest, memory, vCPUs, GPU), ``console.log`` (the guest's serial
console) and ``godwit.log``. A godwit outlives nova-compute; after a restart
the driver finds its VMs again by their sockets (``godwit list``)."""

import json
import os
import shutil
import time

from nova.compute import power_state
from nova import conf as nova_conf
from nova import exception
from nova.image import glance
from nova.objects import fields as obj_fields
from nova.objects import migrate_data as migrate_data_obj
from nova.virt import driver
from nova.virt import hardware
from oslo_log import log as logging
from oslo_utils import units
from oslo_utils import versionutils

from nova.virt.godwit import client
from nova.virt.godwit import conf as godwit_conf
from nova.virt.godwit import gpu

CONF = nova_conf.CONF
godwit_conf.register_opts(CONF)
LOG = logging.getLogger(__name__)

_STATES = {
    'running': power_state.RUNNING,
    'paused': power_state.PAUSED,
    'created': power_state.NOSTATE,
    'stopped': power_state.SHUTDOWN,
}
MAX_CONSOLE_BYTES = 100 * units.Ki


class GodwitDriver(driver.ComputeDriver):
    """godwit VMs with virtual GPU functions, live-migrated with their GPU
    state."""

    capabilities = dict(
        driver.ComputeDriver.capabilities,
        supports_image_type_raw=True,
    )

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi)
        # Read now: several compute services in one process (tests) each start
        # their driver with their own options.
        opts = CONF.godwit
        self.godwit = client.Godwit(opts.binary, opts.netns)
        self.run_dir = opts.run_dir
        self.gpu_dir = opts.gpu_dir
        self.gpu_config = dict(opts.gpu_profiles or {})
        self.inbound_addr = opts.live_migration_inbound_addr
        self.tls_dir = opts.live_migration_tls_dir
        self.downtime_ms = opts.live_migration_downtime_ms
        self.mode = opts.live_migration_mode
        self.bandwidth = opts.live_migration_bandwidth
        self.prefault = opts.live_migration_prefault
        self.seccomp = opts.seccomp
        self.migration_timeout = opts.live_migration_timeout
        self.boot_timeout = opts.boot_timeout
        self.node_uuid = opts.node_uuid
        self.host = CONF.host
        self._profiles = None
        # Placement provider uuid -> GPU index, from update_provider_tree.
        self._gpu_providers = {}
        # Processes this service started, reaped when they end.
        self._procs = {}
        # What Nova asked of the live migrations in progress (by instance
        # uuid): 'abort' or 'postcopy', done by the migration's own loop, which
        # also covers a request that comes before godwit's migration has begun.
        self._asked = {}

    # -- the host -------------------------------------------------------------

    def init_host(self, host):
        self.host = host
        os.makedirs(self.run_dir, exist_ok=True)
        try:
            self._profiles = self.godwit.profiles()
            status = self.godwit.gpu_status(self.gpu_dir)
        except (OSError, client.GodwitError) as e:
            raise exception.HypervisorUnavailable(host='godwit: %s' % e)
        # Checks [godwit] gpu_profiles against the host's GPUs now, not at the
        # first resource update.
        gpu.offered(self._profiles, status, self.gpu_config)
        found = self._list()
        LOG.info('godwit: %d instance(s) found running in %s',
                 len([e for e in found if e['state'] != 'gone']), self.run_dir)

    def get_available_nodes(self, refresh=False):
        return [self.host]

    def get_nodenames_by_uuid(self, refresh=False):
        if self.node_uuid:
            return {self.node_uuid: self.host}
        return super().get_nodenames_by_uuid(refresh)

    def get_host_ip_addr(self):
        return CONF.my_ip

    def _host_memory_mb(self):
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemTotal:'):
                    return int(line.split()[1]) // 1024
        return 0

    def _disk_gb(self):
        st = os.statvfs(self.run_dir)
        return (st.f_blocks * st.f_frsize // units.Gi,
                st.f_bavail * st.f_frsize // units.Gi)

    def get_available_resource(self, nodename):
        total_gb, free_gb = self._disk_gb()
        res = {
            'vcpus': os.cpu_count() or 1,
            'memory_mb': self._host_memory_mb(),
            'local_gb': total_gb,
            'vcpus_used': 0,
            'memory_mb_used': 0,
            'local_gb_used': total_gb - free_gb,
            'hypervisor_type': 'godwit',
            'hypervisor_version': versionutils.convert_version_to_int('0.1.0'),
            'hypervisor_hostname': nodename,
            'cpu_info': json.dumps({'arch': 'x86_64'}),
            'disk_available_least': free_gb,
            'supported_instances': [(obj_fields.Architecture.X86_64,
                                     obj_fields.HVType.KVM,
                                     obj_fields.VMMode.HVM)],
            'numa_topology': None,
        }
        if self.node_uuid:
            res['uuid'] = self.node_uuid
        return res

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        inv = provider_tree.data(nodename).inventory
        ratios = self._get_allocation_ratios(inv)
        res = self.get_available_resource(nodename)

        def one(total, ratio, reserved):
            return {'total': total, 'min_unit': 1, 'max_unit': total,
                    'step_size': 1, 'allocation_ratio': ratio,
                    'reserved': reserved}

        provider_tree.update_inventory(nodename, {
            'VCPU': one(res['vcpus'], ratios['VCPU'], CONF.reserved_host_cpus),
            'MEMORY_MB': one(res['memory_mb'], ratios['MEMORY_MB'],
                             CONF.reserved_host_memory_mb),
            'DISK_GB': one(max(res['local_gb'], 1), ratios['DISK_GB'],
                           self._get_reserved_host_disk_gb_from_config()),
        })
        status = self.godwit.gpu_status(self.gpu_dir)
        providers = {}
        for g, (rc, total, reserved) in gpu.inventory(
                self._profiles, status, self.gpu_config).items():
            name = gpu.provider_name(nodename, g)
            if not provider_tree.exists(name):
                provider_tree.new_child(name, nodename)
            provider_tree.update_inventory(name, {rc: {
                'total': total, 'reserved': reserved, 'min_unit': 1,
                'max_unit': total, 'step_size': 1, 'allocation_ratio': 1.0}})
            provider_tree.update_traits(name, [
                'CUSTOM_GODWIT_MODEL_' + gpu.resource_class(
                    status[g]['model'])[len(gpu.RC_PREFIX):]])
            providers[provider_tree.data(name).uuid] = g
        # A GPU no longer offered (the configuration changed) leaves the tree;
        # Placement refuses while a VM still holds one of its VFs.
        root = provider_tree.data(nodename).uuid
        prefix = gpu.provider_name(nodename, 0)[:-1]
        for rp in provider_tree.get_provider_uuids(nodename):
            d = provider_tree.data(rp)
            if d.parent_uuid == root and d.name.startswith(prefix) and \
                    rp not in providers:
                provider_tree.remove(rp)
        self._gpu_providers = providers

    # -- where an instance's things are ---------------------------------------

    def _sock(self, instance):
        return os.path.join(self.run_dir, instance.uuid + '.sock')

    def _dir(self, instance):
        return os.path.join(self.run_dir, instance.uuid)

    def _config(self, instance):
        try:
            with open(os.path.join(self._dir(instance), 'instance.json')) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _save_config(self, instance, cfg):
        os.makedirs(self._dir(instance), exist_ok=True)
        path = os.path.join(self._dir(instance), 'instance.json')
        with open(path + '.new', 'w') as f:
            json.dump(cfg, f)
        os.replace(path + '.new', path)

    def _list(self):
        self._reap()
        try:
            return self.godwit.list(self.run_dir)
        except client.GodwitError as e:
            LOG.warning('godwit list %s: %s', self.run_dir, e)
            return []

    def _reap(self):
        for uuid, p in list(self._procs.items()):
            if p.poll() is not None:
                del self._procs[uuid]

    def _get(self, instance, endpoint, timeout):
        """A GET of the instance's godwit API; None unless it answers 200."""
        try:
            code, v = client.api(self._sock(instance), 'GET', endpoint,
                                 timeout=timeout)
        except OSError:
            return None
        return v if code == 200 else None

    def _ping(self, instance):
        """vmm.ping: also answered by a destination waiting for its VM."""
        return self._get(instance, 'vmm.ping', 5)

    def _info(self, instance):
        """vm.info: only where a VM runs (or is paused or stopped)."""
        return self._get(instance, 'vm.info', 10)

    # -- what Nova asks about instances ---------------------------------------

    def list_instance_uuids(self):
        return [os.path.basename(e['socket'])[:-len('.sock')]
                for e in self._list() if e['state'] != 'gone']

    def list_instances(self):
        names = []
        for uuid in self.list_instance_uuids():
            try:
                with open(os.path.join(self.run_dir, uuid,
                                       'instance.json')) as f:
                    names.append(json.load(f)['name'])
            except (OSError, ValueError, KeyError):
                names.append(uuid)
        return names

    def instance_exists(self, instance):
        return self._ping(instance) is not None

    def get_info(self, instance, use_cache=True):
        info = self._info(instance)
        if info is None:
            if self._ping(instance) is not None:
                # A destination still waiting for its VM.
                return hardware.InstanceInfo(state=power_state.NOSTATE)
            if self._config(instance) is None:
                raise exception.InstanceNotFound(instance_id=instance.uuid)
            return hardware.InstanceInfo(state=power_state.SHUTDOWN)
        return hardware.InstanceInfo(
            state=_STATES.get(info.get('state'), power_state.NOSTATE))

    def get_console_output(self, context, instance):
        path = os.path.join(self._dir(instance), 'console.log')
        try:
            with open(path, 'rb') as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - MAX_CONSOLE_BYTES))
                return f.read()
        except FileNotFoundError:
            return b''

    # -- spawn, power, destroy ------------------------------------------------

    def _guest(self, context, instance):
        """(guest, args): a built-in guest named by the image property
        godwit_guest, or the Glance image itself, downloaded into the
        instance's directory (on every host the instance runs on: a reboot
        there boots it again)."""
        sysmeta = instance.system_metadata or {}
        name = sysmeta.get('image_godwit_guest')
        args = sysmeta.get('image_godwit_guest_args', '').split()
        if name:
            return name, args
        path = os.path.join(self._dir(instance), 'guest.img')
        if not os.path.exists(path):
            os.makedirs(self._dir(instance), exist_ok=True)
            glance.API().download(context, instance.image_ref,
                                  dest_path=path + '.part')
            os.replace(path + '.part', path)
        return path, args

    def _profiles_cached(self):
        if self._profiles is None:
            self._profiles = self.godwit.profiles()
        return self._profiles

    def spawn(self, context, instance, image_meta, injected_files,
              admin_password, allocations, network_info=None,
              block_device_info=None, power_on=True, accel_info=None):
        if self._ping(instance) is not None:
            raise exception.InstanceExists(name=instance.name)
        os.makedirs(self._dir(instance), exist_ok=True)
        profile = gpu.requested_profile(instance.flavor.extra_specs,
                                        self._profiles_cached())
        gpu_index = None
        if profile:
            gpu_index = gpu.gpu_in(allocations, gpu.resource_class(profile),
                                   self._gpu_providers)
        guest, args = self._guest(context, instance)
        cfg = {
            'name': instance.name,
            'guest': guest,
            'args': args,
            'memory_mb': instance.flavor.memory_mb,
            'vcpus': instance.flavor.vcpus,
            'gpu_profile': profile,
            'gpu_index': gpu_index,
        }
        self._save_config(instance, cfg)
        if power_on:
            self._start(instance, cfg)

    def _start(self, instance, cfg):
        argv = [cfg['guest'],
                '--memory', str(cfg['memory_mb']),
                '--vcpus', str(cfg['vcpus'])]
        if cfg.get('gpu_profile'):
            argv += ['--gpu', cfg['gpu_profile'],
                     '--gpu-index', str(cfg['gpu_index'])]
        argv += self._common_args(instance)
        if cfg.get('args'):
            argv += ['--'] + cfg['args']
        self._launch(instance, argv, want='running')

    def _common_args(self, instance):
        return ['--api-socket', self._sock(instance),
                '--id', instance.uuid,
                '--console', 'file:' + os.path.join(self._dir(instance),
                                                    'console.log'),
                '--gpu-dir', self.gpu_dir,
                '--seccomp', self.seccomp]

    def _launch(self, instance, argv, want):
        """Starts the instance's godwit and waits until it serves its API:
        with a running VM (want='running') or waiting for its source
        (want='incoming')."""
        log = os.path.join(self._dir(instance), 'godwit.log')
        p = self.godwit.start(argv, log)
        self._procs[instance.uuid] = p
        end = time.monotonic() + self.boot_timeout
        while time.monotonic() < end:
            if p.poll() is not None:
                raise exception.InstanceDeployFailure(
                    reason='godwit exited with %d: %s' % (
                        p.returncode, self._last_error(instance)))
            ping = self._ping(instance)
            if ping is not None:
                if want == 'incoming' and ping.get('incoming'):
                    return ping
                if want == 'running' and 'vm' not in ping:
                    return ping
            time.sleep(0.05)
        client.stop(p.pid, self._sock(instance))
        raise exception.InstanceDeployFailure(
            reason='godwit did not serve its API within %d s: %s' % (
                self.boot_timeout, self._last_error(instance)))

    def _last_error(self, instance):
        try:
            with open(os.path.join(self._dir(instance), 'godwit.log'),
                      errors='replace') as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            return lines[-1] if lines else '(no output)'
        except OSError:
            return '(no log)'

    def _stop(self, instance, timeout=30):
        """Ends the instance's godwit: a clean shutdown through its API, else a
        signal. Its GPU function is free once the process is gone."""
        sock = self._sock(instance)
        ping = self._ping(instance)
        if ping is None:
            # Nobody answers: a socket left by a godwit that was killed.
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
            return
        pid = ping['pid']
        try:
            code, v = client.api(sock, 'PUT', 'vm.shutdown', timeout=timeout)
        except OSError:
            code, v = None, {}
        if code not in (200, None):
            LOG.info('godwit: vm.shutdown answered %s (%s); stopping it with '
                     'a signal', code, v.get('error'), instance=instance)
        end = time.monotonic() + timeout
        while code == 200 and time.monotonic() < end and client.alive(pid):
            time.sleep(0.05)
        client.stop(pid, sock)
        self._reap()

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        # cleanup ends the godwit too.
        self.cleanup(context, instance, network_info, block_device_info,
                     destroy_disks)

    def cleanup(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, migrate_data=None, destroy_vifs=True,
                destroy_secrets=True):
        self._stop(instance)
        if destroy_disks:
            shutil.rmtree(self._dir(instance), ignore_errors=True)

    def power_off(self, instance, timeout=0, retry_interval=0):
        self._stop(instance, timeout=timeout or 30)

    def power_on(self, context, instance, network_info,
                 block_device_info=None, accel_info=None, share_info=None):
        if self._info(instance) is not None:
            return
        cfg = self._config(instance)
        if cfg is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        self._start(instance, cfg)

    def reboot(self, context, instance, network_info, reboot_type,
               block_device_info=None, bad_volumes_callback=None,
               accel_info=None, share_info=None):
        # A godwit guest has no ACPI to ask: soft and hard reboot both start
        # the VM anew (its GPU function on the same GPU, which Placement still
        # holds).
        self._stop(instance)
        self.power_on(context, instance, network_info)

    def pause(self, instance):
        client.api_ok(self._sock(instance), 'PUT', 'vm.pause')

    def unpause(self, instance):
        client.api_ok(self._sock(instance), 'PUT', 'vm.resume')

    # -- live migration -------------------------------------------------------
    #
    # The data travels in Nova's LibvirtLiveMigrateData: nova-conductor passes
    # it between the hosts and knows only Nova's own object types. Its fields
    # mean here what they mean for libvirt: target_connect_addr is where the
    # destination's godwit listens; source_mdev_types maps the source's GPU
    # function to its profile, target_mdevs to the destination GPU that
    # Placement gave it.

    def check_can_live_migrate_destination(self, context, instance,
                                           src_compute_info, dst_compute_info,
                                           block_migration=False,
                                           disk_over_commit=False):
        data = migrate_data_obj.LibvirtLiveMigrateData()
        data.is_shared_instance_path = False
        # Nothing is shared, and there are no disks: the source's instance
        # directory goes once the VM has moved (Nova's cleanup at the source).
        data.is_shared_block_storage = False
        data.block_migration = False
        data.filename = ''
        data.image_type = 'godwit'
        return data

    def cleanup_live_migration_destination_check(self, context,
                                                 dest_check_data):
        pass

    def check_can_live_migrate_source(self, context, instance,
                                      dest_check_data, block_device_info=None):
        info = self._info(instance)
        if info is None or info.get('state') not in ('running', 'paused'):
            raise exception.MigrationPreCheckError(
                reason='godwit does not run %s here' % instance.uuid)
        cfg = self._config(instance) or {}
        if cfg.get('gpu_profile'):
            dest_check_data.source_mdev_types = {
                'gpu%d' % cfg['gpu_index']: cfg['gpu_profile']}
        return dest_check_data

    def check_source_migrate_data_at_dest(self, ctxt, instance, migrate_data,
                                          migration, limits, allocs):
        src = dict(migrate_data.source_mdev_types
                   if 'source_mdev_types' in migrate_data else {})
        if not src:
            return migrate_data
        (src_gpu, profile), = src.items()
        rc = gpu.resource_class(profile)
        try:
            g = gpu.gpu_in(allocs, rc, self._gpu_providers)
        except exception.InvalidRequest as e:
            raise exception.MigrationPreCheckError(reason=str(e))
        migrate_data.target_mdevs = {src_gpu: 'gpu%d' % g}
        return migrate_data

    def pre_live_migration(self, context, instance, block_device_info,
                           network_info, disk_info, migrate_data):
        """Starts the godwit that receives the instance; its GPU function is
        leased on the GPU Placement chose when the source's VM arrives, of the
        profile the source's has (any other is refused)."""
        cfg = {'name': instance.name, 'guest': None, 'args': [],
               'memory_mb': instance.flavor.memory_mb,
               'vcpus': instance.flavor.vcpus,
               'gpu_profile': None, 'gpu_index': None}
        argv = ['--incoming', 'tcp:%s:0' % self.inbound_addr,
                '--memory', str(instance.flavor.memory_mb),
                '--vcpus', str(instance.flavor.vcpus)]
        if self.prefault:
            argv.append('--prefault')
        targets = dict(migrate_data.target_mdevs
                       if 'target_mdevs' in migrate_data else {})
        if targets:
            (src_gpu, dst_gpu), = targets.items()
            cfg['gpu_profile'] = migrate_data.source_mdev_types[src_gpu]
            cfg['gpu_index'] = int(dst_gpu[len('gpu'):])
            # The profile too: godwit refuses a source that brings another,
            # and with --prefault readies that profile's VRAM.
            argv += ['--gpu', cfg['gpu_profile'],
                     '--gpu-index', str(cfg['gpu_index'])]
        cfg['guest'], cfg['args'] = self._guest(context, instance)
        self._save_config(instance, cfg)
        argv += (['--tls-dir', self.tls_dir] if self.tls_dir
                 else ['--insecure'])
        argv += self._common_args(instance)
        ping = self._launch(instance, argv, want='incoming')
        migrate_data.target_connect_addr = ping['incoming']
        LOG.info('godwit: waiting for %s on %s', instance.uuid,
                 ping['incoming'], instance=instance)
        return migrate_data

    def live_migration(self, context, instance, dest,
                       post_method, recover_method, block_migration=False,
                       migrate_data=None):
        sock = self._sock(instance)
        ping = self._ping(instance)
        args = ['--api-socket', sock,
                '--to', migrate_data.target_connect_addr,
                '--downtime-ms', str(self.downtime_ms),
                '--mode', self.mode]
        if self.bandwidth:
            args += ['--max-bandwidth', '%dM' % self.bandwidth]
        args += (['--tls-dir', self.tls_dir] if self.tls_dir
                 else ['--insecure'])
        try:
            return self._live_migration(context, instance, dest, post_method,
                                        recover_method, block_migration,
                                        migrate_data, sock, ping, args)
        finally:
            self._asked.pop(instance.uuid, None)

    def _live_migration(self, context, instance, dest, post_method,
                        recover_method, block_migration, migrate_data, sock,
                        ping, args):
        p = self.godwit.migrate(args)
        migration = migrate_data.migration if 'migration' in migrate_data \
            else None
        end = time.monotonic() + self.migration_timeout
        cancelled = False
        saved = 0.0
        while p.poll() is None:
            if time.monotonic() > end and not cancelled:
                LOG.warning('godwit: live migration of %s took over %d s: '
                            'cancelling it', instance.uuid,
                            self.migration_timeout, instance=instance)
                self._asked[instance.uuid] = 'abort'
                cancelled = True
            # Nova's record of the progress is written once a second.
            now = time.monotonic()
            active = self._progress(sock, migration if now - saved >= 1
                                    else None)
            if active and now - saved >= 1:
                saved = now
            asked = self._asked.get(instance.uuid)
            if asked and active:
                endpoint = {'abort': 'vm.migrate-cancel',
                            'postcopy': 'vm.migrate-postcopy'}[asked]
                try:
                    code, v = client.api(sock, 'PUT', endpoint)
                except OSError as e:
                    code, v = None, {'error': str(e)}
                if code == 200:
                    del self._asked[instance.uuid]
                elif code == 409:
                    # Too late (the hand-over began) or not possible now.
                    del self._asked[instance.uuid]
                    LOG.warning('godwit: %s: %s', endpoint, v.get('error'),
                                instance=instance)
                else:
                    LOG.info('godwit: %s: %s (HTTP %s); trying again',
                             endpoint, v.get('error'), code,
                             instance=instance)
            time.sleep(0.2)
        out, err = p.communicate()
        try:
            report = json.loads(out)
        except ValueError:
            report = {}
        if p.returncode == 0 and report.get('status') == 'completed':
            pc = report.get('postcopy')
            LOG.info('godwit: %s moved to %s: %s, downtime %s ms, total %s '
                     'ms%s',
                     instance.uuid, dest,
                     report.get('ran') or report.get('mode'),
                     report.get('downtime_ms'), report.get('total_ms'),
                     ', post-copy after %s ms (%s)' % (
                         pc.get('switched_at_ms'), pc.get('reason'))
                     if pc else '', instance=instance)
            # The source godwit exits once the destination runs the VM.
            if ping is not None:
                deadline = time.monotonic() + 30
                while client.alive(ping['pid']) and \
                        time.monotonic() < deadline:
                    time.sleep(0.05)
            self._reap()
            post_method(context, instance, dest, block_migration,
                        migrate_data)
            return
        why = report.get('error') or err.strip() or 'exit %d' % p.returncode
        kind = report.get('error_kind')
        if kind == 'vm_ended':
            # The guest exited or crashed while it moved: it runs on neither
            # host and nothing was handed over; the destination has dropped
            # what it had. Nova learns the power state as for any ended VM.
            LOG.warning('godwit: %s ended while it migrated to %s: %s',
                        instance.uuid, dest, why, instance=instance)
            recover_method(context, instance, dest, migrate_data)
            return
        if kind == 'cancelled':
            # By the operator (it runs on here), or because the godwit here
            # was stopped (a signal: it stops with it).
            LOG.info('godwit: live migration of %s to %s cancelled; %s',
                     instance.uuid, dest,
                     'it runs on here' if report.get('source_running')
                     else 'it stops here: %s' % why, instance=instance)
            recover_method(context, instance, dest, migrate_data,
                           migration_status='cancelled')
            return
        if report.get('source_running') is False:
            # Handed over without a confirmation: the VM may run at the
            # destination. Rolling back could run it twice, or lose it.
            raise exception.MigrationError(
                reason='godwit: %s (the VM is stopped on this host and may '
                       'run on %s: check it there before resuming it here '
                       'with `godwit resume --force`)' % (why, dest))
        LOG.error('godwit: live migration of %s to %s failed (%s): %s; it '
                  'runs on here', instance.uuid, dest, kind, why,
                  instance=instance)
        recover_method(context, instance, dest, migrate_data)

    def _progress(self, sock, migration):
        """Copies godwit's progress into Nova's migration record; whether the
        migration runs."""
        try:
            code, v = client.api(sock, 'GET', 'vm.migration', timeout=5)
        except OSError:
            return False
        prog = v.get('progress') if code == 200 else None
        if not prog or migration is None:
            return bool(prog)
        page = 4096
        # Nova's API shows these as positive counts or nothing.
        for field, pages in (('memory_total', prog['memory_pages']),
                             ('memory_remaining', prog['remaining_pages']),
                             ('memory_processed', prog['pages_sent'])):
            if pages > 0:
                setattr(migration, field, pages * page)
        try:
            migration.save()
        except Exception as e:  # progress is best effort
            LOG.debug('godwit: migration progress not saved: %s', e)
        return True

    def live_migration_abort(self, instance):
        self._asked[instance.uuid] = 'abort'

    def live_migration_force_complete(self, instance):
        # Nova's "force complete" is godwit's switch to post-copy: the VM moves
        # now and its memory follows it.
        self._asked[instance.uuid] = 'postcopy'

    def post_live_migration(self, context, instance, block_device_info,
                            migrate_data=None):
        pass

    def post_live_migration_at_source(self, context, instance, network_info):
        # The source godwit ended when the destination took the VM; this only
        # makes sure (and frees the GPU function if it did not).
        self._stop(instance)

    def post_live_migration_at_destination(self, context, instance,
                                           network_info,
                                           block_migration=False,
                                           block_device_info=None):
        info = self._info(instance)
        if info is None or info.get('state') not in ('running', 'paused'):
            raise exception.NovaException(
                'godwit does not run %s after its migration here: %s' % (
                    instance.uuid, self._last_error(instance)))

    def rollback_live_migration_at_destination(self, context, instance,
                                               network_info,
                                               block_device_info,
                                               destroy_disks=True,
                                               migrate_data=None):
        # The source still runs the VM: the receiving godwit (and with it the
        # GPU function it leased) goes.
        self._stop(instance, timeout=5)
        shutil.rmtree(self._dir(instance), ignore_errors=True)

    def rollback_live_migration_at_source(self, context, instance,
                                          migrate_data):
        pass

    def get_instance_disk_info(self, instance, block_device_info=None):
        return '[]'

    def plug_vifs(self, instance, network_info):
        pass

    def unplug_vifs(self, instance, network_info):
        pass
