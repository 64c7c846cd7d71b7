//! A real redis-server for a test: started on a free loopback port, stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const INSTALL_HINT: &str = "redis-server is not installed: the cluster limit tests need a real \
     Redis.\n     Install it with:  sudo apt-get install -y redis-server   (or run ./.ci/run, \
     which does)";

/// One Redis server, with no persistence, its log in a temporary folder.
pub struct Redis {
    /// The URL a gateway's `server.redis_url` takes: `redis://127.0.0.1:PORT/0`.
    pub url: String,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// Starts redis-server and waits until it answers PING.
    pub async fn start() -> Redis {
        let port = crate::free_port();
        let mut redis = Redis {
            url: format!("redis://127.0.0.1:{port}/0"),
            port,
            dir: tempfile::tempdir().expect("a temporary folder"),
            child: None,
        };
        redis.run().await;
        redis
    }

    async fn run(&mut self) {
        let log = self.dir.path().join("redis.log");
        let spawned = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
            Err(e) => panic!("starting redis-server: {e}"),
        };
        self.child = Some(child);
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if self
                    .command(&["PING"])
                    .is_ok_and(|reply| reply == "+PONG\r\n")
                {
                    return;
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("redis-server exited with {status}; see {}", log.display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "redis-server did not become ready");
    }

    /// Sends one command and returns Redis's reply as it came (RESP text).
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes())?;
        let mut reply = vec![0; 64 << 10];
        let n = stream.read(&mut reply)?;
        reply.truncate(n);
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// Stops the server (it keeps nothing; [`Redis::restart`] starts it empty).
    pub fn kill(&mut self) {
        crate::kill_child(&mut self.child);
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
