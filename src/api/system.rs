//! Operational endpoints: liveness, readiness, metrics, queue overview.

use std::time::Duration;

use serde::Serialize;
use warp::http::StatusCode;
use warp::Reply;

use super::error::ApiError;
use super::ApiState;
use crate::store::{self, QueueSummary};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: &'static str,
    /// Why not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueList {
    pub success: bool,
    pub queues: Vec<QueueSummary>,
}

/// `GET /health`: the process answers. Touches no database.
pub fn health() -> impl Reply {
    warp::reply::json(&Health { status: "ok" })
}

/// `GET /ready`: the database answers and, where this process listens, the
/// listener is connected; 503 from the moment shutdown begins.
pub async fn ready(state: ApiState) -> impl Reply {
    let unavailable = |reason: String| {
        warp::reply::with_status(
            warp::reply::json(&Readiness {
                status: "unavailable",
                reason: Some(reason),
            }),
            StatusCode::SERVICE_UNAVAILABLE,
        )
    };
    if state.shutdown.is_cancelled() {
        return unavailable("shutting down".into());
    }
    let ping = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        store::ping(&client).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Err(_) => return unavailable("database: no answer within 2s".into()),
        Ok(Err(e)) => return unavailable(format!("database: {e}")),
        Ok(Ok(())) => {}
    }
    if let Some(listener) = &state.listener {
        if !listener.is_connected() {
            return unavailable("listener: not connected to the database".into());
        }
    }
    warp::reply::with_status(
        warp::reply::json(&Readiness {
            status: "ready",
            reason: None,
        }),
        StatusCode::OK,
    )
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(state: ApiState) -> impl Reply {
    let text = crate::metrics::render(&state.pool, state.listener.as_deref()).await;
    warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4")
}

/// `GET /api/queues`: every queue with counts per state.
pub async fn queues(state: ApiState) -> Result<impl Reply, ApiError> {
    let client = state.pool.get().await?;
    let queues = store::queue_summaries(&client).await?;
    Ok(warp::reply::json(&QueueList {
        success: true,
        queues,
    }))
}

/// `POST /api/queues/{queue}/pause` and `/resume`: every instance stops (or
/// starts again) claiming the queue's jobs; it keeps accepting them.
pub async fn set_paused(
    state: ApiState,
    queue: String,
    paused: bool,
) -> Result<impl Reply, ApiError> {
    let client = state.pool.get().await?;
    if !store::set_queue_paused(&client, &queue, paused).await? {
        return Err(ApiError::not_found(format!("unknown queue \"{queue}\"")));
    }
    Ok(warp::reply::json(
        &serde_json::json!({ "success": true, "queue": queue, "paused": paused }),
    ))
}

/// `POST /api/queues/{queue}/redrive?max=1000`: waiting dead letters of this
/// dead-letter queue go back to the queues they came from.
pub async fn redrive(
    state: ApiState,
    queue: String,
    max: Option<String>,
) -> Result<impl Reply, ApiError> {
    let max = match max {
        None => 1000,
        Some(m) => m
            .parse::<i32>()
            .ok()
            .filter(|m| *m >= 1)
            .ok_or_else(|| ApiError::bad_request("max: must be a positive integer"))?,
    };
    let client = state.pool.get().await?;
    let moved = store::redrive(&client, &queue, max).await?;
    Ok(warp::reply::json(
        &serde_json::json!({ "success": true, "moved": moved }),
    ))
}
