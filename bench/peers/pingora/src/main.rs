//! bench/run's cases P and Hp: the smallest Pingora reverse proxy that does B's work.
//!
//! One upstream (`--upstream HOST:PORT`), every request passed to it with the forwarded headers
//! B's nginx sets (`X-Forwarded-For` with the client's address appended, `X-Forwarded-Proto`,
//! `X-Forwarded-Host` from the request's host without its port) and `Connection` removed, as
//! nginx's `proxy_set_header Connection ""` does. Upstream connections go back to Pingora's
//! keep-alive pool after each response (its default, `upstream_keepalive_pool_size` 128, left as
//! it is). No TLS, no logging, no metrics service: nothing B does not do.
//!
//! `--threads N` runs the proxy service on Pingora's no-steal runtime: N threads, each with a
//! current-thread tokio runtime, a connection staying on the thread it was given, as weir's
//! `--workers N` and nginx's workers run (P has 1, Hp 2). `--work-stealing on` puts it on a
//! work-stealing runtime of N threads instead (Pingora's default; on the 2-core VM it measured
//! the same req/s for Hp, and more CPU per request for P).
//!
//! It allocates with mimalloc, as weir does (with weir's features), so that the two are compared
//! as proxies rather than as users of glibc's malloc: Pingora allocates per request, and with
//! glibc's malloc P took about 30% more CPU per request on the 2-core VM.
//!
//! Stop it with SIGINT (Pingora's fast shutdown): SIGTERM is its graceful one, which waits for
//! a listener hand-over and a grace period first.

use std::net::{SocketAddr, ToSocketAddrs};

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Proxy {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // The same peer every time, so every request's connection comes from one pool.
        Ok(Box::new(self.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        // nginx's $proxy_add_x_forwarded_for: the client's line(s), then its address.
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let mut forwarded_for = String::new();
        for line in upstream.headers.get_all("x-forwarded-for") {
            if let Ok(text) = line.to_str() {
                let text = text.trim();
                if !text.is_empty() {
                    forwarded_for.push_str(text);
                    forwarded_for.push_str(", ");
                }
            }
        }
        forwarded_for.push_str(&client);
        upstream.insert_header("x-forwarded-for", forwarded_for)?;
        upstream.insert_header("x-forwarded-proto", "http")?;
        // nginx's $host: the request's host, without a port.
        let host = upstream
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(strip_port)
            .unwrap_or("")
            .to_string();
        upstream.insert_header("x-forwarded-host", host)?;
        upstream.remove_header("connection");
        Ok(())
    }
}

/// `host:port` → `host`, `[::1]:port` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

struct Args {
    listen: String,
    upstream: SocketAddr,
    threads: usize,
    work_stealing: Option<bool>,
}

fn parse_args() -> Args {
    let usage = "usage: bench-pingora --listen ADDR:PORT --upstream HOST:PORT [--threads N] \
                 [--work-stealing on|off]";
    let (mut listen, mut upstream, mut threads, mut work_stealing) = (None, None, 1, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value; {usage}"));
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--upstream" => {
                upstream = value.to_socket_addrs().ok().and_then(|mut a| a.next());
                if upstream.is_none() {
                    panic!("--upstream {value}: not an address");
                }
            }
            "--threads" => threads = value.parse().expect("--threads N"),
            "--work-stealing" => work_stealing = Some(value == "on"),
            _ => panic!("unknown option {flag}; {usage}"),
        }
    }
    Args {
        listen: listen.expect(usage),
        upstream: upstream.expect(usage),
        threads: threads.max(1),
        work_stealing,
    }
}

fn main() {
    let args = parse_args();
    let conf = ServerConf {
        threads: args.threads,
        work_stealing: args.work_stealing.unwrap_or(false),
        // No hand-over socket or pid file shared with another Pingora on the machine, and a
        // SIGTERM that ends it at once rather than after a grace period.
        upgrade_sock: format!("/tmp/bench-pingora-{}.sock", std::process::id()),
        pid_file: format!("/tmp/bench-pingora-{}.pid", std::process::id()),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let peer = HttpPeer::new(args.upstream, false, String::new());
    let mut proxy = http_proxy_service(&server.configuration, Proxy { peer });
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run_forever();
}
