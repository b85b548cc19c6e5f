//! The listener: ONE dedicated connection that LISTENs on every queue's
//! channel and turns notifications into [`Wakeups`].
//!
//! The connection is driven through `Connection::poll_message` in this task
//! (a connection spawned as a plain future drops notifications). Dispatch is a
//! non-blocking `Notify`, so a slow worker never stalls the listener. After
//! any error it reconnects with capped, jittered backoff, re-LISTENs and wakes
//! every queue, because notifications sent while it was away are gone. A
//! half-open connection is caught by TCP keepalives and a periodic
//! `SELECT 1` with a deadline. The listener never opens a transaction (one
//! left open would block the server's notification queue cleanup).
//!
//! A second instance ([`Role::Sleep`]) keeps the connection that carries
//! the locks making inserts notify a sleeping worker (schema step 6), and
//! finishing statements notify while a `?wait=` request waits (step 7): a
//! worker about to sleep, or a request about to wait, asks through a
//! [`Sleeper`], and the locks end with the session, so a process that dies
//! or loses its connection never leaves a stale "someone sleeps" behind.
//! After a reconnect the workers re-arm ([`Wakeups::rearm_all`]) and the
//! done-waiter lock is taken again if requests wait. It is not the LISTEN
//! connection: arming may wait for inserts in flight, and a session
//! receives notifications only between its statements.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use chrono::{DateTime, Utc};

use crate::job::Job;
use crate::store::{
    SleepOn, AWAIT_DONE, DONE_AWAITED, FORGET_SLEEPER, GIVE_BACK_HANDOVERS, SLEEPER_AT, SLEEP_ON,
    TAKE_HANDOVERS, WAKE_FROM,
};
use crate::wakeup::{
    channel_name, QueueWakeup, Wakeups, CANCEL_CHANNEL, CHANNEL_PREFIX, DONE_CHANNEL,
};
use crate::worker::runway::Ready;

/// A queue worker's request about its sleeping locks.
#[derive(Debug)]
pub enum SleepRequest {
    /// About to sleep: hold the queue's lock, or rely on the process that
    /// does. `None` in reply: the sleep connection is down.
    Arm {
        queue: Arc<str>,
        reply: oneshot::Sender<Option<SleepOn>>,
    },
    /// Awake (busy): let go, so inserts stop notifying this process.
    Wake { queue: Arc<str> },
    /// An API request starts waiting for a job to finish: make sure
    /// finishing statements notify (schema step 7). The reply says whether
    /// the done-waiter lock is held.
    AwaitDone { reply: oneshot::Sender<bool> },
    /// That request is answered.
    DoneAwaited,
}

/// A queue worker's (or a `?wait=` request's) line to the sleep
/// connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sleeper {
    requests: mpsc::UnboundedSender<SleepRequest>,
}

impl Sleeper {
    /// The workers' end and the sleep connection's.
    pub fn channel() -> (Sleeper, mpsc::UnboundedReceiver<SleepRequest>) {
        let (requests, incoming) = mpsc::unbounded_channel();
        (Sleeper { requests }, incoming)
    }

    /// Where the worker stands before it sleeps; `None` while the sleep
    /// connection is down (the worker then learns of new jobs by its poll,
    /// until that connection is back and wakes every queue to arm again).
    pub async fn sleep_on(&self, queue: &Arc<str>) -> Option<SleepOn> {
        let (reply, answer) = oneshot::channel();
        let request = SleepRequest::Arm {
            queue: queue.clone(),
            reply,
        };
        self.requests.send(request).ok()?;
        answer.await.ok().flatten()
    }

    /// The worker is awake; no answer needed.
    pub fn wake(&self, queue: &Arc<str>) {
        let _ = self.requests.send(SleepRequest::Wake {
            queue: queue.clone(),
        });
    }

    /// Before a request reads the job it is about to wait for: from now
    /// on, statements that finish jobs notify `pgtasks:done` (false: they
    /// may not; the request then learns by re-reading). Until the returned
    /// guard is dropped.
    pub async fn await_done(&self) -> (AwaitingDone, bool) {
        let guard = AwaitingDone {
            requests: self.requests.clone(),
        };
        let (reply, answer) = oneshot::channel();
        if self
            .requests
            .send(SleepRequest::AwaitDone { reply })
            .is_err()
        {
            return (guard, false);
        }
        let held = answer.await.unwrap_or(false);
        (guard, held)
    }
}

/// A request's wait for a finished job, counted by the sleep connection;
/// the last one dropped lets go of the done-waiter lock.
#[derive(Debug)]
pub struct AwaitingDone {
    requests: mpsc::UnboundedSender<SleepRequest>,
}

impl Drop for AwaitingDone {
    fn drop(&mut self) {
        let _ = self.requests.send(SleepRequest::DoneAwaited);
    }
}

/// What a connection of the listener's kind does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// LISTENs on every queue's channel and dispatches notifications.
    Listen,
    /// Holds the sleeping workers' locks and the `?wait=` requests'.
    Sleep,
}

/// How long arming waits for inserts in flight (they notify meanwhile)
/// before answering "unsettled".
const ARM_WAIT_MS: f64 = 10.0;

/// How long taking the done-waiter lock waits for statements finishing
/// jobs without notifying (a batch of outcomes takes milliseconds).
const AWAIT_DONE_WAIT_MS: f64 = 100.0;

/// What this session holds for sleeping workers, by queue (`Holding` or
/// `Covered`), whether it holds the done-waiter lock, and its prepared
/// statements.
struct SleepLocks {
    held: HashMap<Arc<str>, SleepOn>,
    /// The LISTEN session last recorded as where to hand each queue's jobs.
    recorded: HashMap<Arc<str>, i32>,
    done_held: bool,
    sleep_on: Statement,
    wake_from: Statement,
    await_done: Statement,
    done_awaited: Statement,
    sleeper_at: Statement,
}

/// What the rest of the process may know about the listener: `/ready` and
/// metrics read it.
#[derive(Debug, Default)]
pub struct ListenerStatus {
    connected: AtomicBool,
    reconnects: AtomicU64,
}

impl ListenerStatus {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Connections lost (and retried) since start.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub pg: tokio_postgres::Config,
    /// Period of the `SELECT 1` liveness check.
    pub check_interval: Duration,
    /// Upper bound of the reconnect backoff.
    pub reconnect_max_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("liveness check got no answer within {0:?}")]
    CheckTimedOut(Duration),
    #[error("connect timed out after {0:?}")]
    ConnectTimedOut(Duration),
}

pub struct Listener {
    config: ListenerConfig,
    wakeups: Wakeups,
    status: Arc<ListenerStatus>,
    requests: mpsc::UnboundedReceiver<SleepRequest>,
    role: Role,
    /// API requests waiting for a job to finish (the sleep connection's
    /// count; it outlives sessions).
    awaiting_done: usize,
    /// Fires when the process starts to stop; the LISTEN connection goes
    /// on (cancels still reach running attempts) but a new session no
    /// longer takes handovers.
    stopping: CancellationToken,
    /// Jobs handed to this session that no worker took (it stopped): given
    /// back by the session itself, between notifications.
    refused: Mutex<Vec<i64>>,
}

impl Listener {
    /// The LISTEN connection.
    pub fn new(
        config: ListenerConfig,
        wakeups: Wakeups,
        status: Arc<ListenerStatus>,
        stopping: CancellationToken,
    ) -> Self {
        let (_, requests) = mpsc::unbounded_channel();
        Listener {
            config,
            wakeups,
            status,
            requests,
            role: Role::Listen,
            awaiting_done: 0,
            stopping,
            refused: Mutex::default(),
        }
    }

    /// The sleep connection, serving `requests`.
    pub fn sleeping(
        config: ListenerConfig,
        wakeups: Wakeups,
        requests: mpsc::UnboundedReceiver<SleepRequest>,
    ) -> Self {
        Listener {
            config,
            wakeups,
            status: Arc::default(),
            requests,
            role: Role::Sleep,
            awaiting_done: 0,
            stopping: CancellationToken::new(),
            refused: Mutex::default(),
        }
    }

    /// Runs until `shutdown`; never returns early on database errors.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let result = self.session(&shutdown, &mut failures).await;
            self.status.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => return,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    if self.role == Role::Listen {
                        metrics::counter!("pgtasks_listener_reconnects_total").increment(1);
                    }
                    let delay = backoff(failures, self.config.reconnect_max_delay);
                    warn!(role = ?self.role, %error, retry_in_ms = delay.as_millis() as u64, "listener disconnected; reconnecting");
                    let mut pause = pin!(tokio::time::sleep(delay));
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = &mut pause => break,
                            Some(request) = self.requests.recv() => self.answer_offline(request),
                        }
                    }
                }
            }
        }
    }

    /// One connection's life: connect, LISTEN, dispatch and serve sleep
    /// requests until error or shutdown.
    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        failures: &mut u32,
    ) -> Result<(), SessionError> {
        let timeout = self
            .config
            .pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let connect = self.config.pg.connect(NoTls);
        let (client, mut connection) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(timeout, connect) => {
                r.map_err(|_| SessionError::ConnectTimedOut(timeout))??
            }
        };
        let mut messages = pin!(futures::stream::poll_fn(move |cx| {
            connection.poll_message(cx)
        }));

        if self.role == Role::Listen {
            let listen: String = self
                .wakeups
                .queues()
                .map(channel_name)
                .chain([CANCEL_CHANNEL.to_string(), DONE_CHANNEL.to_string()])
                .map(|channel| format!("LISTEN {};", quote_ident(&channel)))
                .collect();
            self.drive(client.batch_execute(&listen), &mut messages)
                .await??;
            // The address is known before it is recorded anywhere: a job
            // handed to it may arrive before the statement's answer.
            if !self.stopping.is_cancelled() {
                let pid = self
                    .drive(
                        client.query_one("SELECT pg_backend_pid()", &[]),
                        &mut messages,
                    )
                    .await??;
                self.wakeups.set_address(Some(pid.get(0)));
                let queues: Vec<&str> = self.wakeups.queues().collect();
                self.drive(client.execute(TAKE_HANDOVERS, &[&queues]), &mut messages)
                    .await??;
            }
        }
        // Only the sleep connection serves requests (the LISTEN one's
        // channel has no sender).
        let mut locks = match self.role {
            Role::Listen => None,
            Role::Sleep => {
                // Prepared together: one round trip.
                let prepared = futures::future::try_join5(
                    client.prepare(SLEEP_ON),
                    client.prepare(WAKE_FROM),
                    client.prepare(AWAIT_DONE),
                    client.prepare(DONE_AWAITED),
                    client.prepare(SLEEPER_AT),
                );
                let (sleep_on, wake_from, await_done, done_awaited, sleeper_at) =
                    self.drive(prepared, &mut messages).await??;
                Some(SleepLocks {
                    held: HashMap::new(),
                    recorded: HashMap::new(),
                    done_held: false,
                    sleep_on,
                    wake_from,
                    await_done,
                    done_awaited,
                    sleeper_at,
                })
            }
        };
        // Requests waiting since before this session need the lock again.
        if let Some(locks) = locks.as_mut() {
            self.hold_done_lock_if_awaited(&client, locks, &mut messages)
                .await?;
        }

        self.status.connected.store(true, Ordering::Relaxed);
        if self.role == Role::Listen {
            metrics::gauge!("pgtasks_listener_connected").set(1.0);
        }
        if *failures > 0 {
            warn!(role = ?self.role, after_failures = *failures, "listener reconnected");
        } else if self.role == Role::Listen {
            info!(queues = self.wakeups.queues().count(), "listening");
        }
        *failures = 0;
        match self.role {
            // Anything sent while we were not listening is lost: look everywhere.
            Role::Listen => self.wakeups.wake_all(),
            // The locks of an earlier session are gone: arm again.
            Role::Sleep => self.wakeups.rearm_all(),
        }

        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(locks) = locks.as_mut() {
                        self.let_go_of_all(&client, locks, &mut messages).await;
                    }
                    break Ok(());
                }
                message = messages.next() => {
                    if let Err(e) = self.dispatch(message) { break Err(e) }
                    if let Err(e) = self.give_back_refused(&client, &mut messages).await {
                        break Err(e);
                    }
                }
                Some(request) = self.requests.recv(), if locks.is_some() => {
                    let Some(locks) = locks.as_mut() else { continue };
                    if let Err(e) = self.serve(request, &client, locks, &mut messages).await {
                        break Err(e);
                    }
                }
                _ = check.tick() => {
                    // Requests may wait without the done-waiter lock (taking
                    // it timed out or was refused): try again.
                    if let Some(locks) = locks.as_mut() {
                        if let Err(e) = self
                            .hold_done_lock_if_awaited(&client, locks, &mut messages)
                            .await
                        {
                            break Err(e);
                        }
                    }
                    let limit = self.config.check_interval.min(Duration::from_secs(10));
                    let ping = tokio::time::timeout(limit, client.simple_query("SELECT 1"));
                    match self.drive(ping, &mut messages).await {
                        Ok(Ok(Ok(_))) => debug!("listener connection checked"),
                        Ok(Ok(Err(e))) => break Err(e.into()),
                        Ok(Err(_)) => break Err(SessionError::CheckTimedOut(limit)),
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        if self.role == Role::Listen {
            metrics::gauge!("pgtasks_listener_connected").set(0.0);
            self.wakeups.set_address(None);
        }
        result
    }

    /// Answers a worker's sleep request, or a `?wait=` request's, on this
    /// session. A statement the database refuses is logged and answered
    /// "not connected" / "not held" (the worker then relies on its poll, the
    /// request on its re-reads); a lost connection ends the session.
    async fn serve(
        &mut self,
        request: SleepRequest,
        client: &Client,
        locks: &mut SleepLocks,
        messages: &mut (impl Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin),
    ) -> Result<(), SessionError> {
        match request {
            SleepRequest::Arm { queue, reply } => {
                let held = locks.held.get(&queue).copied();
                let name: &str = &queue;
                let address = self.wakeups.address();
                if held == Some(SleepOn::Holding) {
                    // Still held; the LISTEN session may be a new one.
                    if let Some(address) = address.filter(|a| locks.recorded.get(&queue) != Some(a))
                    {
                        let params: [&(dyn ToSql + Sync); 2] = [&name, &address];
                        let recorded = client.execute(&locks.sleeper_at, &params);
                        if self
                            .run_logged(recorded, "pgtasks.sleeper_at", Some(name), messages)
                            .await?
                            .is_some()
                        {
                            locks.recorded.insert(queue.clone(), address);
                        }
                    }
                    let _ = reply.send(Some(SleepOn::Holding));
                    return Ok(());
                }
                let covered = held == Some(SleepOn::Covered);
                let params: [&(dyn ToSql + Sync); 4] = [&name, &covered, &ARM_WAIT_MS, &address];
                let asked = client.query_one(&locks.sleep_on, &params);
                let Some(row) = self
                    .run_logged(asked, "pgtasks.sleep_on", Some(name), messages)
                    .await?
                else {
                    let _ = reply.send(None);
                    return Ok(());
                };
                let answer = SleepOn::from_sql(row.get(0));
                if let Some(address) = address {
                    locks.recorded.insert(queue.clone(), address);
                }
                if answer == SleepOn::Unsettled {
                    locks.held.remove(&queue);
                } else {
                    locks.held.insert(queue, answer);
                }
                let _ = reply.send(Some(answer));
            }
            SleepRequest::AwaitDone { reply } => {
                self.awaiting_done += 1;
                self.hold_done_lock_if_awaited(client, locks, messages)
                    .await?;
                let _ = reply.send(locks.done_held);
            }
            SleepRequest::DoneAwaited => {
                self.awaiting_done = self.awaiting_done.saturating_sub(1);
                if self.awaiting_done == 0 && locks.done_held {
                    let released = client.execute(&locks.done_awaited, &[]);
                    // Refused: still held, as far as we know; the next
                    // request does not take it twice, and its end tries again.
                    if self
                        .run_logged(released, "pgtasks.done_awaited", None, messages)
                        .await?
                        .is_some()
                    {
                        locks.done_held = false;
                    }
                }
            }
            SleepRequest::Wake { queue } => {
                if let Some(held) = locks.held.remove(&queue) {
                    let name: &str = &queue;
                    let holding = held == SleepOn::Holding;
                    let params: [&(dyn ToSql + Sync); 2] = [&name, &holding];
                    let woken = client.execute(&locks.wake_from, &params);
                    self.run_logged(woken, "pgtasks.wake_from", Some(name), messages)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// While requests wait, holds the done-waiter lock if this session does
    /// not yet (it stays unheld when it could not be had in time, or the
    /// database refused: logged).
    async fn hold_done_lock_if_awaited(
        &self,
        client: &Client,
        locks: &mut SleepLocks,
        messages: &mut (impl Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin),
    ) -> Result<(), SessionError> {
        if self.awaiting_done == 0 || locks.done_held {
            return Ok(());
        }
        let asked = client.query_one(&locks.await_done, &[&AWAIT_DONE_WAIT_MS]);
        if let Some(row) = self
            .run_logged(asked, "pgtasks.await_done", None, messages)
            .await?
        {
            locks.done_held = row.get(0);
        }
        Ok(())
    }

    /// Runs one of the sleep connection's statements. `None` when the
    /// database refused it (logged: the caller carries on without it); a
    /// lost connection ends the session.
    async fn run_logged<T>(
        &self,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
        function: &str,
        queue: Option<&str>,
        messages: &mut (impl Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin),
    ) -> Result<Option<T>, SessionError> {
        match self.drive(statement, messages).await? {
            Ok(output) => Ok(Some(output)),
            Err(e) if e.as_db_error().is_some() => {
                warn!(queue, error = %e, "{function} failed");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A request while no session is up: nothing can be held. A worker
    /// sleeps on its poll until the reconnect wakes it; a `?wait=` request
    /// re-reads, and is counted so the next session takes the lock for it.
    fn answer_offline(&mut self, request: SleepRequest) {
        match request {
            SleepRequest::Arm { reply, .. } => {
                let _ = reply.send(None);
            }
            SleepRequest::AwaitDone { reply } => {
                self.awaiting_done += 1;
                let _ = reply.send(false);
            }
            SleepRequest::DoneAwaited => {
                self.awaiting_done = self.awaiting_done.saturating_sub(1);
            }
            SleepRequest::Wake { .. } => {}
        }
    }

    /// At shutdown, lets go of every queue, so that processes relying on
    /// this one hear it now rather than at their next check, and stops
    /// being where inserts hand jobs (they notify instead). Best effort:
    /// the locks end with the session anyway, and jobs handed over later
    /// are given back once this process's LISTEN session ends.
    async fn let_go_of_all(
        &mut self,
        client: &Client,
        locks: &mut SleepLocks,
        messages: &mut (impl Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin),
    ) {
        let queues: Vec<Arc<str>> = locks.held.keys().cloned().collect();
        let address = self.wakeups.address();
        let all = async {
            if let Some(address) = address {
                let params: [&(dyn ToSql + Sync); 1] = [&address];
                let forgotten = client.execute(FORGET_SLEEPER, &params);
                self.run_logged(forgotten, "pgtasks.forget_sleeper", None, messages)
                    .await?;
            }
            for queue in queues {
                self.serve(SleepRequest::Wake { queue }, client, locks, messages)
                    .await?;
            }
            Ok::<_, SessionError>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), all).await {
            debug!(error = %e, "letting go of sleep locks at shutdown failed");
        }
    }

    /// Runs a client request while pumping the connection, which is what
    /// makes the request progress and delivers notifications meanwhile.
    async fn drive<F: Future>(
        &self,
        request: F,
        messages: &mut (impl Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin),
    ) -> Result<F::Output, SessionError> {
        let mut request = pin!(request);
        loop {
            tokio::select! {
                output = &mut request => return Ok(output),
                message = messages.next() => self.dispatch(message)?,
            }
        }
    }

    fn dispatch(
        &self,
        message: Option<Result<AsyncMessage, tokio_postgres::Error>>,
    ) -> Result<(), SessionError> {
        match message {
            Some(Ok(AsyncMessage::Notification(n))) if n.channel() == DONE_CHANNEL => {
                self.wakeups.finished().finished(n.payload());
                Ok(())
            }
            Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CANCEL_CHANNEL => {
                if let Ok(id) = n.payload().parse::<i64>() {
                    if self.wakeups.running().cancel(id) {
                        info!(job_id = id, "running job cancelled");
                    }
                }
                Ok(())
            }
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Some(wakeup) = self.wakeups.for_channel(n.channel()) {
                    if n.payload().starts_with('{') {
                        self.take_handover(wakeup, n.channel(), n.payload());
                    } else {
                        wakeup.notification(n.payload());
                    }
                }
                Ok(())
            }
            Some(Ok(AsyncMessage::Notice(notice))) => {
                debug!(message = notice.message(), "notice on listener connection");
                Ok(())
            }
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.into()),
            None => Err(SessionError::Closed),
        }
    }
}

impl Listener {
    /// A job its insert handed over (schema step 9): this process's if
    /// addressed to its session. Its cancel token is registered before any
    /// later notification (a cancel) is read.
    fn take_handover(&self, wakeup: &QueueWakeup, channel: &str, payload: &str) {
        let handover: Handover = match serde_json::from_str(payload) {
            Ok(handover) => handover,
            Err(error) => {
                warn!(channel, %error, "unreadable handover notification; looking for work instead");
                wakeup.wake();
                return;
            }
        };
        if Some(handover.to) != self.wakeups.address() {
            return;
        }
        let queue = channel.strip_prefix(CHANNEL_PREFIX).unwrap_or(channel);
        let ready = handover.into_ready(queue);
        let (id, attempt) = (ready.job.id, ready.job.attempt);
        self.wakeups
            .running()
            .insert(id, attempt, ready.cancelled.clone());
        if !wakeup.hand_over(ready) {
            // The worker has stopped.
            self.wakeups.running().remove(id, attempt);
            if let Ok(mut refused) = self.refused.lock() {
                refused.push(id);
            }
        }
    }

    /// Gives back the jobs handed to this session that no worker took
    /// (logged if refused: the rescuer does it once the session ends).
    async fn give_back_refused(
        &self,
        client: &Client,
        messages: &mut (impl Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin),
    ) -> Result<(), SessionError> {
        let ids = match self.refused.lock() {
            Ok(mut refused) if !refused.is_empty() => std::mem::take(&mut *refused),
            _ => return Ok(()),
        };
        let params: [&(dyn ToSql + Sync); 1] = [&ids];
        let given = client.execute(GIVE_BACK_HANDOVERS, &params);
        if let Some(n) = self
            .run_logged(given, "giving back handovers", None, messages)
            .await?
        {
            debug!(jobs = n, "gave back jobs handed over while stopping");
        }
        Ok(())
    }
}

/// What an insert's handover notification carries: the job as a claim
/// returns it, and the LISTEN session it is for.
#[derive(Debug, serde::Deserialize)]
struct Handover {
    to: i32,
    id: i64,
    data: serde_json::Value,
    attempt: i32,
    max_attempts: i32,
    priority: i32,
    created_at: DateTime<Utc>,
    run_at: DateTime<Utc>,
    started_at: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    /// Seconds, when the insert ran.
    lease_left: f64,
}

impl Handover {
    fn into_ready(self, queue: &str) -> Ready {
        Ready {
            job: Job {
                id: self.id,
                queue: queue.to_string(),
                data: self.data,
                attempt: self.attempt,
                max_attempts: self.max_attempts,
                priority: self.priority,
                created_at: self.created_at,
                run_at: self.run_at,
                started_at: self.started_at,
                lease_until: self.lease_until,
            },
            lease_left: Duration::try_from_secs_f64(self.lease_left.max(0.0))
                .unwrap_or(Duration::MAX),
            cancelled: CancellationToken::new(),
            claimed_at: tokio::time::Instant::now(),
            handed: Some(self.to),
        }
    }
}

/// Exponential from 100 ms, capped, with full jitter over its upper half so a
/// fleet of instances does not reconnect in lockstep.
fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(16).saturating_sub(1));
    let capped = base.min(max);
    capped / 2 + capped.mul_f64(rand::random::<f64>() / 2.0)
}

/// Double-quotes an identifier (channel names contain dots and dashes).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(5);
        assert!(backoff(1, max) <= Duration::from_millis(100));
        assert!(backoff(1, max) >= Duration::from_millis(50));
        assert!(backoff(4, max) >= Duration::from_millis(400));
        for failures in 10..40 {
            let d = backoff(failures, max);
            assert!(d <= max && d >= max / 2, "{d:?}");
        }
    }

    #[test]
    fn channel_names_are_quoted() {
        assert_eq!(quote_ident("pgtasks.a-b"), "\"pgtasks.a-b\"");
        assert_eq!(quote_ident("x\"y"), "\"x\"\"y\"");
    }
}
