//! The webhook handler: POSTs each job to a URL and maps the answer to an
//! outcome.
//!
//! The request: `POST <url>` with the [`job_document`] as a JSON body,
//! `Content-Type: application/json`, `Idempotency-Key: <job id>` (the same on
//! every attempt), the configured headers, and, when a secret is set,
//!
//! ```text
//! X-Pgtasks-Timestamp: <unix seconds>
//! X-Pgtasks-Signature: sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>
//! ```
//!
//! computed over the exact body bytes. The answer:
//!
//! | answer | outcome |
//! | --- | --- |
//! | 2xx | completed; a JSON body is stored as the job's output |
//! | 408, 429, 5xx, timeout, connection error | retried by the queue's policy, no sooner than `Retry-After` |
//! | anything else (3xx, other 4xx) | failed at once (retried when `retry_client_errors`) |
//!
//! A failure's message holds the status and the start of the body. Each
//! webhook has its own connection pool, and requests in flight are bounded by
//! the queue's concurrency, so a slow or dead endpoint holds only its own
//! queue's slots, each for at most `timeout`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use sha2::Sha256;
use tracing::debug;

use super::{excerpt, job_document, OUTPUT_LIMIT};
use crate::config::{Secret, WebhookConfig};
use crate::handler::{Handler, HandlerResult, JobContext, JobError};
use crate::job::Job;

/// The header carrying the job id, the same on every attempt.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The unix time (seconds) the signature covers.
pub const TIMESTAMP_HEADER: &str = "x-pgtasks-timestamp";
/// `sha256=<hex>`: HMAC-SHA256 with the secret over `<timestamp>.<body>`.
pub const SIGNATURE_HEADER: &str = "x-pgtasks-signature";

/// Longest wait for a connection, within the request's own timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// POSTs jobs to one URL. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Webhook {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    url: Url,
    headers: HeaderMap,
    secret: Option<Secret>,
    timeout: Duration,
    retry_client_errors: bool,
}

impl Webhook {
    /// Builds the handler and its connection pool from validated config.
    pub fn new(config: &WebhookConfig) -> Result<Webhook, String> {
        let url = Url::parse(&config.url).map_err(|e| format!("url: {e}"))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("headers.{name}: {e}"))?;
            let value = HeaderValue::from_str(value).map_err(|e| format!("headers.{name}: {e}"))?;
            headers.insert(name, value);
        }
        let client = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(config.timeout))
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // A redirected POST would become a GET: report it instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pgtasks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Webhook {
            inner: Arc::new(Inner {
                client,
                url,
                headers,
                secret: config.secret.clone(),
                timeout: config.timeout,
                retry_client_errors: config.retry_client_errors,
            }),
        })
    }

    /// Runs one attempt: POST, wait for the answer (or the timeout, or
    /// cancellation), map it to an outcome.
    pub async fn call(&self, job: Job, ctx: JobContext) -> HandlerResult {
        let this = &self.inner;
        let body = serde_json::to_vec(&job_document(&job))?;
        let mut request = this
            .client
            .post(this.url.clone())
            .headers(this.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_KEY, job.id.to_string());
        if let Some(secret) = &this.secret {
            let timestamp = Utc::now().timestamp();
            request = request
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, signature(secret, timestamp, &body)?);
        }
        let started = tokio::time::Instant::now();
        let exchange = async {
            let response = request.body(body).send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, Utc::now()));
            let (body, complete) = read_capped(response, OUTPUT_LIMIT).await?;
            Ok::<_, reqwest::Error>((status, retry_after, body, complete))
        };
        // Cancel safety: dropping the exchange drops the request and its
        // connection; nothing else is shared.
        let answer = tokio::select! {
            _ = ctx.cancelled().cancelled() => {
                return Err(JobError::new("cancelled before the webhook answered").into());
            }
            answer = tokio::time::timeout(this.timeout, exchange) => answer,
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (status, retry_after, body, complete) = match answer {
            Err(_) => {
                debug!(job_id = job.id, elapsed_ms, "webhook timed out");
                return Err(JobError::new(format!(
                    "webhook did not answer within {:?}",
                    this.timeout
                ))
                .into());
            }
            Ok(Err(error)) => {
                debug!(job_id = job.id, elapsed_ms, error = %error, "webhook request failed");
                return Err(JobError::new(format!(
                    "webhook request failed: {}",
                    error_chain(&error)
                ))
                .into());
            }
            Ok(Ok(answer)) => answer,
        };
        debug!(
            job_id = job.id,
            status = status.as_u16(),
            elapsed_ms,
            "webhook answered"
        );
        if status.is_success() {
            let output = if complete {
                serde_json::from_slice(&body).ok()
            } else {
                None
            };
            return Ok(output);
        }
        let mut message = format!("webhook answered {status}");
        let text = excerpt(&body, false);
        if !text.is_empty() {
            let _ = write!(message, ": {text}");
        }
        Err(classify(status, retry_after, this.retry_client_errors, message).into())
    }
}

impl Handler for Webhook {
    fn handle(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, HandlerResult> {
        let this = self.clone();
        Box::pin(async move { this.call(job, ctx).await })
    }
}

/// How a non-2xx answer is retried.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    retry_client_errors: bool,
    message: String,
) -> JobError {
    let transient = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    match (transient, retry_after) {
        (true, Some(delay)) => JobError::retry_after(message, delay),
        (true, None) => JobError::new(message),
        (false, _) if retry_client_errors => JobError::new(message),
        (false, _) => JobError::permanent(message),
    }
}

/// `sha256=<hex>` of HMAC-SHA256 keyed with the secret over
/// `<timestamp>.<body>`.
/// (HMAC takes keys of any length; the error exists only in the signature
/// of the trait.)
pub fn signature(
    secret: &Secret,
    timestamp: i64,
    body: &[u8],
) -> Result<String, hmac::digest::InvalidLength> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.expose().as_bytes())?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 2 * digest.len());
    out.push_str("sha256=");
    for byte in digest.iter() {
        let _ = write!(out, "{byte:02x}");
    }
    Ok(out)
}

/// A `Retry-After` value: seconds, or an HTTP date (a date in the past means
/// now).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    Some((at.with_timezone(&Utc) - now).to_std().unwrap_or_default())
}

/// Reads at most `limit` bytes of the body; `false` when there was more.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            // Dropping the response closes the connection instead of
            // reading the rest.
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// An error and its causes, `: `-separated (reqwest's own message rarely
/// says what went wrong).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Retry;

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn statuses_map_to_retry_decisions() {
        let m = || "m".to_string();
        let later = Some(Duration::from_secs(5));
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, None, false, m()).retry(),
            Retry::Policy
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, later, false, m()).retry(),
            Retry::NotBefore(Duration::from_secs(5))
        );
        assert_eq!(
            classify(StatusCode::REQUEST_TIMEOUT, None, false, m()).retry(),
            Retry::Policy
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, later, false, m()).retry(),
            Retry::Never
        );
        assert_eq!(
            classify(StatusCode::MOVED_PERMANENTLY, None, false, m()).retry(),
            Retry::Never
        );
        assert_eq!(
            classify(StatusCode::NOT_FOUND, None, true, m()).retry(),
            Retry::Policy
        );
    }

    #[test]
    fn signature_covers_timestamp_and_body() {
        let secret = Secret::new("key");
        let sign = |timestamp, body: &[u8]| signature(&secret, timestamp, body).unwrap();
        // Python: hmac.new(b"key", b"1.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            sign(1, b"{}"),
            "sha256=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
        assert_ne!(sign(1, b"{}"), sign(2, b"{}"));
        assert_ne!(sign(1, b"{}"), sign(1, b"{ }"));
    }
}
