//! Reading a JSON request body: content type, size limit (with or without
//! Content-Length, so chunked uploads work too), and parsing.
//!
//! The filter never rejects; it hands the handler a `Result`, so each route
//! answers body errors with its own JSON error and nothing falls through to
//! another route.

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use serde_json::Value;
use warp::http::StatusCode;
use warp::Filter;

use super::error::ApiError;

/// Extracts the body as JSON, or the error to answer with.
pub fn json(
    limit: u64,
) -> impl Filter<Extract = (Result<Value, ApiError>,), Error = std::convert::Infallible> + Clone {
    warp::header::optional::<String>("content-type")
        .or(warp::any().map(|| None))
        .unify()
        .and(
            warp::header::optional::<String>("content-length")
                .or(warp::any().map(|| None))
                .unify(),
        )
        .and(warp::body::stream())
        .then(
            move |content_type: Option<String>, length: Option<String>, body| async move {
                check_content_type(content_type.as_deref())?;
                let declared = length.and_then(|l| l.trim().parse::<u64>().ok());
                if declared.is_some_and(|n| n > limit) {
                    return Err(too_large(limit));
                }
                let bytes = read_limited(body, limit).await?;
                serde_json::from_slice::<Value>(&bytes).map_err(|e| {
                    ApiError::bad_request(format!("request body is not valid JSON: {e}"))
                })
            },
        )
        .or(warp::any().map(|| Err(ApiError::bad_request("request body could not be read"))))
        .unify()
}

/// JSON or unspecified; anything else is refused with 415.
fn check_content_type(content_type: Option<&str>) -> Result<(), ApiError> {
    let Some(value) = content_type else {
        return Ok(());
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/json, not {value}"),
        ))
    }
}

async fn read_limited(
    body: impl futures::Stream<Item = Result<impl Buf, warp::Error>>,
    limit: u64,
) -> Result<BytesMut, ApiError> {
    let mut body = std::pin::pin!(body);
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
        if bytes.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(too_large(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            bytes.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(bytes)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than {limit} bytes"),
    )
}
