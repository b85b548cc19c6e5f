//! `pgtasks-bench compare FILE…`: reads the JSON lines of one run (pgtasks'
//! and, when measured in the same run, the peers' — `bench/compare.sh` puts
//! both in one file) and prints pgtasks/peer ratios as a markdown table.
//!
//! Lines are matched on the fields both harnesses print: `system`, `metric`,
//! `config`. When a figure was measured more than once, the first is used.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub figure: String,
    pub peer: String,
    pub pgtasks: f64,
    pub peer_value: f64,
    pub lower_is_better: bool,
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.pgtasks / self.peer_value
    }

    fn better(&self) -> &'static str {
        let r = self.ratio();
        if (r - 1.0).abs() < 0.005 {
            "equal"
        } else if (r < 1.0) == self.lower_is_better {
            "pgtasks"
        } else {
            "peer"
        }
    }
}

pub fn run(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        lines.extend(
            text.lines()
                .filter(|l| l.trim_start().starts_with('{'))
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
        );
    }
    let (rows, missing) = compare(&lines);
    println!("| figure | peer | pgtasks | peer value | pgtasks / peer | better |");
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} |",
            row.figure,
            row.peer,
            fmt(row.pgtasks),
            fmt(row.peer_value),
            row.ratio(),
            row.better()
        );
    }
    if !missing.is_empty() {
        println!("\nNot compared (not measured in this run):");
        for m in &missing {
            println!("- {m}");
        }
    }
    let reference: Vec<String> = lines
        .iter()
        .filter(|l| l["metric"] == "insert_commit")
        .map(|l| {
            format!(
                "{} tps with {} client(s)",
                fmt(num(l, &["tps"]).unwrap_or(f64::NAN)),
                l["clients"]
            )
        })
        .collect();
    if !reference.is_empty() {
        println!(
            "\nPostgreSQL reference in this run (pgbench, single-row INSERT commits): {}",
            reference.join(", ")
        );
    }
    Ok(())
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A number at `path` in `v`.
fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_f64()
}

fn is(v: &Value, system: &str, metric: &str) -> bool {
    v["metric"] == metric
        && v["system"]
            .as_str()
            .is_some_and(|s| s == system || s.starts_with(&format!("{system}(")))
}

/// A test on one JSON line.
type Pred<'a> = &'a dyn Fn(&Value) -> bool;

/// Every ratio that can be formed from `lines`, and what was missing.
pub fn compare(lines: &[Value]) -> (Vec<Row>, Vec<String>) {
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    let pg = |metric: &str, pred: Pred| lines.iter().find(|l| is(l, "pgtasks", metric) && pred(l));

    // Pickup latency at the peer's rate (20/s), SQL, fresh table.
    let pickup_peers: [(&str, &str, Pred); 3] = [
        ("graphile-worker", "graphile-worker", &|_| true),
        ("pg-boss", "pg-boss (LISTEN/NOTIFY)", &|l| {
            l["config"]["notify"] == true
        }),
        ("procrastinate", "procrastinate", &|_| true),
    ];
    for (system, label, pred) in pickup_peers {
        let Some(peer) = lines
            .iter()
            .find(|l| is(l, system, "pickup_latency") && pred(l))
        else {
            missing.push(format!("pickup latency of {label}"));
            continue;
        };
        let rate = num(peer, &["config", "rate_per_s"]).unwrap_or(20.0);
        let Some(ours) = pg("pickup_latency", &|l| {
            l["config"]["via"] == "sql"
                && l["config"]["scenario"] == "fresh"
                && num(l, &["config", "rate_per_s"]) == Some(rate)
        }) else {
            missing.push(format!("pgtasks pickup latency (sql) at {rate}/s"));
            continue;
        };
        for p in ["p50_ms", "p99_ms"] {
            if let (Some(a), Some(b)) = (num(ours, &[p]), num(peer, &[p])) {
                rows.push(Row {
                    figure: format!("pickup {} at {rate}/s (ms)", &p[..3]),
                    peer: label.to_string(),
                    pgtasks: a,
                    peer_value: b,
                    lower_is_better: true,
                });
            }
        }
    }

    // Drain: the best peer configuration, and each peer's best, at the same n.
    let drains: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["metric"] == "process_throughput"
                && l["system"] != "pgtasks"
                && l["timed_out"] != true
        })
        .collect();
    let best_of = |system: Option<&str>| {
        drains
            .iter()
            .filter(|l| system.is_none_or(|s| l["system"] == s))
            .max_by(|a, b| {
                let a = num(a, &["jobs_per_s"]).unwrap_or(0.0);
                let b = num(b, &["jobs_per_s"]).unwrap_or(0.0);
                a.total_cmp(&b)
            })
            .copied()
    };
    let mut drain_peers = vec![(None, "best peer configuration".to_string())];
    for system in ["pg-boss", "graphile-worker", "procrastinate"] {
        drain_peers.push((Some(system), system.to_string()));
    }
    for (system, label) in drain_peers {
        let Some(peer) = best_of(system) else {
            missing.push(format!("drain throughput of {label}"));
            continue;
        };
        let n = num(peer, &["n"]);
        let ours = lines
            .iter()
            .filter(|l| {
                is(l, "pgtasks", "process_throughput")
                    && l["config"]["scenario"] == "fresh"
                    && l["config"]["queues"] == 1
                    // Completed jobs kept, as by default (deleting them is
                    // cheaper): the conservative figure.
                    && l["config"]["completed_jobs"] != "deleted"
                    && num(l, &["n"]) == n
                    && l["timed_out"] != true
            })
            .max_by(|a, b| {
                let a = num(a, &["jobs_per_s"]).unwrap_or(0.0);
                let b = num(b, &["jobs_per_s"]).unwrap_or(0.0);
                a.total_cmp(&b)
            });
        let Some(ours) = ours else {
            missing.push(format!("pgtasks drain of n = {}", n.unwrap_or(0.0)));
            continue;
        };
        if let (Some(a), Some(b)) = (num(ours, &["jobs_per_s"]), num(peer, &["jobs_per_s"])) {
            rows.push(Row {
                figure: format!(
                    "drain {} jobs (jobs/s; pgtasks concurrency {}, completed jobs kept)",
                    n.unwrap_or(0.0),
                    ours["config"]["concurrency_per_queue"]
                ),
                peer: format!(
                    "{label}: {} {}",
                    peer["system"].as_str().unwrap_or("?"),
                    peer["config"]
                ),
                pgtasks: a,
                peer_value: b,
                lower_is_better: false,
            });
        }
    }

    // Enqueue, single-row from 8 clients and batch, against each peer.
    for (metric, figure) in [
        (
            "enqueue_single",
            "enqueue single-row, concurrent clients (jobs/s)",
        ),
        ("enqueue_batch", "enqueue batch, chunks of 1000 (jobs/s)"),
    ] {
        let ours = pg(metric, &|_| true);
        for system in ["pg-boss", "graphile-worker", "procrastinate"] {
            let peer = lines
                .iter()
                .filter(|l| is(l, system, metric) && l["config"]["queue_notify"] != true)
                .max_by(|a, b| {
                    let a = num(a, &["jobs_per_s"]).unwrap_or(0.0);
                    let b = num(b, &["jobs_per_s"]).unwrap_or(0.0);
                    a.total_cmp(&b)
                });
            match (
                ours.and_then(|o| num(o, &["jobs_per_s"])),
                peer.and_then(|p| num(p, &["jobs_per_s"])),
            ) {
                (Some(a), Some(b)) => rows.push(Row {
                    figure: figure.to_string(),
                    peer: system.to_string(),
                    pgtasks: a,
                    peer_value: b,
                    lower_is_better: false,
                }),
                _ => missing.push(format!("{metric} of pgtasks or {system}")),
            }
        }
    }

    // HTTP submit and memory against the seed app.
    let seed_wrk = lines.iter().find(|l| is(l, "seed-app", "wrk_summary"));
    let ours = pg("http_submit", &|_| true);
    for (figure, our_key, seed_key, lower) in [
        ("HTTP submit (req/s)", "req_per_s", "req_per_s", false),
        ("HTTP submit p50 (ms)", "p50_ms", "lat_p50_ms", true),
        ("HTTP submit p99 (ms)", "p99_ms", "lat_p99_ms", true),
    ] {
        match (
            ours.and_then(|o| num(o, &[our_key])),
            seed_wrk.and_then(|s| num(s, &[seed_key])),
        ) {
            (Some(a), Some(b)) => rows.push(Row {
                figure: figure.to_string(),
                peer: "seed app (hono + pg-boss)".to_string(),
                pgtasks: a,
                peer_value: b,
                lower_is_better: lower,
            }),
            _ => missing.push(format!("{figure} of pgtasks or the seed app")),
        }
    }
    let seed_rss = lines.iter().find(|l| l["metric"] == "seed_rss");
    let our_rss = pg("rss", &|_| true);
    for (figure, our_key, seed_key) in [
        ("RSS idle (MiB)", "idle_mib", "rss_idle_mib"),
        (
            "RSS after HTTP load (MiB)",
            "after_load_mib",
            "rss_after_load_mib",
        ),
    ] {
        match (
            our_rss.and_then(|o| num(o, &[our_key])),
            seed_rss.and_then(|s| num(s, &[seed_key])),
        ) {
            (Some(a), Some(b)) => rows.push(Row {
                figure: figure.to_string(),
                peer: "seed app (hono + pg-boss)".to_string(),
                pgtasks: a,
                peer_value: b,
                lower_is_better: true,
            }),
            _ => missing.push(format!("{figure} of pgtasks or the seed app")),
        }
    }
    (rows, missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratios_are_pgtasks_over_peer_matched_on_config() {
        let lines = vec![
            json!({"system":"pgtasks","metric":"pickup_latency","config":{"via":"http","scenario":"fresh","rate_per_s":20.0},"p50_ms":9.0,"p99_ms":9.0}),
            json!({"system":"pgtasks","metric":"pickup_latency","config":{"via":"sql","scenario":"fresh","rate_per_s":20.0},"p50_ms":0.5,"p99_ms":2.0}),
            json!({"system":"graphile-worker","metric":"pickup_latency","config":{"rate_per_s":20},"p50_ms":1.0,"p99_ms":2.0}),
            json!({"system":"pg-boss","metric":"pickup_latency","config":{"notify":false,"rate_per_s":20},"p50_ms":999.0,"p99_ms":2000.0}),
            json!({"system":"pgtasks","metric":"process_throughput","config":{"scenario":"fresh","queues":1,"concurrency_per_queue":10},"n":20000,"jobs_per_s":10000.0}),
            json!({"system":"pgtasks","metric":"process_throughput","config":{"scenario":"fresh","queues":1,"concurrency_per_queue":100},"n":20000,"jobs_per_s":30000.0}),
            json!({"system":"pg-boss","metric":"process_throughput","config":{},"n":20000,"jobs_per_s":20000.0,"timed_out":false}),
            json!({"system":"graphile-worker","metric":"process_throughput","config":{},"n":20000,"jobs_per_s":40000.0,"timed_out":true}),
            json!({"system":"seed-app(hono+pg-boss 12)","metric":"wrk_summary","req_per_s":2000.0,"lat_p50_ms":10.0,"lat_p99_ms":20.0}),
            json!({"system":"pgtasks","metric":"http_submit","req_per_s":4000.0,"p50_ms":5.0,"p99_ms":10.0}),
            json!({"metric":"seed_rss","rss_idle_mib":68.0,"rss_after_load_mib":103.0}),
            json!({"system":"pgtasks","metric":"rss","idle_mib":17.0,"after_load_mib":20.6}),
        ];
        let (rows, missing) = compare(&lines);
        let find = |figure: &str, peer: &str| {
            rows.iter()
                .find(|r| r.figure.starts_with(figure) && r.peer.starts_with(peer))
                .unwrap_or_else(|| panic!("no row {figure} / {peer}: {rows:?}"))
        };
        assert_eq!(find("pickup p50", "graphile").ratio(), 0.5);
        assert_eq!(find("pickup p50", "graphile").better(), "pgtasks");
        assert_eq!(find("pickup p99", "graphile").better(), "equal");
        assert!(missing
            .iter()
            .any(|m| m.contains("pg-boss (LISTEN/NOTIFY)")));
        // A timed-out peer run is not the best configuration.
        assert_eq!(find("drain", "best peer").ratio(), 1.5);
        assert_eq!(find("HTTP submit (req/s)", "seed").ratio(), 2.0);
        assert_eq!(find("HTTP submit p50", "seed").better(), "pgtasks");
        assert_eq!(find("RSS idle", "seed").ratio(), 0.25);
    }
}
