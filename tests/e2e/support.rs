//! Starting the daemon on a config of the test's own, and talking to it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use evrhost::frontend::client::RpcClient;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_evrhost");

/// A component built from `plugins/` by the host's build script.
pub fn plugin(name: &str) -> PathBuf {
    Path::new(env!("EVRHOST_PLUGINS_DIR")).join(format!("{name}.wasm"))
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Runs `evrhost ARGS…` to completion.
pub fn evrhost(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RUST_LOG", "info").output().expect("run evrhost")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running daemon; killed on drop. Its log goes to a file, readable with
/// `log()`.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `evrhost run -c` on `config` (with `{PORT}` replaced by a free
    /// port and `{echo}`, `{counter}`, … by the plugins' paths) and waits
    /// until it answers.
    pub async fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut text = config.replace("{PORT}", &port.to_string());
        for name in ["echo", "counter", "hostile", "timer"] {
            text = text.replace(&format!("{{{name}}}"), &plugin(name).display().to_string());
        }
        let path = dir.path().join("evrhost.toml");
        std::fs::write(&path, text).expect("write config");
        let log = std::fs::File::create(dir.path().join("evrhost.log")).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn evrhost run");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut daemon = Daemon { child, addr, dir };
        daemon.wait_ready().await;
        daemon
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("evrhost exited with {status} before serving:\n{}", self.log());
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "evrhost did not listen within 60 s:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn client(&self) -> RpcClient {
        RpcClient::connect(self.addr, None).await.expect("connect to evrhost")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("evrhost.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    (
        error["code"].as_i64().expect("numeric error code"),
        error["message"].as_str().expect("error message").to_string(),
    )
}
