//! A filter instance's state, and what a pool's instances share: the data the host functions
//! work on, below both the instance state that holds it and the calls that drive it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Memory, TypedFunc};

use super::abi::{MetricType, StreamType};
use super::queues::SharedQueues;
use crate::plugin::bindings::weir::plugin0_1_0::http::Reply;
use crate::plugin::callout::Call;

/// The root context's id; HTTP contexts count up from the next.
pub const ROOT_CONTEXT: u32 = 1;

/// What every instance of one filter pool shares: its configuration, its metrics and the
/// signal that wakes its control instance.
pub struct FilterShared {
    /// What `plugin_root_id` answers: the entry's `root_id`, or the plugin's name.
    pub root_id: String,
    /// The route's `config`, as JSON text: the plugin configuration.
    pub plugin_config: Bytes,
    /// The entry's `vm_config`: the VM configuration.
    pub vm_config: Bytes,
    /// Wakes the control instance: a tick period changed, or a queue it registered has items.
    pub wake: Arc<tokio::sync::Notify>,
    /// The metrics the filter defined, by id (id `n` is entry `n - 1`).
    pub metrics: Mutex<Vec<(MetricType, String)>>,
    /// The gateway's shared queues.
    pub queues: SharedQueues,
    /// The tick period the control instance's root context asked for.
    pub tick: Mutex<Option<Duration>>,
}

/// An http call the filter made, waiting to be sent once its callback can run.
pub struct PendingCall {
    /// The token the filter was given.
    pub token: u32,
    /// The checked request.
    pub request: Call,
    /// How long the filter lets it take.
    pub timeout: Duration,
}

/// What an http call brought back, readable during its callback.
#[derive(Default)]
pub struct CallResponse {
    /// `:status` and the headers; empty when the call failed.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

/// A filter instance's state between and during calls.
pub struct FilterState {
    /// What the pool's instances share.
    pub shared: Arc<FilterShared>,
    /// The guest's memory.
    pub memory: Option<Memory>,
    /// The guest's allocator, for the values host functions return.
    pub allocate: Option<TypedFunc<u32, u32>>,
    /// The request's HTTP context, while the instance serves one.
    pub http_context: Option<u32>,
    next_context: u32,
    /// The context host calls act on (`proxy_set_effective_context`).
    pub effective: u32,
    /// A local response the filter sent during the call in progress.
    pub local_reply: Option<Reply>,
    /// `proxy_continue_stream` was called for the request or the response.
    resumed: [bool; 2],
    /// `proxy_close_stream` was called.
    pub closed: bool,
    /// Calls made and not yet answered.
    pub calls: VecDeque<PendingCall>,
    next_token: u32,
    /// The answer of the call whose callback runs now.
    pub call_response: Option<CallResponse>,
    /// The response status, once the response phase has seen it.
    pub response_code: Option<u16>,
    /// The body the filter sees in the body callback in progress: the chunk, after what it
    /// held from earlier chunks. `None` outside a body callback.
    pub body: Option<BodyBuffer>,
    /// A whole response body offered to the body callback that follows the response headers'
    /// in the same entry, if they go on; the batch module's `proceed` moves it into `body`.
    pub next_body: Option<BodyBuffer>,
    /// The trailers the trailers callback in progress sees and edits. `None` outside one.
    pub trailers: Option<Trailers>,
}

/// A stream's trailers, lent to its trailers callback.
pub struct Trailers {
    /// Which side's trailers they are.
    pub stream: StreamType,
    /// The trailers, as the filter leaves them.
    pub map: http::HeaderMap,
}

/// A body seen by a body callback, and what the filter may make of it.
pub struct BodyBuffer {
    /// Which side's body it is.
    pub stream: StreamType,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The most bytes the filter may hold or write: its `max_body_bytes`.
    pub limit: usize,
}

impl FilterState {
    /// The state of a new instance of a pool that shares `shared`.
    pub fn new(shared: Arc<FilterShared>) -> Self {
        FilterState {
            shared,
            memory: None,
            allocate: None,
            http_context: None,
            next_context: ROOT_CONTEXT + 1,
            effective: ROOT_CONTEXT,
            local_reply: None,
            resumed: [false; 2],
            closed: false,
            calls: VecDeque::new(),
            next_token: 1,
            call_response: None,
            response_code: None,
            body: None,
            next_body: None,
            trailers: None,
        }
    }

    /// A new HTTP context for a request, which host calls act on from now on.
    pub fn begin_request(&mut self) -> u32 {
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        self.http_context = Some(context);
        self.effective = context;
        self.resumed = [false; 2];
        self.closed = false;
        self.response_code = None;
        context
    }

    /// Makes `context` the one the next callback runs in and host calls act on, with
    /// `response_code` its response's status, and nothing left over from another request's
    /// calls on the same instance.
    pub fn enter(&mut self, context: u32, response_code: Option<u16>) {
        self.http_context = Some(context);
        self.effective = context;
        self.response_code = response_code;
        self.resumed = [false; 2];
        self.closed = false;
        self.local_reply = None;
    }

    /// The token for the next http call.
    pub fn take_token(&mut self) -> u32 {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        token
    }

    /// Whether the filter continued `stream`.
    pub fn resumed(&self, stream: StreamType) -> bool {
        self.resumed[Self::stream_index(stream)]
    }

    fn stream_index(stream: StreamType) -> usize {
        match stream {
            StreamType::Request => 0,
            StreamType::Response => 1,
        }
    }

    /// Marks `stream` as continued by the filter.
    pub fn resume(&mut self, stream: StreamType) {
        self.resumed[Self::stream_index(stream)] = true;
    }
}
