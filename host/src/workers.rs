//! Worker runtimes for `--workers N`: each worker is a thread with its own current-thread tokio
//! runtime and its own listening socket on the shared port (`SO_REUSEPORT`, so that the kernel
//! spreads connections), as nginx and pingora run. A connection lives on one thread from accept
//! to close, and nothing is stolen between threads, so nothing has to be synchronised for it.

use std::cell::Cell;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Pending connections each worker's socket queues before the kernel refuses more.
const BACKLOG: u32 = 1024;

thread_local! {
    /// Which worker this thread is: 1 to N on worker threads, 0 elsewhere.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker this thread is: 1 to N on a worker thread, 0 on any other.
pub fn index() -> usize {
    INDEX.get()
}

/// How many per-worker slots a shared structure keeps (such as a node's idle connections):
/// one per core and one for threads that are not workers. Worker `i` uses slot
/// `i % slots()`, so more workers than cores share slots.
pub fn slots() -> usize {
    static SLOTS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        std::thread::available_parallelism().map_or(1, usize::from) + 1
    });
    *SLOTS
}

/// Running worker threads; dropping this stops them, dropping what still runs on them.
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` worker threads, each with a current-thread runtime.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        for index in 1..=count {
            let (started, handle) = std::sync::mpsc::channel();
            let stopped = stop.clone();
            std::thread::Builder::new()
                .name(format!("weir-worker-{index}"))
                .spawn(move || {
                    INDEX.set(index);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            let _ = started.send(Ok(runtime.handle().clone()));
                            runtime.block_on(stopped.cancelled());
                        }
                        Err(error) => {
                            let _ = started.send(Err(error));
                        }
                    }
                })?;
            let handle = handle.recv().map_err(|_| {
                std::io::Error::other(format!("worker {index} ended before it started"))
            })??;
            handles.push(handle);
        }
        Ok(Workers { handles, stop })
    }

    /// The workers' runtimes, in order.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `count` listening sockets on one address, all with `SO_REUSEPORT`; with port 0 they share
/// the port the first one was given. Each is handed to its worker's runtime with
/// [`TcpListener::from_std`].
pub fn shared_listeners(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut bound = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = if bound.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(bound)?;
        let listener: TcpListener = socket.listen(BACKLOG)?;
        bound = listener.local_addr()?;
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_share_the_port_the_first_was_given() {
        let listeners = shared_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert_ne!(ports[0], 0);
        assert!(ports.iter().all(|&p| p == ports[0]), "{ports:?}");
    }

    #[test]
    fn each_worker_runs_on_its_own_numbered_thread() {
        let workers = Workers::start(2).unwrap();
        let seen: Vec<(usize, String)> = workers
            .handles()
            .iter()
            .map(|handle| {
                let (sender, seen) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let thread = std::thread::current().name().unwrap_or("").to_owned();
                    sender.send((index(), thread)).unwrap();
                });
                seen.recv().unwrap()
            })
            .collect();
        assert_eq!(
            seen,
            [(1, "weir-worker-1".into()), (2, "weir-worker-2".into())]
        );
        assert_eq!(index(), 0);
    }
}
