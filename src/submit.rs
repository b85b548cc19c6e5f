//! The coalescing submitter: many concurrent submits become few multi-row
//! INSERTs.
//!
//! Each HTTP submit hands its job to a channel and waits for its id. The
//! submitter takes everything waiting (up to a cap) and inserts it in one
//! statement (one transaction, at most one NOTIFY per queue). At most `max_in_flight`
//! inserts run at once; while they run, new requests queue up and form the
//! next batch. An idle system therefore inserts each job at once, and a busy
//! one inserts hundreds per round trip. A caller gets its id only after the
//! row is committed. When a batch fails for a reason that may lie in one row,
//! its rows are retried one by one so a bad request cannot fail the others.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::task::TaskTracker;

use crate::store::{self, NewJob, Sent};

/// Jobs inserted by one statement at most.
pub const MAX_BATCH: usize = 500;

/// Why a submit failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("the service is shutting down")]
    Closed,
}

impl From<deadpool_postgres::PoolError> for SubmitError {
    /// Failing to get a connection always means the database is unavailable.
    fn from(e: deadpool_postgres::PoolError) -> Self {
        SubmitError::Unavailable(e.to_string())
    }
}

impl SubmitError {
    /// A unique index refused the row (a queue policy, a singleton key).
    fn is_unique_violation(&self) -> bool {
        matches!(self, SubmitError::Db(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
    }

    /// Whether the database could not be reached (as opposed to refusing the row).
    pub fn is_unavailable(&self) -> bool {
        match self {
            SubmitError::Unavailable(_) | SubmitError::Closed => true,
            SubmitError::Db(e) => e.as_db_error().is_none(),
        }
    }
}

struct Request {
    job: NewJob,
    reply: oneshot::Sender<Result<Sent, SubmitError>>,
}

/// A handle to submit jobs through the coalescer. Cheap to clone.
#[derive(Clone)]
pub struct Submitter {
    requests: mpsc::Sender<Request>,
}

impl Submitter {
    /// Starts the coalescing loop on `tasks`. It runs until every handle is
    /// dropped and all queued requests are answered.
    pub fn start(pool: Pool, max_in_flight: usize, tasks: &TaskTracker) -> Submitter {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        let inserts = tasks.clone();
        tasks.spawn(run(pool, rx, max_in_flight.max(1), inserts));
        Submitter { requests: tx }
    }

    /// Inserts one job and returns its id once committed.
    pub async fn submit(&self, job: NewJob) -> Result<Sent, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { job, reply })
            .await
            .map_err(|_| SubmitError::Closed)?;
        answer.await.map_err(|_| SubmitError::Closed)?
    }
}

async fn run(
    pool: Pool,
    mut requests: mpsc::Receiver<Request>,
    max_in_flight: usize,
    inserts: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(max_in_flight));
    loop {
        // Wait for a free insert slot first, so requests pile up meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(16);
        if requests.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // A lone submit to an idle service may be handed to a sleeping
        // worker (schema step 9); under load, handovers would slow the
        // inserts every submit waits for.
        let idle = batch.len() == 1 && slots.available_permits() + 1 == max_in_flight;
        let pool = pool.clone();
        inserts.spawn(async move {
            insert_batch(&pool, batch, idle).await;
            drop(slot);
        });
    }
}

async fn insert_batch(pool: &Pool, batch: Vec<Request>, hand_over: bool) {
    metrics::histogram!("pgtasks_submit_batch_size").record(batch.len() as f64);
    // Keyed jobs may be duplicates: `pgtasks.send` decides each one.
    let (keyed, plain): (Vec<Request>, Vec<Request>) = batch
        .into_iter()
        .partition(|r| r.job.singleton_key.is_some());
    for request in keyed {
        let result = send(pool, &request.job).await;
        let _ = request.reply.send(result);
    }
    if plain.is_empty() {
        return;
    }
    let (jobs, replies): (Vec<NewJob>, Vec<_>) =
        plain.into_iter().map(|r| (r.job, r.reply)).unzip();
    match insert(pool, &jobs, hand_over).await {
        Ok(ids) => {
            for (reply, id) in replies.into_iter().zip(ids) {
                let _ = reply.send(Ok(Sent {
                    id,
                    duplicate: false,
                }));
            }
        }
        Err(e) if jobs.len() == 1 && e.is_unique_violation() => {
            // A queue policy holds the place: answer with that job.
            let result = send(pool, &jobs[0]).await;
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(result);
            }
        }
        Err(e) if jobs.len() > 1 && !e.is_unavailable() => {
            // Something in one row was refused: find it by inserting each alone.
            for (job, reply) in jobs.iter().zip(replies) {
                let _ = reply.send(insert_one(pool, job).await);
            }
        }
        Err(e) => {
            // Only an unreachable database fails a whole multi-row batch here.
            let message = e.to_string();
            let mut first = Some(e);
            for reply in replies {
                let error = first
                    .take()
                    .unwrap_or_else(|| SubmitError::Unavailable(message.clone()));
                let _ = reply.send(Err(error));
            }
        }
    }
}

async fn insert(pool: &Pool, jobs: &[NewJob], hand_over: bool) -> Result<Vec<i64>, SubmitError> {
    let client = pool.get().await?;
    Ok(store::insert_jobs_handing_over(&client, jobs, hand_over).await?)
}

/// One row alone; a row a queue policy refuses gets the job holding its
/// place, as a duplicate (`pgtasks.send`).
async fn insert_one(pool: &Pool, job: &NewJob) -> Result<Sent, SubmitError> {
    match insert(pool, std::slice::from_ref(job), false).await {
        Ok(ids) => Ok(Sent {
            id: ids[0],
            duplicate: false,
        }),
        Err(e) if e.is_unique_violation() => send(pool, job).await,
        Err(e) => Err(e),
    }
}

async fn send(pool: &Pool, job: &NewJob) -> Result<Sent, SubmitError> {
    let client = pool.get().await?;
    Ok(store::send_job(&client, job).await?)
}
