//! How figures are printed: one JSON line per figure on stdout, and readable
//! lines on stderr (as they come, and again as a summary at the end), so
//! `pgtasks-bench all > run.jsonl` keeps the JSON alone.
//!
//! JSON field names follow the peers' harness (`system`, `version`, `metric`,
//! `config`, `n`, `min_ms` … `max_ms`, `mean_ms`, `seconds`, `jobs_per_s`), so
//! pgtasks' lines and the peers' lines can be read by one summarizer.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

pub const SYSTEM: &str = "pgtasks";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Wall-clock microseconds since the Unix epoch. Two processes on one host
/// read the same clock, which is what pickup latency compares.
pub fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Nearest-rank percentile of ascending `sorted` values: the smallest value
/// with at least `p` percent of the values at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Distribution of a set of durations in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

impl Summary {
    pub fn of(mut ms: Vec<f64>) -> Summary {
        ms.sort_by(f64::total_cmp);
        let mean = (!ms.is_empty()).then(|| ms.iter().sum::<f64>() / ms.len() as f64);
        Summary {
            n: ms.len(),
            min: ms.first().copied(),
            p50: percentile(&ms, 50.0),
            p90: percentile(&ms, 90.0),
            p99: percentile(&ms, 99.0),
            max: ms.last().copied(),
            mean,
        }
    }

    /// The `n`, `min_ms` … `mean_ms` fields, rounded to the microsecond.
    pub fn fields(&self) -> Map<String, Value> {
        let r = |v: Option<f64>| v.map(|x| (x * 1000.0).round() / 1000.0);
        let mut map = Map::new();
        map.insert("n".into(), json!(self.n));
        map.insert("min_ms".into(), json!(r(self.min)));
        map.insert("p50_ms".into(), json!(r(self.p50)));
        map.insert("p90_ms".into(), json!(r(self.p90)));
        map.insert("p99_ms".into(), json!(r(self.p99)));
        map.insert("max_ms".into(), json!(r(self.max)));
        map.insert("mean_ms".into(), json!(r(self.mean)));
        map
    }

    /// `p50 0.84  p90 1.02  p99 2.31  max 3.10 ms (min 0.41, n 500)`.
    pub fn line(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        format!(
            "p50 {}  p90 {}  p99 {}  max {} ms (min {}, n {})",
            f(self.p50),
            f(self.p90),
            f(self.p99),
            f(self.max),
            f(self.min),
            self.n
        )
    }
}

/// Collects the figures of one run.
#[derive(Default)]
pub struct Report {
    lines: Vec<String>,
}

impl Report {
    /// Prints one figure as a JSON line: `system`, `version`, `metric` and
    /// `ts`, then `fields` (an object).
    pub fn emit(&mut self, metric: &str, fields: Value) {
        let mut line = Map::new();
        line.insert("ts".into(), json!(chrono::Utc::now().to_rfc3339()));
        line.insert("system".into(), json!(SYSTEM));
        line.insert("version".into(), json!(VERSION));
        line.insert("metric".into(), json!(metric));
        if let Value::Object(fields) = fields {
            line.extend(fields);
        }
        println!("{}", Value::Object(line));
    }

    /// A readable result line: printed now and repeated in the summary.
    pub fn note(&mut self, text: String) {
        eprintln!("  {text}");
        self.lines.push(text);
    }

    /// Announces a step (stderr only).
    pub fn step(&self, text: &str) {
        eprintln!("-> {text}");
    }

    pub fn print_summary(&self) {
        if self.lines.is_empty() {
            return;
        }
        eprintln!("\n== pgtasks-bench summary ==");
        for line in &self.lines {
            eprintln!("{line}");
        }
    }
}

/// Merges `extra` (an object) into `base` (an object).
pub fn merged(mut base: Value, extra: &Value) -> Value {
    if let (Value::Object(base), Value::Object(extra)) = (&mut base, extra) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.0), Some(1.0));
    }

    #[test]
    fn summary_sorts_and_rounds() {
        let s = Summary::of(vec![3.0, 1.0, 2.0, -0.25]);
        assert_eq!(s.min, Some(-0.25));
        assert_eq!(s.p50, Some(1.0));
        assert_eq!(s.max, Some(3.0));
        assert_eq!(s.fields()["mean_ms"], json!(1.438));
        assert_eq!(Summary::of(vec![]).fields()["p50_ms"], Value::Null);
    }
}
