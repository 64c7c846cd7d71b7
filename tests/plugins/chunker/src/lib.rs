//! chunker: a test plugin for world 0.3.0's chunk hooks. Its config picks what they do to the
//! bodies they see as they stream.

use std::sync::Mutex;

use serde::Deserialize;
use weir_sdk::{Action, ChunkAction, ChunkWants, Plugin, Reply, Request, schemars};

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
enum Config {
    /// Upper-cases every chunk of both bodies.
    Upper,
    /// Upper-cases every chunk of the request body, and follows no response.
    UpperRequest,
    /// Holds the response body's chunks until what it holds ends with `delimiter`, then passes
    /// it all on.
    Until { delimiter: String },
    /// Refuses either body, with a 413 that says `refused by chunker`, at the first chunk that
    /// holds `marker`.
    Refuse { marker: String },
    /// Replaces each chunk of the response body with 1,000 copies of it.
    Flood,
    /// Holds every chunk of the response body.
    Hoard,
    /// Never returns from a response chunk.
    Spin,
    /// Keeps the request's query in `on-request`, and puts it in brackets before each chunk
    /// of the response body: which request's state each chunk met.
    Tag,
    /// Wants the response body's chunks and passes each one on as it is: what a chunk hook that
    /// does nothing costs (bench/run's case Sh).
    Pass,
}

struct Chunker(Config, Mutex<String>);

impl Plugin for Chunker {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if let Config::Until { delimiter } | Config::Refuse { marker: delimiter } = &config
            && delimiter.is_empty()
        {
            return Err("the delimiter or marker must not be empty".into());
        }
        Ok(Chunker(config, Mutex::default()))
    }

    fn on_request(&self, req: &Request) -> Action {
        if let Config::Tag = self.0 {
            *self.1.lock().unwrap() = req.query().unwrap_or_default();
        }
        Action::Continue
    }

    fn chunk_wants(&self) -> ChunkWants {
        ChunkWants {
            request: matches!(
                self.0,
                Config::Upper | Config::UpperRequest | Config::Refuse { .. }
            ),
            response: !matches!(self.0, Config::UpperRequest),
        }
    }

    fn on_request_chunk(&self, chunk: &[u8], _end_of_stream: bool) -> ChunkAction {
        self.chunk(chunk)
    }

    fn on_response_chunk(&self, chunk: &[u8], _end_of_stream: bool) -> ChunkAction {
        match &self.0 {
            Config::Until { delimiter } if !chunk.ends_with(delimiter.as_bytes()) => {
                ChunkAction::Hold
            }
            Config::Until { .. } => ChunkAction::Pass,
            Config::Flood => ChunkAction::Replace(chunk.repeat(1000)),
            Config::Hoard => ChunkAction::Hold,
            Config::Spin => spin(),
            Config::Tag => {
                let tag = self.1.lock().unwrap();
                ChunkAction::Replace([format!("[{tag}]").as_bytes(), chunk].concat())
            }
            Config::Pass => ChunkAction::Pass,
            Config::Upper | Config::UpperRequest | Config::Refuse { .. } => self.chunk(chunk),
        }
    }
}

impl Chunker {
    /// What both bodies' hooks do in `upper` and `refuse` modes.
    fn chunk(&self, chunk: &[u8]) -> ChunkAction {
        match &self.0 {
            Config::Upper | Config::UpperRequest => {
                ChunkAction::Replace(chunk.to_ascii_uppercase())
            }
            Config::Refuse { marker } if contains(chunk, marker.as_bytes()) => {
                ChunkAction::Refuse(Reply::text(413, "refused by chunker"))
            }
            _ => ChunkAction::Pass,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Loops until the gateway's deadline stops it.
fn spin() -> ChunkAction {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

weir_sdk::export_plugin!(Chunker);
