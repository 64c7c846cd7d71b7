//! Sending spans to an OpenTelemetry collector over OTLP, off the request path.
//!
//! A finished request hands its spans to a [`SpanSink`] without waiting: a bounded queue, with
//! a budget of spans across it, so that a slow or absent collector costs dropped spans (counted
//! in `weir_tracing_spans_dropped_total`), never memory or a request's time. One task per
//! configured collector takes what is queued, in batches, and exports it with
//! `opentelemetry-otlp`. A change of `server.tracing` starts a new task; the old one sends
//! what it holds and ends.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::{Event, Kind, RequestSpans, SpanRecord, Value};
use crate::config::{OtlpProtocol, TracingConfig};

/// The most requests whose spans wait for the export task.
const QUEUED_REQUESTS: usize = 512;
/// The most spans waiting for the export task, across those requests.
const QUEUED_SPANS: usize = 2048;
/// The most spans sent in one export.
const BATCH_SPANS: usize = 512;
/// How long a batch waits for more spans before it goes.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// How long one export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// One request's spans on their way to the collector.
struct Finished {
    trace_id: [u8; 16],
    /// The client's span, the parent of the server span, when it sent one.
    remote_parent: Option<[u8; 8]>,
    spans: Vec<SpanRecord>,
}

/// Where sampled requests' spans are handed over.
pub struct SpanSink {
    queue: mpsc::Sender<Finished>,
    /// Spans in the queue now, held under [`QUEUED_SPANS`].
    queued: Arc<AtomicUsize>,
    dropped: Counter,
}

impl SpanSink {
    /// Hands a finished request's spans to the export task, or drops them (and counts them)
    /// when it is behind. Never waits.
    pub fn send(&self, spans: RequestSpans) {
        let context = spans.context;
        let (spans, over_bound) = spans.into_parts();
        self.dropped.inc_by(u64::from(over_bound));
        let count = spans.len();
        if self.queued.fetch_add(count, Ordering::Relaxed) + count > QUEUED_SPANS {
            self.queued.fetch_sub(count, Ordering::Relaxed);
            self.dropped.inc_by(count as u64);
            return;
        }
        let finished = Finished {
            trace_id: context.trace_id,
            remote_parent: context.parent_id,
            spans,
        };
        if self.queue.try_send(finished).is_err() {
            self.queued.fetch_sub(count, Ordering::Relaxed);
            self.dropped.inc_by(count as u64);
        }
    }
}

/// What an export task is built from: the parts of `server.tracing` that name the collector.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Collector {
    endpoint: String,
    protocol: OtlpProtocol,
    service_name: String,
    headers: std::collections::BTreeMap<String, String>,
}

/// Why a collector's exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("the OTLP exporter could not be built: {0}")]
pub struct ExportError(String);

/// The gateway's span export: the sink requests hand spans to, while `server.tracing` names a
/// collector.
pub struct SpanExport {
    sink: ArcSwapOption<SpanSink>,
    serving: Mutex<Option<Collector>>,
    dropped: Counter,
    exported: Counter,
}

impl SpanExport {
    /// No export yet; spans dropped and exported are counted in these counters.
    pub fn new(dropped: Counter, exported: Counter) -> Self {
        SpanExport {
            sink: ArcSwapOption::empty(),
            serving: Mutex::new(None),
            dropped,
            exported,
        }
    }

    /// The sink of the collector in use, if there is one.
    pub fn sink(&self) -> Option<Arc<SpanSink>> {
        self.sink.load_full()
    }

    /// Follows `tracing`: starts an export task for a collector it names that is not the one
    /// in use (on the current tokio runtime), or stops exporting when it names none. Requests
    /// holding the old sink finish with it; its task exports what they send, then ends.
    pub fn configure(&self, tracing: Option<&TracingConfig>) -> Result<(), ExportError> {
        let wanted = tracing.and_then(|tracing| {
            let endpoint = tracing.endpoint.clone()?;
            Some(Collector {
                endpoint,
                protocol: tracing.protocol,
                service_name: tracing.service_name.clone(),
                headers: tracing.headers.clone(),
            })
        });
        let mut serving = self.serving.lock().expect("span export lock");
        if *serving == wanted {
            return Ok(());
        }
        let sink = match &wanted {
            Some(collector) => Some(Arc::new(self.start(collector)?)),
            None => None,
        };
        self.sink.store(sink);
        *serving = wanted;
        Ok(())
    }

    fn start(&self, collector: &Collector) -> Result<SpanSink, ExportError> {
        let mut exporter = build_exporter(collector)?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(collector.service_name.clone())
                .build(),
        );
        let (queue, waiting) = mpsc::channel(QUEUED_REQUESTS);
        let queued = Arc::new(AtomicUsize::new(0));
        let task = ExportTask {
            exporter,
            waiting,
            queued: queued.clone(),
            dropped: self.dropped.clone(),
            exported: self.exported.clone(),
        };
        tokio::spawn(task.run());
        Ok(SpanSink {
            queue,
            queued,
            dropped: self.dropped.clone(),
        })
    }
}

fn build_exporter(collector: &Collector) -> Result<opentelemetry_otlp::SpanExporter, ExportError> {
    let built = match collector.protocol {
        OtlpProtocol::Grpc => {
            let mut headers = http::HeaderMap::new();
            for (name, value) in &collector.headers {
                let name = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| ExportError(format!("header {name:?} is not a valid name")))?;
                let value = http::HeaderValue::from_str(value)
                    .map_err(|_| ExportError(format!("the value of {name} is not valid")))?;
                headers.insert(name, value);
            }
            let metadata =
                opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&collector.endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .with_metadata(metadata)
                .build()
        }
        OtlpProtocol::Http => {
            let endpoint = format!("{}/v1/traces", collector.endpoint.trim_end_matches('/'));
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .with_headers(collector.headers.clone().into_iter().collect())
                .build()
        }
    };
    // The builder's error names the endpoint, which is the operator's own config.
    built.map_err(|error| ExportError(error.to_string()))
}

/// The task that exports one collector's spans.
struct ExportTask {
    exporter: opentelemetry_otlp::SpanExporter,
    waiting: mpsc::Receiver<Finished>,
    queued: Arc<AtomicUsize>,
    dropped: Counter,
    exported: Counter,
}

impl ExportTask {
    async fn run(mut self) {
        let scope = InstrumentationScope::builder("weir")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        while let Some(first) = self.waiting.recv().await {
            let mut batch = Vec::new();
            self.take(first, &scope, &mut batch);
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < BATCH_SPANS {
                match tokio::time::timeout_at(deadline, self.waiting.recv()).await {
                    Ok(Some(next)) => self.take(next, &scope, &mut batch),
                    Ok(None) | Err(_) => break,
                }
            }
            let count = batch.len() as u64;
            match tokio::time::timeout(EXPORT_TIMEOUT * 2, self.exporter.export(batch)).await {
                Ok(Ok(())) => {
                    self.exported.inc_by(count);
                }
                Ok(Err(error)) => {
                    self.dropped.inc_by(count);
                    tracing::debug!(%error, spans = count, "span export failed");
                }
                Err(_) => {
                    self.dropped.inc_by(count);
                    tracing::debug!(spans = count, "span export timed out");
                }
            }
        }
        let _ = self.exporter.shutdown();
    }

    fn take(&self, finished: Finished, scope: &InstrumentationScope, batch: &mut Vec<SpanData>) {
        self.queued
            .fetch_sub(finished.spans.len(), Ordering::Relaxed);
        let trace_id = TraceId::from_bytes(finished.trace_id);
        for span in finished.spans {
            batch.push(span_data(span, trace_id, finished.remote_parent, scope));
        }
    }
}

/// A recorded span as the OpenTelemetry SDK exports it.
fn span_data(
    span: SpanRecord,
    trace_id: TraceId,
    remote_parent: Option<[u8; 8]>,
    scope: &InstrumentationScope,
) -> SpanData {
    let (parent, parent_is_remote) = match span.parent {
        Some(parent) => (SpanId::from_bytes(parent), false),
        None => match remote_parent {
            Some(parent) => (SpanId::from_bytes(parent), true),
            None => (SpanId::INVALID, false),
        },
    };
    let mut events = SpanEvents::default();
    events.events = span.events.into_iter().map(event).collect();
    SpanData {
        span_context: SpanContext::new(
            trace_id,
            SpanId::from_bytes(span.id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: parent,
        parent_span_is_remote: parent_is_remote,
        span_kind: match span.kind {
            Kind::Server => SpanKind::Server,
            Kind::Client => SpanKind::Client,
            Kind::Internal => SpanKind::Internal,
        },
        name: span.name,
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes.into_iter().map(key_value).collect(),
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status: match span.failed {
            Some(description) => Status::Error { description },
            None => Status::Unset,
        },
        instrumentation_scope: scope.clone(),
    }
}

fn key_value((key, value): (Cow<'static, str>, Value)) -> KeyValue {
    match value {
        Value::Text(text) => KeyValue::new(key, text),
        Value::Int(number) => KeyValue::new(key, number),
        Value::Bool(flag) => KeyValue::new(key, flag),
    }
}

fn event(event: Event) -> opentelemetry::trace::Event {
    opentelemetry::trace::Event::new(
        event.name,
        event.time,
        event.attributes.into_iter().map(key_value).collect(),
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::trace::TraceContext;
    use std::time::SystemTime;

    fn spans(count: usize) -> RequestSpans {
        let context = TraceContext {
            trace_id: [9; 16],
            parent_id: None,
            span_id: [3; 8],
            sampled: true,
        };
        let mut spans = RequestSpans::new(context, SystemTime::now());
        for _ in 0..count {
            let id = spans.new_id();
            spans.push(SpanRecord::ending_now(
                "s",
                Kind::Internal,
                id,
                None,
                SystemTime::now(),
            ));
        }
        spans
    }

    #[test]
    fn a_sink_nobody_reads_drops_and_counts_once_its_span_budget_is_spent() {
        let (queue, _waiting) = mpsc::channel(QUEUED_REQUESTS);
        let dropped = Counter::default();
        let sink = SpanSink {
            queue,
            queued: Arc::new(AtomicUsize::new(0)),
            dropped: dropped.clone(),
        };
        let per_request = 8;
        let requests = QUEUED_SPANS / per_request + 10;
        for _ in 0..requests {
            sink.send(spans(per_request));
        }
        assert_eq!(sink.queued.load(Ordering::Relaxed), QUEUED_SPANS);
        assert_eq!(dropped.get(), (10 * per_request) as u64);
    }

    #[test]
    fn a_span_keeps_its_ids_kind_status_and_attributes() {
        let scope = InstrumentationScope::builder("weir").build();
        let mut record =
            SpanRecord::ending_now("GET /x", Kind::Server, [1; 8], None, SystemTime::now());
        record.set("http.response.status_code", 502_i64);
        record.failed = Some("bad gateway".into());
        let data = span_data(record, TraceId::from_bytes([2; 16]), Some([4; 8]), &scope);
        assert_eq!(data.parent_span_id, SpanId::from_bytes([4; 8]));
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_kind, SpanKind::Server);
        assert_eq!(data.span_context.trace_id(), TraceId::from_bytes([2; 16]));
        assert_eq!(
            data.attributes,
            vec![KeyValue::new("http.response.status_code", 502_i64)]
        );
        assert!(matches!(data.status, Status::Error { .. }));
    }
}
