//! Per-queue workers. One [`QueueWorker`] task per queue claims due jobs and
//! runs each in its own task, bounded by the queue's concurrency; the
//! [`completer`] writes their outcomes.
//!
//! Before sleeping with nothing to claim, the worker asks its process's
//! sleep connection to arm its queue (schema step 6: inserts notify only
//! while a process holds the queue's lock, and its own look at the queue
//! after taking it sees every insert that did not), and claims once more. It then sleeps until a
//! wakeup from the listener (or the completer), the slow poll, its timer for
//! the queue's next future `run_at`, or a freed slot while the last claim
//! suggested more work is waiting. It claims up to its free slots in one
//! statement, plus up to `claim_ahead` jobs for its [`runway`] while the
//! queue is saturated and handlers are quick; while claims come back full,
//! it claims again when the runway runs low, or as soon as its slots are
//! free again (or `GATHER_MAX` after the first is).

pub mod attempt;
pub mod completer;
pub mod runway;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::handler::SharedHandler;
use crate::listener::Sleeper;
use crate::metrics::QueueMetrics;
use crate::store::{self, SleepOn};
use crate::wakeup::{QueueWakeup, RunningJobs};
use attempt::Attempt;
use completer::{Ack, AckSender, Outcome};
use runway::{Ready, Runway};

/// Counters a queue worker keeps; tests and metrics read them.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Times the worker woke up (for any reason) and looked for work.
    pub wakeups: AtomicU64,
    /// Wakeups caused by a notification (folded: a burst is one or a few).
    pub notified: AtomicU64,
    /// Claim statements run.
    pub claims: AtomicU64,
    /// Jobs claimed.
    pub claimed: AtomicU64,
    /// Jobs their inserts handed over (schema step 9), never claimed.
    pub handed: AtomicU64,
    /// Asleep and armed: an insert now notifies it.
    pub waiting: AtomicBool,
    /// Times arming could not settle at once (an insert that did not
    /// notify was in flight).
    pub unsettled: AtomicU64,
}

impl QueueStats {
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
    pub fn notified(&self) -> u64 {
        self.notified.load(Ordering::Relaxed)
    }
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::Relaxed)
    }
    pub fn claimed(&self) -> u64 {
        self.claimed.load(Ordering::Relaxed)
    }
    pub fn handed(&self) -> u64 {
        self.handed.load(Ordering::Relaxed)
    }
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }
    pub fn unsettled(&self) -> u64 {
        self.unsettled.load(Ordering::Relaxed)
    }
}

/// What one round of claims did.
struct Claim {
    /// The last claim filled every free slot: more work is probably waiting.
    full: bool,
    /// Some job was claimed.
    any: bool,
}

pub struct QueueWorker {
    pub queue: Arc<str>,
    pub metrics: Arc<QueueMetrics>,
    pub concurrency: usize,
    pub poll_interval: Duration,
    pub pool: Pool,
    pub handler: SharedHandler,
    pub wakeup: Arc<QueueWakeup>,
    pub acks: AckSender,
    pub stats: Arc<QueueStats>,
    /// Where attempts run; the runtime waits on it at shutdown.
    pub attempts: TaskTracker,
    /// Fires when shutdown's grace period is over.
    pub abort: CancellationToken,
    pub running: RunningJobs,
    /// The line to the sleep connection, whose session holds the queue's
    /// sleep locks; `None` in poll-only mode, where notifications are never
    /// needed.
    pub sleeper: Option<Sleeper>,
    /// The queue's policy lets a claim take only one job (singleton, stately).
    pub one_per_claim: bool,
    /// Jobs a claim may take beyond the free slots while the queue is
    /// saturated and handlers are quick ([`runway`]); 0 for none.
    pub claim_ahead: usize,
}

/// Why the worker woke up; logged at debug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Start,
    Notified,
    Poll,
    Timer,
    SlotFreed,
    /// The jobs claimed ahead are running out.
    RunwayLow,
    /// A job claimed ahead has waited too long.
    RunwayStale,
    /// Just armed: one more look before sleeping.
    Recheck,
    /// Time to arm again: inserts in flight may have settled, or the
    /// process this one relies on may be gone.
    Settle,
}

/// Where the worker stands with its queue's sleep locks (schema step 6),
/// which decide whether inserts notify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Not armed: inserts may not notify this worker.
    No,
    /// Inserts that did not notify were still in flight; arm again after
    /// this long.
    Unsettled(Duration),
    /// This process holds the queue's lock: every later insert notifies.
    Holding,
    /// Another process holds it, so inserts notify (every process hears
    /// it); checked again every `COVERED_RECHECK` in case that one is gone.
    Covered,
}

impl Waiting {
    fn armed(self) -> bool {
        matches!(self, Waiting::Holding | Waiting::Covered)
    }
}

/// Longest wait for more free slots before claiming (see `gather_free_slots`):
/// a bound on the pickup delay it adds while the queue is saturated.
const GATHER_MAX: Duration = Duration::from_millis(2);

/// First and longest pause before asking again whether inserts settled.
/// Short: jobs inserted while the worker was awake wait for this answer when
/// no later insert notifies (measured: a 100 ms cap gave 115 ms p90 pickup
/// at 1,000 single-row inserts/s; 5 ms gave 5 ms). Asking again is a
/// read-only statement.
const SETTLE_FIRST: Duration = Duration::from_millis(1);
const SETTLE_MAX: Duration = Duration::from_millis(5);

/// How often a worker relying on another process's hold arms again. That
/// process tells it when it lets go, but a crash tells nobody.
const COVERED_RECHECK: Duration = Duration::from_secs(1);

impl QueueWorker {
    /// Claims and starts jobs until `stop` fires. Attempts already running
    /// are left to the runtime's shutdown.
    pub async fn run(self, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let slot_freed = Arc::new(Notify::new());
        // Under singleton and stately a claim takes one job at a time.
        let ahead = if self.one_per_claim {
            0
        } else {
            self.claim_ahead
        };
        let runway = Arc::new(Runway::new(ahead));
        let mut timer: Option<Instant> = None;
        let mut refresh_timer = true;
        let mut more_waiting = false;
        let mut failures = 0u32;
        let mut waiting = Waiting::No;
        // Arm even if holding: the LISTEN session, where inserts hand jobs
        // over, is a new one (schema step 9).
        let mut readdress = false;
        let mut reason = Wake::Start;
        loop {
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            if reason == Wake::Notified {
                self.stats.notified.fetch_add(1, Ordering::Relaxed);
            }
            debug!(queue = %self.queue, ?reason, "worker awake");
            if self.wakeup.take_sleep_lost() {
                // A new sleep session: locks held before went with the old.
                waiting = Waiting::No;
            }
            if self.wakeup.take_listen_lost() {
                // Cancels sent while the listener was away were not heard.
                // Jobs handed over since the new session began heard every
                // cancel; others are given back.
                let (handed, claimed): (Vec<Ready>, Vec<Ready>) = runway
                    .take_all()
                    .into_iter()
                    .partition(|ready| ready.handed.is_some());
                self.give_back(claimed).await;
                let refused = runway.extend(self.current_handovers(handed));
                self.give_back(refused).await;
                readdress = true;
            }
            let handed = self.current_handovers(self.wakeup.take_handed());
            if !handed.is_empty() {
                self.stats
                    .handed
                    .fetch_add(handed.len() as u64, Ordering::Relaxed);
                // Busy now, as after a claim that took jobs: inserts need
                // not notify (nor hand over to) this process until it arms
                // again, so concurrent inserts are not serialised by
                // NOTIFY's commit lock while it works.
                waiting = self.wake_up(waiting);
                // In order, after any claimed ahead; those without a free
                // slot wait there.
                let refused = runway.extend(handed);
                self.give_back(refused).await;
                self.start_waiting(&slots, &slot_freed, &runway);
            }
            if reason == Wake::RunwayStale {
                self.give_back(runway.take_stale()).await;
            }
            // Arming again after an unsettled answer also claims: inserts
            // did not notify meanwhile (nothing was held), and at a steady
            // 1,000 inserts/s some insert is nearly always in flight.
            if reason != Wake::Settle || matches!(waiting, Waiting::Unsettled(_)) {
                refresh_timer |= self.wakeup.take_schedule_changed();
                // The timer is read before the claim: a row not yet due when
                // read is on the timer, and one due by then is claimed next.
                // Read after the claim, a row that fell due in between (a
                // retry a few milliseconds out) would be on neither, until
                // the poll.
                if refresh_timer && !stop.is_cancelled() {
                    match self.read_timer().await {
                        Ok(next) => {
                            timer = next;
                            refresh_timer = false;
                        }
                        Err(e) => {
                            warn!(queue = %self.queue, error = %e, "reading next run_at failed")
                        }
                    }
                }
                match self
                    .claim_and_start(&slots, &slot_freed, &runway, &stop)
                    .await
                {
                    Ok(claim) => {
                        more_waiting = claim.full;
                        failures = 0;
                        // Busy now: inserts need not notify this process.
                        if claim.any {
                            waiting = self.wake_up(waiting);
                        }
                    }
                    Err(e) if is_policy_race(&*e) => {
                        // Another instance started a job of the same key
                        // first (singleton, stately): nothing to claim now.
                        failures += 1;
                        waiting = self.wake_up(waiting);
                        debug!(queue = %self.queue, "claim lost a policy race; will retry");
                    }
                    Err(e) => {
                        failures += 1;
                        waiting = self.wake_up(waiting);
                        warn!(queue = %self.queue, error = %e, "claim failed; will retry");
                        self.metrics.claim_errors.increment(1);
                        refresh_timer = true;
                    }
                }
            }

            // Nothing left to claim: before sleeping, make sure inserts will
            // wake this worker, then look once more.
            if let Some(sleeper) = &self.sleeper {
                let idle = !more_waiting && failures == 0 && !stop.is_cancelled();
                let ask = readdress
                    || match waiting {
                        Waiting::No | Waiting::Unsettled(_) => true,
                        Waiting::Covered => reason == Wake::Settle,
                        Waiting::Holding => false,
                    };
                if idle && ask {
                    readdress = false;
                    let before = waiting;
                    waiting = self.arm(sleeper, waiting).await;
                    // Newly holding (or relying): inserts before now may not
                    // have notified, and 'scheduled' ones were skipped.
                    if waiting.armed() && waiting != before {
                        refresh_timer = true;
                        reason = Wake::Recheck;
                        continue;
                    }
                }
            }
            self.stats.waiting.store(waiting.armed(), Ordering::Relaxed);

            // After an error, retry soon (bounded backoff) rather than at the poll.
            let poll = if failures > 0 {
                Duration::from_millis(100 * u64::from(failures.min(20))).min(self.poll_interval)
            } else {
                self.poll_interval
            };
            let poll_at = Instant::now() + poll;
            let (mut deadline, mut deadline_reason) = match timer {
                Some(t) if t < poll_at => (t, Wake::Timer),
                _ => (poll_at, Wake::Poll),
            };
            let arm_again = match waiting {
                Waiting::Unsettled(after) => Some(after),
                Waiting::Covered => Some(COVERED_RECHECK),
                Waiting::No | Waiting::Holding => None,
            };
            if let Some(after) = arm_again {
                let settle_at = Instant::now() + after;
                if settle_at < deadline {
                    (deadline, deadline_reason) = (settle_at, Wake::Settle);
                }
            }
            // Set while jobs wait on the runway.
            let stale_at = runway.stale_at();
            // Jobs on the runway and a free slot: the slot's attempt ended
            // just before they came, and only this worker can start them.
            let runway_waits = stale_at.is_some();
            // Every arm is cancel-safe: Notify keeps an unconsumed permit.
            reason = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = self.wakeup.notified() => Wake::Notified,
                _ = slot_freed.notified(), if more_waiting || runway_waits => Wake::SlotFreed,
                _ = runway.ran_low(), if more_waiting => Wake::RunwayLow,
                _ = sleep_until_some(stale_at), if stale_at.is_some() => Wake::RunwayStale,
                _ = tokio::time::sleep_until(deadline) => deadline_reason,
            };
            self.stats.waiting.store(false, Ordering::Relaxed);
            if reason == Wake::SlotFreed && runway.is_empty() {
                self.gather_free_slots(&slots, &slot_freed, &stop).await;
            }
            if matches!(reason, Wake::Timer | Wake::Poll) {
                // The timer's job is being claimed now (or the poll may find a
                // new earliest): read the next one afterwards.
                refresh_timer = true;
                timer = None;
            }
        }
        self.stats.waiting.store(false, Ordering::Relaxed);
        self.wake_up(waiting);
        self.give_back(self.current_handovers(runway.close())).await;
        self.give_back(self.current_handovers(self.wakeup.close_handed()))
            .await;
    }

    /// Claims up to the free slots, again while claims come back full and
    /// every slot is free again. Returns whether the last claim was full
    /// (work probably still waiting).
    async fn claim_and_start(
        &self,
        slots: &Arc<Semaphore>,
        slot_freed: &Arc<Notify>,
        runway: &Arc<Runway>,
        stop: &CancellationToken,
    ) -> Result<Claim, Box<dyn std::error::Error + Send + Sync>> {
        let mut any = false;
        loop {
            if stop.is_cancelled() {
                return Ok(Claim { full: false, any });
            }
            self.start_waiting(slots, slot_freed, runway);
            let free = slots.available_permits();
            let room = runway.room();
            if free == 0 && room == 0 {
                return Ok(Claim { full: true, any });
            }
            let Ok(mut permits) = slots.clone().try_acquire_many_owned(free as u32) else {
                return Ok(Claim { full: true, any });
            };
            let limit = free.saturating_add(room);
            let claimed = {
                let client = self.pool.get().await?;
                store::claim_jobs(&client, &self.queue, limit, self.one_per_claim).await?
            };
            any |= !claimed.is_empty();
            self.stats.claims.fetch_add(1, Ordering::Relaxed);
            self.stats
                .claimed
                .fetch_add(claimed.len() as u64, Ordering::Relaxed);
            // Under singleton and stately a claim takes one job: go on
            // while one comes back.
            let full = claimed.len() == limit || (self.one_per_claim && !claimed.is_empty());
            let claimed_at = Instant::now();
            let mut claimed = claimed.into_iter().map(|claim| {
                // Registered now, so a cancel finds jobs on the runway too.
                let cancelled = self.abort.child_token();
                self.running
                    .insert(claim.job.id, claim.job.attempt, cancelled.clone());
                Ready {
                    job: claim.job,
                    lease_left: claim.lease_left,
                    cancelled,
                    claimed_at,
                    handed: None,
                }
            });
            while let Some(slot) = permits.split(1) {
                let Some(ready) = claimed.next() else { break };
                self.start(ready, slot, slot_freed, runway);
            }
            drop(permits);
            let refused = runway.extend(claimed);
            self.give_back(refused).await;
            // Slots freed since the claim was sent would otherwise wait for
            // the worker's next wakeup.
            self.start_waiting(slots, slot_freed, runway);
            if !full {
                return Ok(Claim { full: false, any });
            }
            // Go on at once only when every slot is free again; otherwise
            // they are gathered first (`gather_free_slots`): claiming the few
            // freed during a claim made many small claims.
            if !self.one_per_claim && slots.available_permits() < self.concurrency {
                return Ok(Claim { full: true, any });
            }
        }
    }

    /// With work waiting and slots freeing one by one, claiming at the first
    /// free slot would mean many claims of a job or two. Waits (briefly) for
    /// every slot to be free, so each claim fetches a batch: a claim costs
    /// about as much for one job as for dozens, and `GATHER_MAX` bounds the
    /// wait when handlers are slow to finish. (Waiting for half the slots:
    /// 19k jobs/s draining at concurrency 100, 3.8k at 10; for all: 22k, 6.5k.)
    async fn gather_free_slots(
        &self,
        slots: &Semaphore,
        slot_freed: &Notify,
        stop: &CancellationToken,
    ) {
        let deadline = Instant::now() + GATHER_MAX;
        while slots.available_permits() < self.concurrency {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = slot_freed.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Starts jobs claimed ahead on free slots. Attempts take them as they
    /// finish; slots freed while a claim was out have none to do so.
    fn start_waiting(
        &self,
        slots: &Arc<Semaphore>,
        slot_freed: &Arc<Notify>,
        runway: &Arc<Runway>,
    ) {
        while !runway.is_empty() {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                break;
            };
            let Some(ready) = runway.next() else { break };
            self.start(ready, slot, slot_freed, runway);
        }
    }

    /// Runs a claimed job in its own task, on `slot`.
    fn start(
        &self,
        ready: Ready,
        slot: OwnedSemaphorePermit,
        slot_freed: &Arc<Notify>,
        runway: &Arc<Runway>,
    ) {
        let attempt = Attempt {
            queue: self.queue.clone(),
            metrics: self.metrics.clone(),
            handler: self.handler.clone(),
            acks: self.acks.clone(),
            abort: self.abort.clone(),
            slot,
            slot_freed: slot_freed.clone(),
            pool: self.pool.clone(),
            running: self.running.clone(),
            runway: runway.clone(),
            wakeup: self.wakeup.clone(),
        };
        self.attempts.spawn(attempt.run(ready));
    }

    /// The jobs handed through this process's current LISTEN session; those
    /// handed through an earlier one are left to the rescuer.
    fn current_handovers(&self, handed: Vec<Ready>) -> Vec<Ready> {
        let (earlier, current): (Vec<Ready>, Vec<Ready>) = handed
            .into_iter()
            .partition(|ready| self.wakeup.handed_earlier(ready));
        for ready in earlier {
            self.running.remove(ready.job.id, ready.job.attempt);
        }
        current
    }

    /// Gives claimed (or handed) jobs that never started back to their
    /// queue, unburned (stopping, with jobs left on the runway).
    async fn give_back(&self, jobs: Vec<Ready>) {
        for ready in jobs {
            self.running.remove(ready.job.id, ready.job.attempt);
            Ack {
                queue: self.queue.clone(),
                metrics: self.metrics.clone(),
                id: ready.job.id,
                attempt: ready.job.attempt,
                outcome: Outcome::Released,
            }
            .send(&self.acks)
            .await;
        }
    }

    /// Before sleeping with nothing to claim: asks the sleep connection to
    /// arm the queue, so that inserts wake this worker. Returns where it
    /// stands.
    async fn arm(&self, sleeper: &Sleeper, waiting: Waiting) -> Waiting {
        match sleeper.sleep_on(&self.queue).await {
            Some(SleepOn::Holding) => Waiting::Holding,
            Some(SleepOn::Covered) => Waiting::Covered,
            Some(SleepOn::Unsettled) => {
                self.stats.unsettled.fetch_add(1, Ordering::Relaxed);
                Waiting::Unsettled(match waiting {
                    Waiting::Unsettled(d) => (d * 2).min(SETTLE_MAX),
                    _ => SETTLE_FIRST,
                })
            }
            None => {
                debug!(queue = %self.queue, "sleep connection down: sleeping on the poll");
                Waiting::No
            }
        }
    }

    /// Awake and busy: lets go of the queue's sleep locks, if armed.
    fn wake_up(&self, waiting: Waiting) -> Waiting {
        if let (true, Some(sleeper)) = (waiting.armed(), &self.sleeper) {
            sleeper.wake(&self.queue);
        }
        Waiting::No
    }

    /// The local instant of the queue's next future `run_at`, measured on the
    /// database's clock, plus a millisecond so the claim finds it due.
    async fn read_timer(
        &self,
    ) -> Result<Option<Instant>, Box<dyn std::error::Error + Send + Sync>> {
        let client = self.pool.get().await?;
        let next = store::next_run_in(&client, &self.queue).await?;
        Ok(next.map(|d| Instant::now() + d + Duration::from_millis(1)))
    }
}

/// Sleeps until `at`, or for ever when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A claim refused by a policy's unique index: another claim got the key.
fn is_policy_race(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|code| *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}
