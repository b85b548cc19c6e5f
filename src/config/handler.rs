//! `[queues.<name>.handler]`: what runs a queue's jobs when nobody writes
//! Rust. A table tagged by `kind`:
//!
//! ```toml
//! [queues.hooks.handler]
//! kind = "webhook"          # POST each job to a URL
//! url = "http://127.0.0.1:8080/jobs"
//!
//! [queues.reports.handler]
//! kind = "command"          # run a program with the job on stdin
//! program = "/usr/local/bin/make-report"
//!
//! [queues.readme-queue.handler]
//! kind = "log"              # log each job (the readme handler)
//! ```
//!
//! Validation here checks everything that can be checked before the first
//! job: URLs, header names, that the program exists and is executable.
//! Errors name the key, e.g. `queues.hooks.handler.url`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{lenient, optional_duration};

/// A queue's handler, chosen in config. Used by the `pgtasks` binary (see
/// `pgtasks::handlers::from_config`); a Rust program registering its own
/// handler for the queue ignores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawHandler", into = "RawHandler")]
pub enum HandlerConfig {
    /// POST each job as JSON to a URL.
    Webhook(WebhookConfig),
    /// Run a program with the job as JSON on its stdin.
    Command(CommandConfig),
    /// Log each job and complete it (the readme handler).
    Log,
}

/// `kind = "webhook"`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// Where jobs are POSTed (`http://` or `https://`). Required.
    pub url: String,
    /// Longest wait for the whole exchange (connect, send, answer). Default 30s.
    pub timeout: Duration,
    /// Extra request headers, e.g. `Authorization`. Default none.
    pub headers: BTreeMap<String, String>,
    /// Key for the `X-Pgtasks-Signature` HMAC-SHA256 header. Default none
    /// (requests are not signed).
    pub secret: Option<Secret>,
    /// Also retry 3xx and 4xx answers other than 408 and 429 (by the queue's
    /// policy). Default false: they fail the job at once.
    pub retry_client_errors: bool,
}

/// The default webhook timeout.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            timeout: WEBHOOK_TIMEOUT,
            headers: BTreeMap::new(),
            secret: None,
            retry_client_errors: false,
        }
    }
}

/// `kind = "command"`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommandConfig {
    /// The program: a path (relative ones resolve against `working_dir`) or a
    /// name looked up on `PATH`. Run directly, without a shell. Required.
    pub program: String,
    /// Its arguments. Default none.
    pub args: Vec<String>,
    /// Variables added to the environment it inherits from pgtasks. Default none.
    pub env: BTreeMap<String, String>,
    /// Its working directory. Default: pgtasks's own.
    pub working_dir: Option<PathBuf>,
    /// Longest run of one attempt; then its process group is killed and the
    /// attempt fails. Default: none (the queue's `lease` still applies).
    pub timeout: Option<Duration>,
}

/// The handler table as written: every key of every kind, so that serde
/// reads it field by field (figment then names the exact key of a bad
/// value, which an internally tagged enum would hide), then checked against
/// its `kind`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHandler {
    #[serde(deserialize_with = "lenient::optional_string")]
    kind: Option<String>,
    #[serde(deserialize_with = "lenient::optional_string")]
    url: Option<String>,
    #[serde(with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(deserialize_with = "lenient::optional_string_map")]
    headers: Option<BTreeMap<String, String>>,
    secret: Option<Secret>,
    retry_client_errors: Option<bool>,
    #[serde(deserialize_with = "lenient::optional_string")]
    program: Option<String>,
    #[serde(deserialize_with = "lenient::optional_string_list")]
    args: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient::optional_string_map")]
    env: Option<BTreeMap<String, String>>,
    working_dir: Option<PathBuf>,
}

impl RawHandler {
    /// The keys set that `kind` does not take.
    fn foreign_keys(&self, kind: &str) -> Vec<&'static str> {
        let webhook = [
            ("url", self.url.is_some()),
            ("headers", self.headers.is_some()),
            ("secret", self.secret.is_some()),
            ("retry_client_errors", self.retry_client_errors.is_some()),
        ];
        let command = [
            ("program", self.program.is_some()),
            ("args", self.args.is_some()),
            ("env", self.env.is_some()),
            ("working_dir", self.working_dir.is_some()),
        ];
        let timeout = [("timeout", self.timeout.is_some())];
        let foreign: Vec<(&'static str, bool)> = match kind {
            "webhook" => command.into_iter().collect(),
            "command" => webhook.into_iter().collect(),
            _ => webhook.into_iter().chain(command).chain(timeout).collect(),
        };
        foreign
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(key, _)| key)
            .collect()
    }
}

impl TryFrom<RawHandler> for HandlerConfig {
    type Error = String;

    fn try_from(raw: RawHandler) -> Result<Self, String> {
        let Some(kind) = raw.kind.clone() else {
            return Err("`kind` is missing: one of `webhook`, `command`, `log`".to_string());
        };
        if !matches!(kind.as_str(), "webhook" | "command" | "log") {
            return Err(format!(
                "`kind` is `{kind}`, expected one of `webhook`, `command`, `log`"
            ));
        }
        let foreign = raw.foreign_keys(&kind);
        if !foreign.is_empty() {
            return Err(format!(
                "a {kind} handler takes no `{}`",
                foreign.join("`, `")
            ));
        }
        Ok(match kind.as_str() {
            "webhook" => HandlerConfig::Webhook(WebhookConfig {
                url: raw.url.unwrap_or_default(),
                timeout: raw.timeout.unwrap_or(WEBHOOK_TIMEOUT),
                headers: raw.headers.unwrap_or_default(),
                secret: raw.secret,
                retry_client_errors: raw.retry_client_errors.unwrap_or(false),
            }),
            "command" => HandlerConfig::Command(CommandConfig {
                program: raw.program.unwrap_or_default(),
                args: raw.args.unwrap_or_default(),
                env: raw.env.unwrap_or_default(),
                working_dir: raw.working_dir,
                timeout: raw.timeout,
            }),
            _ => HandlerConfig::Log,
        })
    }
}

impl From<HandlerConfig> for RawHandler {
    fn from(handler: HandlerConfig) -> RawHandler {
        match handler {
            HandlerConfig::Webhook(w) => RawHandler {
                kind: Some("webhook".into()),
                url: Some(w.url),
                timeout: Some(w.timeout),
                headers: Some(w.headers),
                secret: w.secret,
                retry_client_errors: Some(w.retry_client_errors),
                ..RawHandler::default()
            },
            HandlerConfig::Command(c) => RawHandler {
                kind: Some("command".into()),
                program: Some(c.program),
                args: Some(c.args),
                env: Some(c.env),
                working_dir: c.working_dir,
                timeout: c.timeout,
                ..RawHandler::default()
            },
            HandlerConfig::Log => RawHandler {
                kind: Some("log".into()),
                ..RawHandler::default()
            },
        }
    }
}

/// A secret string: deserialized leniently, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient::string(deserializer).map(Secret)
    }
}

/// A field of the handler table and what is wrong with it.
pub(super) struct Invalid {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl HandlerConfig {
    /// Checks the handler's settings; the error names the field under
    /// `handler.`.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        match self {
            HandlerConfig::Webhook(webhook) => webhook.validate(),
            HandlerConfig::Command(command) => command.validate(),
            HandlerConfig::Log => Ok(()),
        }
    }
}

impl WebhookConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.url.trim().is_empty() {
            return Err(invalid("url", "a webhook handler needs a url"));
        }
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| invalid("url", format!("`{}` is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid(
                "url",
                format!("`{}` must be an http:// or https:// URL", self.url),
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be greater than zero"));
        }
        for (name, value) in &self.headers {
            let field = format!("headers.{name}");
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(&field, format!("`{name}` is not a valid header name")))?;
            reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| invalid(&field, "the value is not a valid header value"))?;
        }
        if self.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
            return Err(invalid("secret", "must not be empty when set"));
        }
        Ok(())
    }
}

impl CommandConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if let Some(dir) = &self.working_dir {
            if !dir.is_dir() {
                return Err(invalid(
                    "working_dir",
                    format!("`{}` is not a directory", dir.display()),
                ));
            }
        }
        find_program(&self.program, self.working_dir.as_deref())
            .map_err(|reason| invalid("program", reason))?;
        for name in self.env.keys() {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(invalid(
                    format!("env.{name}"),
                    "variable names must be non-empty, without `=` or NUL",
                ));
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(invalid("timeout", "must be greater than zero"));
        }
        Ok(())
    }
}

/// Where `program` will be found when run from `working_dir`: a path with a
/// `/` as written (relative to `working_dir`), otherwise the first match on
/// `PATH`. It must be an executable file.
pub fn find_program(program: &str, working_dir: Option<&Path>) -> Result<PathBuf, String> {
    if program.trim().is_empty() {
        return Err("a command handler needs a program".to_string());
    }
    if program.contains('/') {
        let path = match working_dir {
            Some(dir) if Path::new(program).is_relative() => dir.join(program),
            _ => PathBuf::from(program),
        };
        return match is_executable(&path) {
            Ok(()) => Ok(path),
            Err(reason) => Err(format!("`{}` {reason}", path.display())),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate).is_ok())
        .ok_or_else(|| format!("`{program}` is not an executable file on PATH"))
}

fn is_executable(path: &Path) -> Result<(), &'static str> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|_| "does not exist")?;
    if !metadata.is_file() {
        return Err("is not a file");
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err("is not executable");
    }
    Ok(())
}
