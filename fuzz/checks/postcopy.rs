//! Post-copy's hostile page traffic: the source taking page requests (REQUEST and AHEAD
//! frames) and a recovery's account of missing pages; the destination taking a
//! bitmap of missing pages, then pages and zero runs for any address.

pub fn check(data: &[u8]) {
    godwit_vmm::migratable::fuzz_postcopy::fuzz_postcopy(data);
}
