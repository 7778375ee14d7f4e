//! Helpers shared by the migration engine's integration tests.

/// Whether /dev/kvm opens; without it a test fails, unless GODWIT_SKIP_KVM_TESTS=1 says
/// to skip what needs it.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(_) if std::env::var("GODWIT_SKIP_KVM_TESTS").as_deref() == Ok("1") => false,
        Err(e) => panic!("/dev/kvm: {e}; set GODWIT_SKIP_KVM_TESTS=1 to skip KVM tests"),
    }
}
