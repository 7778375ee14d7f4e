//! `godwit migrate`: asks a running godwit to migrate its VM, shows progress on a
//! terminal, prints the report.

use crate::cli::MigrateArgs;
use crate::run::fail;
use godwit_migration::{Options, Progress, Report};
use indicatif::{ProgressBar, ProgressStyle};
use std::process::ExitCode;
use std::time::Duration;

/// "100M" -> 100 MiB/s in bytes per second; a plain number is bytes per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("bad bandwidth {s:?} (use a number with K, M or G)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad bandwidth {s:?} (use a number with K, M or G)"))?;
    if n <= 0.0 || !n.is_finite() {
        return Err(format!("bandwidth must be more than 0 (got {s:?})"));
    }
    Ok((n * mult as f64) as u64)
}

fn show(bar: &ProgressBar, p: &Progress) {
    bar.set_length(p.memory_pages.max(1) * 4096);
    bar.set_position(p.bytes_sent.min(p.memory_pages * 4096));
    bar.set_message(format!(
        "{} round {} | {} MiB sent | dirty {:.0} MiB/s | expected downtime {:.1} ms{}",
        p.phase,
        p.round,
        p.bytes_sent >> 20,
        p.dirty_rate_mib_s,
        p.expected_downtime_ms,
        if p.throttle_pct > 0 {
            format!(" | throttle {}%", p.throttle_pct)
        } else {
            String::new()
        }
    ));
}

pub fn print_report(r: &Report) {
    println!("migration to {}: {}", r.to, r.status);
    if let Some(e) = &r.error {
        println!("  error: {e}");
    }
    println!(
        "  total {:.1} ms, downtime {:.1} ms (limit {} ms), setup {:.1} ms",
        r.total_ms, r.downtime_ms, r.downtime_limit_ms, r.setup_ms
    );
    let d = &r.downtime;
    println!(
        "  downtime: pause {:.2} ms, last {} pages {:.2} ms, state {:.2} ms, confirm {:.2} ms, start {:.2} ms",
        d.pause_ms, d.final_pages, d.final_pages_ms, d.state_ms, d.confirm_ms, d.start_ms
    );
    let b = &r.bytes;
    println!(
        "  sent {:.1} MiB: {} pages of data ({:.1} MiB), {} zero pages not sent as data, state {} bytes",
        b.total as f64 / (1 << 20) as f64,
        b.pages_sent,
        b.memory_data as f64 / (1 << 20) as f64,
        b.zero_pages,
        b.state
    );
    println!(
        "  {} rounds, {:.0} MiB/s, {} connection(s), dirty log {}{}, switched over: {}",
        r.round_count,
        r.throughput_mib_s,
        r.connections,
        r.dirty_log,
        if r.dirty_log == "ring" {
            format!(" ({} full-ring exits)", r.ring_full_exits)
        } else {
            String::new()
        },
        r.switchover_reason
    );
    if r.throttled {
        println!(
            "  auto-converge throttled the vCPUs up to {}%",
            r.max_throttle_pct
        );
    }
    println!(
        "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>9} {:>12} {:>12}",
        "round",
        "pages",
        "zero",
        "skipped",
        "dirty",
        "dirty MiB/s",
        "ms",
        "throttle",
        "expected ms",
        "log read us"
    );
    for x in &r.rounds {
        println!(
            "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>12.0} {:>10.1} {:>8}% {:>12.1} {:>12.0}",
            x.index,
            x.pages_sent,
            x.zero_pages,
            x.skipped_redirtied,
            x.dirty_pages,
            x.dirty_rate_mib_s,
            x.duration_ms,
            x.throttle_pct,
            x.expected_downtime_ms,
            x.dirty_log_us
        );
    }
    if r.status != "completed" {
        println!(
            "  the VM {}",
            if r.source_running {
                "keeps running on the source"
            } else {
                "is not running on the source"
            }
        );
    }
}

pub fn migrate(a: MigrateArgs) -> ExitCode {
    let max_bandwidth = match a.max_bandwidth.as_deref().map(parse_bandwidth).transpose() {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let o = Options {
        to: a.to.clone(),
        downtime_ms: a.downtime_ms,
        max_bandwidth,
        connections: a.connections,
    };
    if let Err(e) = o.check() {
        return fail(e);
    }
    let body = serde_json::to_string(&o).expect("plain data");
    let socket = a.api_socket.clone();
    let call = std::thread::spawn(move || {
        godwit_vmm::api::call_with(&socket, "PUT", "vm.migrate", &body, None)
    });
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
            .expect("static template"),
    );
    while !call.is_finished() {
        if !a.json {
            if let Ok((200, s)) = godwit_vmm::api::call(&a.api_socket, "GET", "vm.migration") {
                if let Some(p) = serde_json::from_str::<serde_json::Value>(&s)
                    .ok()
                    .and_then(|v| serde_json::from_value::<Progress>(v["progress"].clone()).ok())
                {
                    show(&bar, &p);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let (code, body) = match call.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail(e),
        Err(_) => return fail("the API call failed"),
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let report = if code == 200 {
        v.clone()
    } else {
        v["report"].clone()
    };
    match serde_json::from_value::<Report>(report) {
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).expect("plain data"));
            } else {
                print_report(&r);
            }
            if r.status == "completed" {
                ExitCode::SUCCESS
            } else {
                fail(format!(
                    "migration {}: {}",
                    r.status,
                    r.error.unwrap_or_default()
                ))
            }
        }
        Err(_) => fail(format!(
            "vm.migrate: {} (HTTP {code})",
            v["error"].as_str().unwrap_or(&body)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("100M").unwrap(), 100 << 20);
        assert_eq!(parse_bandwidth("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bandwidth("1.5K").unwrap(), 1536);
        assert_eq!(parse_bandwidth("1000").unwrap(), 1000);
        for bad in ["", "M", "0", "-1M", "10X", "abc"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }
}
