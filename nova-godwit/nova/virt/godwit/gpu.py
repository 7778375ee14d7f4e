"""godwit's virtual GPUs in Placement's terms.

Each physical GPU is a child resource provider of the compute node, named
``<node>_gpu<N>``, with an inventory of one custom resource class per vGPU
profile, ``CUSTOM_GODWIT_<PROFILE>`` (``GW8-1C`` -> ``CUSTOM_GODWIT_GW8_1C``),
sized from ``godwit gpu status``. A flavor asks for
``resources:CUSTOM_GODWIT_GW8_1C=1``.

Why a resource class per profile and not ``VGPU`` with a profile trait: VFs
of two profiles are not interchangeable units (a GW8-4C VF holds four times
the frame buffer of a GW8-1C one), and a GPU runs one profile at a time, so
a count of "VGPU" on a GPU means nothing without its profile. A class per
profile makes the count true, needs one extra spec in the flavor, and keeps
Nova's libvirt-only handling of ``VGPU`` (mdevs) out of the way."""

import re

from nova import exception

RC_PREFIX = 'CUSTOM_GODWIT_'
_RESOURCES = re.compile(r'^resources\d*:(CUSTOM_GODWIT_[A-Z0-9_]+)$')


def resource_class(profile):
    return RC_PREFIX + re.sub(r'[^A-Z0-9]', '_', profile.upper())


def provider_name(nodename, gpu):
    return '%s_gpu%d' % (nodename, gpu)


def offered(profiles, status, config):
    """{gpu index: profile} this host offers.

    profiles: `godwit gpu profiles --json`; status: `godwit gpu status --json`;
    config: the [godwit] gpu_profiles option ({"0": "GW8-1C"}).
    """
    by_name = {p['name']: p for p in profiles['profiles']}
    out = {}
    gpus = status
    if config:
        for key, name in config.items():
            try:
                g = int(key)
            except ValueError:
                raise exception.InvalidConfiguration(
                    '[godwit] gpu_profiles: %r is not a GPU index' % key)
            if not 0 <= g < len(gpus):
                raise exception.InvalidConfiguration(
                    '[godwit] gpu_profiles: this host has no GPU %d (it has '
                    '%d)' % (g, len(gpus)))
            p = by_name.get(name)
            if p is None:
                raise exception.InvalidConfiguration(
                    '[godwit] gpu_profiles: unknown profile %r (godwit gpu '
                    'profiles: %s)' % (name, ', '.join(sorted(by_name))))
            if p['model'] != gpus[g]['model']:
                raise exception.InvalidConfiguration(
                    '[godwit] gpu_profiles: GPU %d is a %s, profile %s is for '
                    'a %s' % (g, gpus[g]['model'], name, p['model']))
            out[g] = name
        return out
    for g, gpu in enumerate(gpus):
        fits = [p for p in profiles['profiles'] if p['model'] == gpu['model']]
        if fits:
            out[g] = min(fits, key=lambda p: p['framebuffer'])['name']
    return out


def inventory(profiles, status, config):
    """{gpu index: (resource class, total, reserved)}.

    A GPU whose VFs are held under another profile than the one it is given
    (by a godwit started outside Nova) can take none of its own: all
    reserved."""
    limits = {p['name']: p['max_instances'] for p in profiles['profiles']}
    out = {}
    for g, name in offered(profiles, status, config).items():
        total = limits[name]
        held = status[g].get('profile')
        reserved = total if held not in (None, name) else 0
        out[g] = (resource_class(name), total, reserved)
    return out


def requested_profile(extra_specs, profiles):
    """The vGPU profile a flavor asks for (None: no GPU). One GPU function
    per VM."""
    by_rc = {resource_class(p['name']): p['name']
             for p in profiles['profiles']}
    asked = []
    for key, value in extra_specs.items():
        m = _RESOURCES.match(key)
        if not m:
            continue
        if m.group(1) not in by_rc:
            raise exception.InvalidRequest(
                'flavor extra spec %s: no godwit vGPU profile has resource '
                'class %s' % (key, m.group(1)))
        if str(value).strip() != '1':
            raise exception.InvalidRequest(
                'flavor extra spec %s=%s: a godwit VM has one GPU function'
                % (key, value))
        asked.append(by_rc[m.group(1)])
    if len(asked) > 1:
        raise exception.InvalidRequest(
            'the flavor asks for %d godwit GPU functions (%s); a VM has one'
            % (len(asked), ', '.join(asked)))
    return asked[0] if asked else None


def gpu_in(allocations, rc, providers):
    """The GPU index whose provider the allocations take `rc` from.

    allocations: {rp uuid: {'resources': {rc: n}}}; providers: {rp uuid: gpu}.
    """
    for rp, alloc in (allocations or {}).items():
        if alloc.get('resources', {}).get(rc):
            if rp not in providers:
                raise exception.InvalidRequest(
                    '%s is allocated from resource provider %s, which is not '
                    'a GPU of this host' % (rc, rp))
            return providers[rp]
    raise exception.InvalidRequest(
        'no allocation of %s on this host' % rc)
