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

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::wakeup::{channel_name, Wakeups, CANCEL_CHANNEL, DONE_CHANNEL};

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
}

impl Listener {
    pub fn new(config: ListenerConfig, wakeups: Wakeups, status: Arc<ListenerStatus>) -> Self {
        Listener {
            config,
            wakeups,
            status,
        }
    }

    /// Runs until `shutdown`; never returns early on database errors.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let result = self.session(&shutdown, &mut failures).await;
            self.status.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => return,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("pgtasks_listener_reconnects_total").increment(1);
                    let delay = backoff(failures, self.config.reconnect_max_delay);
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "listener disconnected; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection's life: connect, LISTEN, dispatch until error or shutdown.
    async fn session(
        &self,
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

        let listen: String = self
            .wakeups
            .queues()
            .map(channel_name)
            .chain([CANCEL_CHANNEL.to_string(), DONE_CHANNEL.to_string()])
            .map(|channel| format!("LISTEN {};", quote_ident(&channel)))
            .collect();
        self.drive(client.batch_execute(&listen), &mut messages)
            .await??;

        self.status.connected.store(true, Ordering::Relaxed);
        metrics::gauge!("pgtasks_listener_connected").set(1.0);
        if *failures > 0 {
            warn!(after_failures = *failures, "listener reconnected");
        } else {
            info!(queues = self.wakeups.queues().count(), "listening");
        }
        *failures = 0;
        // Anything sent while we were not listening is lost: look everywhere.
        self.wakeups.wake_all();

        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                message = messages.next() => {
                    if let Err(e) = self.dispatch(message) { break Err(e) }
                }
                _ = check.tick() => {
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
        metrics::gauge!("pgtasks_listener_connected").set(0.0);
        result
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
                    wakeup.notification(n.payload());
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
