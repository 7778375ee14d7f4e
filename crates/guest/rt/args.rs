//! Guest arguments: the command line, as space-separated `key=value` words.

use crate::env;

pub fn cmdline() -> &'static str {
    let i = env::get();
    if i.cmdline_addr == 0 || i.cmdline_len == 0 {
        return "";
    }
    // SAFETY: the VMM (or PVH loader) placed cmdline_len bytes there; identity mapped.
    let b =
        unsafe { core::slice::from_raw_parts(i.cmdline_addr as *const u8, i.cmdline_len as usize) };
    core::str::from_utf8(b).unwrap_or("")
}

pub fn get(key: &str) -> Option<&'static str> {
    cmdline().split_ascii_whitespace().find_map(|w| {
        let (k, v) = w.split_once('=').unwrap_or((w, ""));
        (k == key).then_some(v)
    })
}

/// A number argument; `default` when absent. Accepts `flat` / `max` as 0 (= unlimited).
pub fn get_u64(key: &str, default: u64) -> u64 {
    match get(key) {
        None => default,
        Some("flat") | Some("max") => 0,
        Some(v) => match v.parse() {
            Ok(n) => n,
            Err(_) => {
                crate::println!("godwit-rt: bad value for {}: {:?}", key, v);
                crate::sys::exit(2)
            }
        },
    }
}
