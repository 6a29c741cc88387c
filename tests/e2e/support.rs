//! Starting the daemon on a config of the test's own, and talking to it.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use evrhost::frontend::client::RpcClient;
use evrhost::harness::{SpawnError, Spawned};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_evrhost");

pub use evrhost::harness::plugin;

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A loopback UDP port nobody uses right now.
pub fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("local addr").port()
}

/// Runs `evrhost ARGS…` to completion (a `run` with a kv store of its own).
pub fn evrhost(args: &[&str]) -> Output {
    let state = tempfile::tempdir().expect("temp dir");
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env("XDG_STATE_HOME", state.path())
        .output()
        .expect("run evrhost")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running daemon; killed on drop. Its log goes to a file, readable with
/// `log()`.
pub struct Daemon {
    process: Spawned,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `evrhost run -c` on `config` (with `{PORT}` replaced by a free
    /// port, `{UDP}` by a free UDP port, `{DIR}` by the daemon's directory
    /// and `{echo}`, `{counter}`, … by the plugins' paths) and waits until
    /// it answers.
    pub async fn start(config: &str) -> Daemon {
        // A free port may be taken by another test's daemon before this one
        // binds it: then this one exits, and another port is tried.
        for attempt in 1.. {
            match Daemon::try_start(config).await {
                Ok(daemon) => return daemon,
                Err(SpawnError::Exited { log, .. }) if log.contains("cannot listen") && attempt < 3 => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    async fn try_start(config: &str) -> Result<Daemon, SpawnError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let text = evrhost::harness::with_plugin_paths(
            &config
                .replace("{PORT}", &port.to_string())
                .replace("{UDP}", &free_udp_port().to_string())
                .replace("{DIR}", &dir.path().display().to_string()),
        );
        std::fs::write(dir.path().join("evrhost.toml"), text).expect("write config");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let process = Daemon::spawn(dir.path(), addr).await?;
        Ok(Daemon { process, addr, dir })
    }

    /// Runs the config in `dir` and waits until it answers on `addr`.
    async fn spawn(dir: &Path, addr: SocketAddr) -> Result<Spawned, SpawnError> {
        let path = dir.join("evrhost.toml");
        let log = dir.join("evrhost.log");
        // The embedded kv store defaults to $XDG_STATE_HOME/evrhost: each
        // daemon gets its own, in its directory.
        let state = dir.display().to_string();
        tokio::task::spawn_blocking(move || {
            let env = [("RUST_LOG", "info"), ("NO_COLOR", "1"), ("XDG_STATE_HOME", state.as_str())];
            // A cold compile of a Python component (18 MB) took over 60 s
            // on a slow 2-core VM with other tests compiling beside it.
            Spawned::start(Path::new(BIN), &path, addr, &log, &env, Duration::from_secs(180))
        })
        .await
        .expect("the start task")
    }

    /// SIGKILL; the directory (config, log, kv store) is kept.
    pub fn kill(self) -> (tempfile::TempDir, SocketAddr) {
        let Daemon { process, addr, dir } = self;
        drop(process);
        (dir, addr)
    }

    /// SIGKILL (nothing flushed, nothing closed), then the same config
    /// again on the same directory, ports and kv store.
    pub async fn kill_and_restart(self) -> Daemon {
        let Daemon { process, addr, dir } = self;
        drop(process);
        let process = Daemon::spawn(dir.path(), addr).await.unwrap_or_else(|e| panic!("restart: {e}"));
        Daemon { process, addr, dir }
    }

    pub async fn client(&self) -> RpcClient {
        RpcClient::connect(self.addr, None).await.expect("connect to evrhost")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("evrhost.log")).unwrap_or_default()
    }

    /// The config as the daemon got it.
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("evrhost.toml")).unwrap_or_default()
    }

    /// Waits up to `within` for a log line containing every one of `parts`.
    pub async fn wait_for_log(&self, parts: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "no log line with {parts:?} within {within:?}:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The UDP address of the config's `sockaddr = "udp:…"` number `n`.
    pub fn udp_addr(&self, n: usize) -> SocketAddr {
        let config = self.config();
        let sockaddr = config
            .lines()
            .filter_map(|l| l.trim().strip_prefix("sockaddr = \"udp:"))
            .nth(n)
            .unwrap_or_else(|| panic!("no sockaddr number {n} in the config"));
        evrhost::config::parse_sockaddr(&format!("udp:{}", sockaddr.trim_end_matches('"'))).expect("sockaddr")
    }

    /// `GET /metrics`: the status line and the whole response.
    pub fn scrape(&self) -> (String, String) {
        use std::io::{Read, Write};
        let mut req = std::net::TcpStream::connect(self.addr).expect("connect");
        req.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
        let mut body = String::new();
        req.read_to_string(&mut body).expect("read");
        (body.lines().next().unwrap_or("").to_string(), body)
    }

    /// SIGTERM, as an init system stops it.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.process.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }

    pub fn is_running(&mut self) -> bool {
        self.process.alive()
    }

    /// File descriptors the daemon holds open.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.pid())).map_or(0, |d| d.count())
    }
}

/// The `result` of a response, or a panic showing the error.
pub fn result(response: &Value) -> &Value {
    match response.get("result") {
        Some(result) => result,
        None => panic!("expected a result, got {response}"),
    }
}

/// The `error` of a response as (code, message), or a panic.
pub fn error(response: &Value) -> (i64, String) {
    let error = response.get("error").unwrap_or_else(|| panic!("expected an error, got {response}"));
    (error["code"].as_i64().expect("numeric error code"), error["message"].as_str().expect("error message").to_string())
}

/// The value of the first sample of `metrics` whose line starts with `name`.
pub fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
}
