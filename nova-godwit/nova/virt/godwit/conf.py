"""The ``[godwit]`` options of nova-compute."""

from oslo_config import cfg

godwit_group = cfg.OptGroup(
    'godwit', title='godwit options',
    help='The godwit compute driver: one godwit process per instance.')

godwit_opts = [
    cfg.StrOpt('binary', default='godwit',
               help='The godwit executable (a name on PATH or a path).'),
    cfg.StrOpt('run_dir', default='$state_path/godwit',
               help='Where each instance keeps its directory (console log, '
                    'godwit log, its configuration) and where its godwit '
                    'serves its API socket (<uuid>.sock). After a restart '
                    'nova-compute finds its running instances again here.'),
    cfg.StrOpt('gpu_dir', default='/run/godwit/gpu',
               help="This host's godwit GPU manager directory (godwit "
                    "--gpu-dir), shared by every godwit on the host."),
    cfg.DictOpt('gpu_profiles', default={},
                help='The vGPU profile each physical GPU offers, by GPU index '
                     '(as `godwit gpu status` numbers them), e.g. '
                     '"0:GW8-1C,1:GW8-4C". A godwit GPU runs VFs of one '
                     'profile at a time, so each GPU is given to one profile '
                     'and reported to Placement as a child resource provider '
                     'with an inventory of CUSTOM_GODWIT_<PROFILE>. GPUs not '
                     'named here are not offered; when empty, every GPU '
                     'offers the smallest profile of its model.'),
    cfg.StrOpt('seccomp', default='refuse',
               choices=['refuse', 'kill', 'log', 'off'],
               help="What an instance's godwit does with a system call "
                    "outside its seccomp filter (godwit run --seccomp): "
                    "refuse (the call fails with EPERM and godwit names it "
                    "in its log; the instance runs on), kill (the kernel "
                    "kills the process, and the instance with it, as "
                    "Firecracker does), log (the call runs and godwit "
                    "names it: for finding what a new kernel or C library "
                    "needs; it protects nothing) or off (no filter)."),
    cfg.StrOpt('netns',
               help='Start the instances\' godwit processes in this network '
                    'namespace (ip netns exec), so that their migration '
                    'traffic uses its interfaces.'),
    cfg.StrOpt('live_migration_inbound_addr', default='$my_ip',
               help='The address an incoming instance\'s godwit listens on '
                    'for its source (the port is chosen by the kernel and '
                    'handed to the source through Nova).'),
    cfg.StrOpt('live_migration_tls_dir',
               help='Migrate over TLS 1.3 with mutual certificates from this '
                    'directory (QEMU\'s x509 layout, `godwit tls-creds` makes '
                    'one); the same directory on every host. Unset: plain '
                    'TCP, for a migration network you trust.'),
    cfg.IntOpt('live_migration_downtime_ms', default=300, min=1,
               help='The longest pause of the guest a live migration may '
                    'cause (godwit migrate --downtime-ms).'),
    cfg.StrOpt('live_migration_mode', default='auto',
               choices=['precopy', 'postcopy', 'hybrid', 'auto'],
               help='How memory moves (godwit migrate --mode). auto: '
                    'pre-copy when it fits the downtime limit, else '
                    'post-copy after pre-copy rounds.'),
    cfg.IntOpt('live_migration_bandwidth', default=0, min=0,
               help='Cap on a live migration\'s bandwidth in MiB/s (godwit '
                    'migrate --max-bandwidth); 0: none.'),
    cfg.BoolOpt('live_migration_prefault', default=False,
                help='An arriving instance\'s godwit allocates and touches '
                     'all of its memory, and its GPU function\'s VRAM, '
                     'before it listens (godwit run --prefault), so the '
                     'migration does not pay for first touches (on hosts '
                     'that hand free memory back to '
                     'their hypervisor, most of a migration\'s time). The '
                     'memory is committed when the destination is '
                     'prepared; boot_timeout must cover touching it.'),
    cfg.IntOpt('live_migration_timeout', default=600, min=1,
               help='Seconds a live migration may take before it is '
                    'cancelled (the instance stays on the source).'),
    cfg.IntOpt('boot_timeout', default=60, min=1,
               help='Seconds a godwit process has to start and serve its '
                    'API.'),
    cfg.StrOpt('node_uuid',
               help="This compute node's UUID. Unset: Nova's own persistent "
                    "local node identity. Set it when several compute "
                    "services share one machine (test deployments)."),
]


def register_opts(conf):
    conf.register_group(godwit_group)
    conf.register_opts(godwit_opts, group=godwit_group)


def list_opts():
    return {godwit_group: godwit_opts}
