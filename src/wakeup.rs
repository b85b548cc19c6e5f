//! Per-queue wakeups: how the listener (and the completer) tell a queue's
//! worker to look for work without ever blocking on it.
//!
//! Each queue has one [`tokio::sync::Notify`]. `notify_one` stores a single
//! permit when the worker is busy, so a burst of notifications folds into one
//! wakeup and a wakeup that lands mid-claim is kept for the next loop, never
//! lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::worker::runway::Ready;

/// The wakeup line of one queue.
#[derive(Debug, Default)]
pub struct QueueWakeup {
    notify: Notify,
    /// Set when jobs that are due later may have arrived: the worker then
    /// re-reads its queue's next `run_at` before it sleeps.
    schedule_changed: AtomicBool,
    /// Notifications received for this queue (before folding), jobs handed
    /// to this process included.
    notifications: AtomicU64,
    /// Set when the sleep connection (re)connected: any sleep locks the
    /// worker held went with the old session.
    sleep_lost: AtomicBool,
    /// Set when the listener (re)connected: cancels sent meanwhile were
    /// not heard, so jobs claimed ahead are given back rather than started.
    listen_lost: AtomicBool,
    /// Jobs their inserts handed to this process (schema step 9), until the
    /// worker starts them; closed when the worker stops.
    handed: Mutex<Handed>,
    /// The process's LISTEN session (see [`Wakeups::address`]).
    address: Address,
}

/// This process's LISTEN session while it is up: its backend pid, the
/// address inserts hand jobs to (schema step 9). Shared by the listener,
/// which sets it, and every queue's wakeup.
#[derive(Debug, Default, Clone)]
struct Address(Arc<AtomicI32>);

impl Address {
    fn get(&self) -> Option<i32> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&a| a != 0)
    }

    fn set(&self, address: Option<i32>) {
        self.0.store(address.unwrap_or(0), Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Handed {
    jobs: Vec<Ready>,
    closed: bool,
}

impl QueueWakeup {
    /// Due work may be waiting.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// The listener received a NOTIFY for this queue.
    pub fn notification(&self, payload: &str) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        if payload == SCHEDULED_PAYLOAD {
            self.schedule_changed();
        } else {
            self.wake();
        }
    }

    /// Work that becomes due later may have been added.
    pub fn schedule_changed(&self) {
        self.schedule_changed.store(true, Ordering::Relaxed);
        self.wake();
    }

    /// Waits for the next wakeup. Cancel-safe: a wakeup not consumed stays
    /// stored in the `Notify`.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// A job handed over by its insert: for the worker to start. False (the
    /// job dropped) once the worker has stopped.
    pub fn hand_over(&self, ready: Ready) -> bool {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        let Ok(mut handed) = self.handed.lock() else {
            return false;
        };
        if handed.closed {
            return false;
        }
        handed.jobs.push(ready);
        drop(handed);
        self.wake();
        true
    }

    /// This process's current LISTEN session, where inserts hand jobs.
    pub fn address(&self) -> Option<i32> {
        self.address.get()
    }

    /// Whether the job was handed through an earlier LISTEN session than
    /// the current one: the rescuer's then, which gives it back once that
    /// session has ended (by then its attempt number may be a new claim's,
    /// which a give-back or an outcome from here could hit).
    pub fn handed_earlier(&self, ready: &Ready) -> bool {
        ready.handed.is_some() && ready.handed != self.address()
    }

    /// The jobs handed over since the last call.
    pub fn take_handed(&self) -> Vec<Ready> {
        self.handed
            .lock()
            .map(|mut h| std::mem::take(&mut h.jobs))
            .unwrap_or_default()
    }

    /// Whether the worker has stopped taking handovers.
    pub fn handovers_closed(&self) -> bool {
        self.handed.lock().map(|h| h.closed).unwrap_or(true)
    }

    /// The worker stops: takes what was handed over, and refuses the rest.
    pub fn close_handed(&self) -> Vec<Ready> {
        self.handed
            .lock()
            .map(|mut h| {
                h.closed = true;
                std::mem::take(&mut h.jobs)
            })
            .unwrap_or_default()
    }

    /// Reads and clears the flag that the sleep locks were lost.
    pub fn take_sleep_lost(&self) -> bool {
        self.sleep_lost.swap(false, Ordering::Relaxed)
    }

    /// Reads and clears the flag that notifications may have been missed.
    pub fn take_listen_lost(&self) -> bool {
        self.listen_lost.swap(false, Ordering::Relaxed)
    }

    /// Reads and clears the schedule flag.
    pub fn take_schedule_changed(&self) -> bool {
        self.schedule_changed.swap(false, Ordering::Relaxed)
    }

    /// NOTIFYs the listener delivered for this queue so far.
    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }
}

/// The attempts running in this process, so a cancel from any instance
/// (`pgtasks:cancel` notifications) reaches the handler's token.
#[derive(Debug, Default, Clone)]
pub struct RunningJobs {
    /// By job id: the attempt and its token. A job given back and claimed
    /// again while its old attempt still waits to be dropped has two; the
    /// newer wins, and only its own end removes it.
    tokens: Arc<Mutex<HashMap<i64, (i32, CancellationToken)>>>,
}

impl RunningJobs {
    pub fn insert(&self, id: i64, attempt: i32, token: CancellationToken) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(id, (attempt, token));
        }
    }

    pub fn remove(&self, id: i64, attempt: i32) {
        if let Ok(mut tokens) = self.tokens.lock() {
            if tokens.get(&id).is_some_and(|(a, _)| *a == attempt) {
                tokens.remove(&id);
            }
        }
    }

    /// Fires the job's token if it runs here; true when it did.
    pub fn cancel(&self, id: i64) -> bool {
        let token = self
            .tokens
            .lock()
            .ok()
            .and_then(|t| t.get(&id).map(|(_, token)| token.clone()));
        token.map(|t| t.cancel()).is_some()
    }
}

/// API requests waiting for jobs to finish (`GET /api/jobs/{id}?wait=`),
/// woken by `pgtasks:done` notifications.
#[derive(Debug, Default, Clone)]
pub struct FinishedJobs {
    waiters: Arc<Mutex<HashMap<i64, Waiters>>>,
}

/// A job's wakeup and how many requests wait on it.
type Waiters = (Arc<Notify>, usize);

/// One request's interest in a job; dropping it withdraws the interest.
pub struct FinishWatch {
    id: i64,
    notify: Arc<Notify>,
    jobs: FinishedJobs,
}

impl FinishWatch {
    /// Waits for the job's `done` notification. Register before reading the
    /// job's state so a finish in between is not missed: `Notify` keeps it.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for FinishWatch {
    fn drop(&mut self) {
        if let Ok(mut waiters) = self.jobs.waiters.lock() {
            if let Some((_, count)) = waiters.get_mut(&self.id) {
                *count -= 1;
                if *count == 0 {
                    waiters.remove(&self.id);
                }
            }
        }
    }
}

impl FinishedJobs {
    pub fn watch(&self, id: i64) -> FinishWatch {
        let notify = match self.waiters.lock() {
            Ok(mut waiters) => {
                let entry = waiters
                    .entry(id)
                    .or_insert_with(|| (Arc::new(Notify::new()), 0));
                entry.1 += 1;
                entry.0.clone()
            }
            Err(_) => Arc::new(Notify::new()),
        };
        FinishWatch {
            id,
            notify,
            jobs: self.clone(),
        }
    }

    /// A `pgtasks:done` payload: comma-separated job ids.
    pub fn finished(&self, payload: &str) {
        let Ok(waiters) = self.waiters.lock() else {
            return;
        };
        if waiters.is_empty() {
            return;
        }
        for id in payload
            .split(',')
            .filter_map(|p| p.trim().parse::<i64>().ok())
        {
            if let Some((notify, _)) = waiters.get(&id) {
                notify.notify_waiters();
                notify.notify_one();
            }
        }
    }
}

/// Every queue's wakeup line, keyed by queue name, and the running jobs.
/// Built once at startup.
#[derive(Debug, Default, Clone)]
pub struct Wakeups {
    queues: Arc<HashMap<String, Arc<QueueWakeup>>>,
    running: RunningJobs,
    finished: FinishedJobs,
    address: Address,
}

impl Wakeups {
    pub fn new<'a>(queues: impl IntoIterator<Item = &'a str>) -> Self {
        let address = Address::default();
        let wakeup = |q: &str| {
            let wakeup = QueueWakeup {
                address: address.clone(),
                ..QueueWakeup::default()
            };
            (q.to_string(), Arc::new(wakeup))
        };
        Wakeups {
            queues: Arc::new(queues.into_iter().map(wakeup).collect()),
            running: RunningJobs::default(),
            finished: FinishedJobs::default(),
            address,
        }
    }

    /// Where inserts may hand this process jobs: its LISTEN session, if up.
    pub fn address(&self) -> Option<i32> {
        self.address.get()
    }

    pub fn set_address(&self, address: Option<i32>) {
        self.address.set(address);
    }

    pub fn finished(&self) -> &FinishedJobs {
        &self.finished
    }

    pub fn running(&self) -> &RunningJobs {
        &self.running
    }

    pub fn get(&self, queue: &str) -> Option<&Arc<QueueWakeup>> {
        self.queues.get(queue)
    }

    /// The queue for a NOTIFY channel name (`pgtasks.<queue>`).
    pub fn for_channel(&self, channel: &str) -> Option<&Arc<QueueWakeup>> {
        channel
            .strip_prefix(CHANNEL_PREFIX)
            .and_then(|q| self.get(q))
    }

    pub fn queues(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// After the listener (re)connects: notifications sent while it was away
    /// are gone, so every queue looks again, timers included.
    pub fn wake_all(&self) {
        for wakeup in self.queues.values() {
            wakeup.listen_lost.store(true, Ordering::Relaxed);
            wakeup.schedule_changed();
        }
    }

    /// After the sleep connection (re)connects: the locks of its earlier
    /// session are gone, so every queue's worker arms again.
    pub fn rearm_all(&self) {
        for wakeup in self.queues.values() {
            wakeup.sleep_lost.store(true, Ordering::Relaxed);
            wakeup.wake();
        }
    }
}

/// The payload the triggers send for rows that are due later.
pub const SCHEDULED_PAYLOAD: &str = "scheduled";

/// Carries comma-separated ids of jobs that finished.
pub const DONE_CHANNEL: &str = "pgtasks:done";

/// Carries the id of a running job that was cancelled.
pub const CANCEL_CHANNEL: &str = "pgtasks:cancel";

/// Channel names are `pgtasks.<queue>`, as the schema's triggers send them.
pub const CHANNEL_PREFIX: &str = "pgtasks.";

pub fn channel_name(queue: &str) -> String {
    format!("{CHANNEL_PREFIX}{queue}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_an_older_attempt_leaves_a_newer_ones_token() {
        let running = RunningJobs::default();
        let (old, new) = (CancellationToken::new(), CancellationToken::new());
        running.insert(7, 1, old.clone());
        running.insert(7, 2, new.clone());
        running.remove(7, 1);
        assert!(running.cancel(7));
        assert!(new.is_cancelled() && !old.is_cancelled());
        running.remove(7, 2);
        assert!(!running.cancel(7));
    }
}
