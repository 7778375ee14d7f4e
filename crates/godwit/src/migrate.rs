//! `godwit migrate`: asks a running godwit to migrate its VM, shows progress on a
//! terminal, prints the report.

use crate::cli::{MigrateArgs, OnOff};
use crate::run::fail;
use godwit_migration::{Mode, Options, Outcome, Progress, Report};
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

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub fn print_report(r: &Report) {
    outln!("migration to {}: {}", r.to, r.status);
    if let Some(e) = &r.error {
        outln!("  error: {e}");
    }
    let counted = r.bytes.pages_sent + r.bytes.zero_pages + r.bytes.state > 0;
    if r.status != Outcome::Completed && !counted && r.rounds.is_empty() && r.postcopy.is_none() {
        // It ended before its first round did (no destination there, one that refused
        // it at the handshake, a cancel): the rest of the report would be zeros and an
        // empty table.
        outln!(
            "  sent {:.1} MiB in {:.1} ms, no round completed",
            mib(r.bytes.total),
            r.total_ms
        );
        source_running(r);
        return;
    }
    outln!(
        "  total {:.1} ms, downtime {:.1} ms (limit {} ms), setup {:.1} ms, mode {} (ran {})",
        r.total_ms,
        r.downtime_ms,
        r.downtime_limit_ms,
        r.setup_ms,
        r.mode,
        r.ran
    );
    // Where it decided what ran (a pre-copy asked for ran as asked either way).
    if let Some(why) = r
        .postcopy_unavailable
        .as_ref()
        .filter(|_| r.mode == Mode::Auto)
    {
        outln!("  post-copy could not come to the destination, nothing switched to it: {why}");
    }
    if let Some(p) = &r.postcopy {
        let l = &p.fault_latency;
        outln!(
            "  post-copy: switched at {:.1} ms ({}); window {:.1} ms; {} pages asked for, {} pushed ({} ahead of a device), {} refused requests; {} remote faults, latency {:.0}/{:.0}/{:.0}/{:.0} us (min/median/p99/max), {} pages pre-paged, {} recoveries{}",
            p.switched_at_ms,
            p.reason,
            p.window_ms,
            p.requested_pages,
            p.background_pages,
            p.ahead_pages,
            p.refused_requests,
            p.remote_faults,
            l.min_us,
            l.median_us,
            l.p99_us,
            l.max_us,
            p.prepaged_pages,
            p.recoveries,
            p.vm_ended
                .as_ref()
                .map_or(String::new(), |e| format!("; the VM ended there first ({e})"))
        );
    }
    let d = &r.downtime;
    outln!(
        "  downtime: stop {:.2} ms, states {:.2} ms, last dirty log {:.2} ms, last {} pages {:.2} ms, confirm {:.2} ms (restore {:.2} ms), start {:.2} ms",
        d.pause_ms,
        d.state_ms,
        d.dirty_log_ms,
        d.final_pages,
        d.final_pages_ms,
        d.confirm_ms,
        d.restore_ms,
        d.start_ms
    );
    for name in &r.sections {
        let Some(p) = d.components.get(name) else {
            continue;
        };
        let extra: Vec<String> = p.extra.iter().map(|(k, v)| format!("{k} {v}")).collect();
        outln!(
            "    {name:<9} stop {:.2} ms, state {} bytes in {:.2} ms, last dirty log {:.2} ms, last {} pages {:.2} ms{}",
            p.stop_ms,
            p.state_bytes,
            p.state_ms,
            p.dirty_log_ms,
            p.final_pages,
            p.final_pages_ms,
            if extra.is_empty() {
                String::new()
            } else {
                format!(", {}", extra.join(", "))
            }
        );
    }
    let b = &r.bytes;
    outln!(
        "  sent {:.1} MiB: {} pages of data ({:.1} MiB), {} zero pages not sent as data, states {} bytes",
        mib(b.total),
        b.pages_sent,
        mib(b.memory_data),
        b.zero_pages,
        b.state
    );
    for name in &r.sections {
        if let Some(c) = b
            .components
            .get(name)
            .filter(|c| c.pages_sent + c.zero_pages > 0)
        {
            outln!(
                "    {name:<9} {:.1} MiB in {} pages, {} zero pages",
                mib(c.page_bytes),
                c.pages_sent,
                c.zero_pages
            );
        }
    }
    outln!(
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
    for (name, t) in &r.throttle {
        outln!(
            "  auto-converge held {name} back up to {}% for {:.0} ms ({} rounds)",
            t.max_pct,
            t.ms,
            t.rounds
        );
    }
    if !r.stop_copy.is_empty() {
        outln!("  stop-and-copy (no pre-copy): {}", r.stop_copy.join(", "));
    }
    outln!(
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
        outln!(
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
        // Each memory's share when more than one moved (RAM and a GPU's VRAM).
        if x.components.len() > 1 {
            for (name, p) in &x.components {
                let extra: Vec<String> = p.extra.iter().map(|(k, v)| format!("{k} {v}")).collect();
                outln!(
                    "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>12.0}   {name}{}",
                    "",
                    p.pages_sent,
                    p.zero_pages,
                    p.skipped_redirtied,
                    p.dirty_pages,
                    p.dirty_rate_mib_s,
                    if extra.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", extra.join(", "))
                    }
                );
            }
        }
    }
    if r.status != Outcome::Completed {
        source_running(r);
    }
}

fn source_running(r: &Report) {
    outln!(
        "  the VM {}",
        if r.source_running {
            "keeps running on the source"
        } else {
            "is not running on the source"
        }
    );
}

pub fn migrate(a: MigrateArgs) -> ExitCode {
    let max_bandwidth = match a.max_bandwidth.as_deref().map(parse_bandwidth).transpose() {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let o = Options {
        to: a.to.clone(),
        mode: match a.mode.parse() {
            Ok(m) => m,
            Err(e) => return fail(e),
        },
        downtime_ms: a.downtime_ms,
        max_bandwidth,
        connections: a.connections,
        stop_copy: match a.gpu_precopy {
            OnOff::On => vec![],
            OnOff::Off => vec!["gpu".into()],
        },
        tls_dir: a.tls_dir.clone(),
        insecure: a.insecure,
        page_checks: a.page_checks.into(),
        vcpu_priority: a.vcpu_priority.into(),
        migration_priority: a.migration_priority.into(),
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
                outln!("{}", serde_json::to_string_pretty(&r).expect("plain data"));
            } else {
                print_report(&r);
            }
            if r.status == Outcome::Completed {
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
