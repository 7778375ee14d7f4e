//! heartbeat: a line with a sequence number and the guest time every `period` ms.
//! Arguments: period=MS (default 100), count=N (0 = forever, default 10).
#![no_std]
#![no_main]

use godwit_rt::{args, println, time};

fn main() -> i32 {
    let period_ns = args::get_u64("period", 100).max(1) * 1_000_000;
    let count = args::get_u64("count", 10);
    let start = time::now_ns();
    let mut seq = 0u64;
    loop {
        seq += 1;
        let now = time::now_ns();
        println!(
            "heartbeat seq={} guest_ms={}.{:03}",
            seq,
            now / 1_000_000,
            now / 1000 % 1000
        );
        if count != 0 && seq >= count {
            return 0;
        }
        time::sleep_until_ns(start + seq * period_ns);
    }
}

godwit_rt::entry!("heartbeat", main);
