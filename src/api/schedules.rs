//! Cron schedule endpoints: list, create or replace, delete.

use serde::Deserialize;
use serde_json::Value;
use warp::Reply;

use super::error::ApiError;
use super::ApiState;
use crate::schedule::CronSchedule;
use crate::store::{self, ScheduleRecord};

/// The body of `PUT /api/schedules/{name}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// Five fields (`minute hour day month weekday`) or six with seconds first.
    #[schema(example = "*/5 * * * *")]
    pub cron: String,
    /// IANA zone the expression is read in. Default UTC.
    pub timezone: Option<String>,
    pub queue: String,
    /// The job's data. Default `{}`.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    pub priority: Option<i32>,
    pub max_attempts: Option<i32>,
    /// Default true.
    pub enabled: Option<bool>,
}

/// `GET /api/schedules`.
pub async fn list(state: ApiState) -> Result<impl Reply, ApiError> {
    let client = state.pool.get().await?;
    let schedules = store::list_schedules(&client).await?;
    Ok(warp::reply::json(
        &serde_json::json!({ "success": true, "schedules": schedules }),
    ))
}

/// `PUT /api/schedules/{name}`: creates or replaces; the next run is
/// computed by the maintenance leader within a second.
pub async fn put(
    state: ApiState,
    name: String,
    body: Result<Value, ApiError>,
) -> Result<impl Reply, ApiError> {
    let request: ScheduleRequest = serde_path_to_error::deserialize(body?)
        .map_err(|e| ApiError::bad_request(format!("{}: {}", e.path(), e.inner())))?;
    let timezone = request.timezone.unwrap_or_else(|| "UTC".to_string());
    if let Err(reason) = CronSchedule::parse(&request.cron, &timezone) {
        let field = if reason.contains("time zone") {
            "timezone"
        } else {
            "cron"
        };
        return Err(ApiError::bad_request(format!("{field}: {reason}")));
    }
    let data = request
        .data
        .unwrap_or_else(|| Value::Object(Default::default()));
    if !data.is_object() {
        return Err(ApiError::bad_request("data: must be a JSON object"));
    }
    let record = ScheduleRecord {
        name,
        cron: request.cron,
        timezone,
        queue: request.queue,
        data,
        priority: request.priority.unwrap_or(0),
        max_attempts: request.max_attempts,
        enabled: request.enabled.unwrap_or(true),
        next_run_at: None,
        last_run_at: None,
        last_job_id: None,
        last_error: None,
    };
    let client = state.pool.get().await?;
    let saved = store::upsert_schedule(&client, &record).await?;
    Ok(warp::reply::json(
        &serde_json::json!({ "success": true, "schedule": saved }),
    ))
}

/// `DELETE /api/schedules/{name}`.
pub async fn delete(state: ApiState, name: String) -> Result<impl Reply, ApiError> {
    let client = state.pool.get().await?;
    if !store::delete_schedule(&client, &name).await? {
        return Err(ApiError::not_found(format!("schedule `{name}` not found")));
    }
    Ok(warp::reply::json(&serde_json::json!({ "success": true })))
}
