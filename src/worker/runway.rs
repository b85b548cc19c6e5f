//! Jobs claimed ahead of free slots, each taken by the next slot to free up.
//!
//! A worker whose slots are all busy waits for the next claim's round trip
//! once they free up: with quick handlers the slots sit idle for most of it,
//! and small claims (ten queues at concurrency 10) each pay the statement's
//! fixed cost for a few jobs. While the queue is saturated and its handlers
//! are quick, the worker claims up to `claim_ahead` (default 100) jobs more
//! than its free slots; they wait here, and an attempt that finishes takes the next one
//! itself, in claim order, without going back to the worker.
//!
//! A job waiting here is claimed (its lease runs, other instances cannot
//! take it), so it must not wait long: the worker claims ahead only while
//! handlers take under [`QUICK_RUN`] on average; a job that waited longer
//! than [`MAX_WAIT`] (or half its lease) is given back, by the worker's
//! timer or by the slot that takes it, and claiming ahead stops until a
//! handler finishes again; stopping, and a listener reconnect (cancels may
//! have been missed), give back every waiting job. Each job's cancel token is
//! registered when it is claimed, so a cancel reaches it here too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::job::Job;

/// Claim ahead only while handlers run this long or less, on average.
pub const QUICK_RUN: Duration = Duration::from_millis(5);

/// Longest wait on the runway (shorter if half the lease is): quick
/// handlers take a full runway in well under a second.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

const UNKNOWN: u64 = u64::MAX;

/// A claimed job not yet started.
#[derive(Debug)]
pub struct Ready {
    pub job: Job,
    /// The lease left when it was claimed.
    pub lease_left: Duration,
    /// Fires when the job is cancelled, or at the end of shutdown's grace.
    pub cancelled: CancellationToken,
    pub claimed_at: Instant,
    /// Handed over by its insert (schema step 9) rather than claimed: the
    /// LISTEN session it came through. A long attempt confirms it
    /// ([`crate::store::confirm_handover`]).
    pub handed: Option<i32>,
}

impl Ready {
    /// The lease left now; `None` once it waited too long (see [`MAX_WAIT`]).
    pub fn lease_left_now(&self) -> Option<Duration> {
        let waited = self.claimed_at.elapsed();
        (waited <= self.max_wait()).then(|| self.lease_left - waited)
    }

    fn max_wait(&self) -> Duration {
        MAX_WAIT.min(self.lease_left / 2)
    }

    /// When it will have waited too long.
    fn stale_at(&self) -> Instant {
        self.claimed_at + self.max_wait()
    }
}

pub struct Runway {
    /// Jobs it may hold; 0 when the queue does not claim ahead.
    capacity: usize,
    inner: Mutex<Inner>,
    /// Fired when it runs down to half its capacity: time to claim again.
    low: Notify,
    /// Moving average of handler run time, in microseconds; [`UNKNOWN`]
    /// until a handler finished, so a queue of slow jobs does not claim
    /// ahead even once.
    average_run_us: AtomicU64,
}

#[derive(Default)]
struct Inner {
    jobs: VecDeque<Ready>,
    /// Stopping: no more jobs come or go out.
    closed: bool,
}

impl Runway {
    pub fn new(capacity: usize) -> Runway {
        Runway {
            capacity,
            inner: Mutex::default(),
            low: Notify::new(),
            average_run_us: AtomicU64::new(UNKNOWN),
        }
    }

    /// How many jobs the next claim may take beyond the free slots.
    pub fn room(&self) -> usize {
        let quick = self.average_run_us.load(Ordering::Relaxed) <= QUICK_RUN.as_micros() as u64;
        if self.capacity == 0 || !quick {
            return 0;
        }
        let inner = self.lock();
        if inner.closed {
            0
        } else {
            self.capacity.saturating_sub(inner.jobs.len())
        }
    }

    /// Queues claimed jobs, in claim order. Returns those it refused
    /// because it is closed.
    pub fn extend(&self, jobs: impl IntoIterator<Item = Ready>) -> Vec<Ready> {
        let mut inner = self.lock();
        if inner.closed {
            return jobs.into_iter().collect();
        }
        inner.jobs.extend(jobs);
        Vec::new()
    }

    /// The next job for a slot that just freed up.
    pub fn next(&self) -> Option<Ready> {
        let (next, left) = {
            let mut inner = self.lock();
            if inner.closed {
                return None;
            }
            let next = inner.jobs.pop_front()?;
            (next, inner.jobs.len())
        };
        if next.lease_left_now().is_none() {
            self.waited_too_long();
        }
        if left <= self.capacity / 2 {
            self.low.notify_one();
        }
        Some(next)
    }

    /// When the oldest job will have waited too long.
    pub fn stale_at(&self) -> Option<Instant> {
        self.lock().jobs.front().map(Ready::stale_at)
    }

    /// The jobs that waited too long, to be given back.
    pub fn take_stale(&self) -> Vec<Ready> {
        let now = Instant::now();
        let stale: Vec<Ready> = {
            let mut inner = self.lock();
            let n = inner
                .jobs
                .iter()
                .take_while(|r| r.stale_at() <= now)
                .count();
            inner.jobs.drain(..n).collect()
        };
        if !stale.is_empty() {
            self.waited_too_long();
        }
        stale
    }

    /// Every waiting job, to be given back; the runway stays open.
    pub fn take_all(&self) -> Vec<Ready> {
        self.lock().jobs.drain(..).collect()
    }

    /// Handlers are not quick after all (they may be stuck, and have not
    /// finished to say so): no claiming ahead until one finishes.
    fn waited_too_long(&self) {
        self.average_run_us.store(UNKNOWN, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.lock().jobs.is_empty()
    }

    /// Resolves when the runway ran low since the last call.
    pub async fn ran_low(&self) {
        self.low.notified().await
    }

    /// Stopping: returns the jobs still waiting, to be given back.
    pub fn close(&self) -> Vec<Ready> {
        let mut inner = self.lock();
        inner.closed = true;
        inner.jobs.drain(..).collect()
    }

    /// Folds one handler's run time into the average (weight 1/8).
    pub fn record_run(&self, took: Duration) {
        // Capped far below UNKNOWN.
        let sample = took.as_micros().min(u128::from(u32::MAX)) as u64;
        let average = self.average_run_us.load(Ordering::Relaxed);
        let next = if average == UNKNOWN {
            sample
        } else {
            average - average / 8 + sample / 8
        };
        self.average_run_us.store(next, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned lock still holds
        // consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(lease_left: Duration, waited: Duration) -> Ready {
        Ready {
            job: Job {
                id: 1,
                queue: "q".into(),
                data: serde_json::Value::Null,
                attempt: 1,
                max_attempts: 3,
                priority: 0,
                created_at: chrono::Utc::now(),
                run_at: chrono::Utc::now(),
                started_at: chrono::Utc::now(),
                lease_until: chrono::Utc::now(),
            },
            lease_left,
            cancelled: CancellationToken::new(),
            claimed_at: Instant::now() - waited,
            handed: None,
        }
    }

    #[test]
    fn a_job_that_waited_too_long_is_not_run() {
        let lease = Duration::from_secs(60);
        let left = ready(lease, Duration::from_secs(4))
            .lease_left_now()
            .unwrap();
        assert!(left <= Duration::from_secs(56) && left > Duration::from_secs(55));
        assert!(ready(lease, Duration::from_secs(6))
            .lease_left_now()
            .is_none());
        // Half a short lease is less than MAX_WAIT.
        let lease = Duration::from_secs(4);
        assert!(ready(lease, Duration::from_millis(1500))
            .lease_left_now()
            .is_some());
        assert!(ready(lease, Duration::from_millis(2100))
            .lease_left_now()
            .is_none());
    }

    #[test]
    fn stale_jobs_are_taken_oldest_first_and_stop_claiming_ahead() {
        let runway = Runway::new(10);
        runway.record_run(Duration::from_micros(200));
        let lease = Duration::from_secs(60);
        runway.extend([
            ready(lease, Duration::from_secs(7)),
            ready(lease, Duration::from_secs(6)),
            ready(lease, Duration::from_secs(1)),
        ]);
        assert!(runway.stale_at().unwrap() <= Instant::now());
        assert_eq!(runway.take_stale().len(), 2);
        assert_eq!(
            runway.room(),
            0,
            "no claiming ahead until a handler finishes"
        );
        assert!(runway.stale_at().unwrap() > Instant::now());
        assert_eq!(runway.take_all().len(), 1);
        runway.record_run(Duration::from_micros(200));
        assert_eq!(runway.room(), 10);
    }

    #[test]
    fn claims_ahead_only_once_handlers_prove_quick() {
        let runway = Runway::new(10);
        assert_eq!(runway.room(), 0, "speed unknown");
        runway.record_run(Duration::from_micros(200));
        assert_eq!(runway.room(), 10);
        for _ in 0..20 {
            runway.record_run(Duration::from_millis(50));
        }
        assert_eq!(runway.room(), 0, "slow now");
        for _ in 0..40 {
            runway.record_run(Duration::from_micros(100));
        }
        assert_eq!(runway.room(), 10, "quick again");
        assert!(runway
            .extend([ready(Duration::from_secs(1), Duration::ZERO)])
            .is_empty());
        assert_eq!(runway.room(), 9);
        assert_eq!(runway.close().len(), 1);
        assert_eq!(runway.room(), 0, "closed");
        assert_eq!(
            runway
                .extend([ready(Duration::from_secs(1), Duration::ZERO)])
                .len(),
            1
        );
    }
}
