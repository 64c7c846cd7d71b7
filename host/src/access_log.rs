//! The access log: one JSON line per request, written off the request path.

use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Where access-log lines go.
#[derive(Clone, Debug, Default)]
pub enum AccessLogTarget {
    /// Standard output.
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Nowhere.
    Off,
}

impl std::str::FromStr for AccessLogTarget {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => AccessLogTarget::Stdout,
            "off" => AccessLogTarget::Off,
            path => AccessLogTarget::File(path.into()),
        })
    }
}

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    /// When the response finished, RFC 3339.
    pub time: String,
    /// The request id.
    pub request_id: &'a str,
    /// The trace id, under `server.tracing`: 32 lowercase hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The client's IP address.
    pub client_ip: String,
    /// The method.
    pub method: &'a str,
    /// The path the client asked for.
    pub path: &'a str,
    /// The matched route, if any.
    pub route: Option<&'a str>,
    /// The upstream node that answered, as host:port.
    pub upstream: Option<&'a str>,
    /// The status sent to the client.
    pub status: u16,
    /// Microseconds from arrival to the end of the response.
    pub latency_us: u64,
    /// Microseconds spent inside plugins.
    pub plugin_us: u64,
    /// The consumer an auth plugin found, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<&'a str>,
    /// For an upgraded connection (WebSocket): the bytes each way and how it ended; then
    /// `latency_us` is the connection's whole life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgraded: Option<crate::upgrade::Spliced>,
}

/// Writes access-log lines through a background thread.
pub struct AccessLog {
    writer: Option<NonBlocking>,
    /// Dropping it flushes what the thread still holds.
    guard: std::sync::Mutex<Option<WorkerGuard>>,
}

impl AccessLog {
    /// Opens the target; a file is created if missing and appended to.
    pub fn open(target: &AccessLogTarget) -> std::io::Result<Self> {
        let (writer, guard) = match target {
            AccessLogTarget::Off => {
                return Ok(AccessLog {
                    writer: None,
                    guard: std::sync::Mutex::new(None),
                });
            }
            AccessLogTarget::Stdout => NonBlockingBuilder::default().finish(std::io::stdout()),
            AccessLogTarget::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                NonBlockingBuilder::default().finish(file)
            }
        };
        Ok(AccessLog {
            writer: Some(writer),
            guard: std::sync::Mutex::new(Some(guard)),
        })
    }

    /// Writes out every line handed over so far; later lines are dropped.
    pub fn close(&self) {
        let guard = self.guard.lock().expect("access log lock").take();
        drop(guard);
    }

    /// Whether lines go anywhere; when not, callers skip building them.
    pub fn enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Writes one record as a JSON line.
    pub fn write(&self, record: &AccessRecord<'_>) {
        let Some(writer) = &self.writer else { return };
        let mut line = serde_json::to_vec(record).expect("an access record always serializes");
        line.push(b'\n');
        // The writer hands the line to its thread; it only fails if that thread is gone.
        let _ = writer.clone().write_all(&line);
    }
}

/// The current time in RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
