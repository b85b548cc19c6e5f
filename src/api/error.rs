//! API errors: every failure leaves as `{"success":false,"error":"…"}` with a
//! status that says whose fault it was.

use serde::Serialize;
use tokio_postgres::error::SqlState;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use crate::submit::SubmitError;

/// The JSON body of every error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Always false.
    pub success: bool,
    pub error: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), error = %self.message, "request failed");
        }
        let body = ErrorBody {
            success: false,
            error: self.message,
        };
        warp::reply::with_status(warp::reply::json(&body), self.status).into_response()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            return ApiError::unavailable(format!("database unavailable: {e}"));
        };
        let code = db.code();
        let message = db.message().to_string();
        if *code == SqlState::FOREIGN_KEY_VIOLATION {
            ApiError::not_found(message)
        } else if *code == SqlState::UNIQUE_VIOLATION {
            // A queue policy or singleton key holds another job's place.
            ApiError::conflict(message)
        } else if [
            SqlState::CHECK_VIOLATION,
            SqlState::NOT_NULL_VIOLATION,
            SqlState::INVALID_TEXT_REPRESENTATION,
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        ]
        .contains(code)
        {
            ApiError::bad_request(message)
        } else if [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(code)
        {
            ApiError::unavailable(format!("database unavailable: {message}"))
        } else {
            ApiError::internal(format!("database error: {message}"))
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    /// No connection could be had, whatever the reason: the database is
    /// unavailable to us (down, refusing connections, or the pool is exhausted).
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::unavailable(format!("database unavailable: {e}"))
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Db(e) => e.into(),
            SubmitError::Closed => ApiError::unavailable("the service is shutting down"),
            SubmitError::Unavailable(message) => {
                ApiError::unavailable(format!("database unavailable: {message}"))
            }
        }
    }
}

/// Turns what no route claimed into the same JSON shape.
pub async fn recover(rejection: warp::Rejection) -> Result<Response, std::convert::Infallible> {
    let error = if let Some(e) = rejection.find::<ApiError>() {
        ApiError::new(e.status, e.message.clone())
    } else if rejection.is_not_found() {
        ApiError::not_found("not found")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    } else {
        ApiError::internal(format!("unhandled request: {rejection:?}"))
    };
    Ok(error.into_response())
}
