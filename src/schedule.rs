//! Cron schedules: parsing an expression in a time zone and finding its next
//! run. The table and the enqueueing live in `store` and
//! `maintenance::scheduler`.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// A parsed schedule expression and its zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    zone: Tz,
}

impl CronSchedule {
    /// Five fields (`minute hour day month weekday`) or six with seconds
    /// first; `zone` is an IANA name such as `Europe/Paris` or `UTC`.
    pub fn parse(expression: &str, zone: &str) -> Result<CronSchedule, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| format!("`{expression}` is not a cron expression: {e}"))?;
        let zone = Tz::from_str(zone).map_err(|_| format!("`{zone}` is not an IANA time zone"))?;
        Ok(CronSchedule { cron, zone })
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
        let local = after.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, false)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("no next run: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn next_run_is_read_in_the_zone() {
        let s = CronSchedule::parse("0 9 * * *", "Europe/Paris").unwrap();
        let after = Utc.with_ymd_and_hms(2026, 1, 15, 12, 0, 0).unwrap();
        // 09:00 in Paris in winter is 08:00 UTC, the next day.
        assert_eq!(
            s.next_after(after).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 16, 8, 0, 0).unwrap()
        );
    }

    #[test]
    fn six_fields_mean_seconds_and_bad_input_is_explained() {
        let s = CronSchedule::parse("*/10 * * * * *", "UTC").unwrap();
        let after = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 1).unwrap();
        assert_eq!(
            s.next_after(after).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 10).unwrap()
        );
        assert!(CronSchedule::parse("every day", "UTC")
            .unwrap_err()
            .contains("not a cron expression"));
        assert!(CronSchedule::parse("* * * * *", "Mars/Olympus")
            .unwrap_err()
            .contains("time zone"));
    }
}
