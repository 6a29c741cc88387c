//! Kamailio 5.6's evrexec + app_lua `lua_run`, the anchor evrhost's UDP
//! route is measured against (`host/benches/kamailio/`, copied from the
//! anchor's setup): its own processes, started and stopped here, counted
//! through its JSON-RPC datagram socket (`htable.get ["cnt","rx"]`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use crate::load::{children, process_cpu};
use crate::sides::free_udp_port;
use crate::trial::Side;

const MODULES: &str = "/usr/lib/x86_64-linux-gnu/kamailio/modules/app_lua.so";
pub const INSTALL: &str = "apt-get install -y kamailio kamailio-lua-modules";

/// Why Kamailio cannot be run here, if it cannot.
pub fn missing() -> Option<String> {
    let found = Command::new("kamailio").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !found.is_ok_and(|s| s.success()) {
        return Some("kamailio is not installed".into());
    }
    (!Path::new(MODULES).exists()).then(|| format!("{MODULES} is missing (kamailio-lua-modules)"))
}

/// Whether `chrt -f 10` works here (root, or CAP_SYS_NICE).
pub fn fifo_allowed() -> bool {
    Command::new("chrt").args(["-f", "10", "true"]).status().is_ok_and(|s| s.success())
}

/// A running Kamailio, stopped on drop.
pub struct Kamailio {
    child: Child,
    pub udp: SocketAddr,
    rpc: SocketAddr,
    socket: UdpSocket,
    log: PathBuf,
    id: u64,
}

/// net.core.rmem_default, which sizes the receive buffer of a socket that
/// does not ask (evrexec's).
const RMEM_DEFAULT: &str = "/proc/sys/net/core/rmem_default";

impl Kamailio {
    /// Starts it under `chrt -f 10` when `fifo`, with its data socket's
    /// receive buffer at `rcvbuf` bytes when that can be arranged (see
    /// `start`'s notes; None: the machine's default).
    pub fn start(dir: &Path, fifo: bool, rcvbuf: Option<usize>) -> anyhow::Result<(Kamailio, String)> {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/kamailio");
        let run = dir.join("kamailio");
        std::fs::create_dir_all(&run)?;
        let udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
        let rpc: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
        let log = dir.join("kamailio.log");
        let defines = [
            format!("RUNDIR=\"{}\"", run.display()),
            format!("CTL_SOCK=\"unix:{}\"", run.join("ctl").display()),
            format!("LUA_SCRIPT=\"{}\"", config.join("handler.lua").display()),
            format!("RPC_SOCK=\"udp:{rpc}\""),
            format!("EVR_EXEC=\"name=evrexec:udp;sockaddr=udp:{udp};workers=1;\""),
        ];
        let mut command = if fifo {
            let mut c = Command::new("chrt");
            c.args(["-f", "10", "kamailio"]);
            c
        } else {
            Command::new("kamailio")
        };
        command.args(["-DD", "-E", "-f", "kamailio-luarun.cfg"]).current_dir(&config);
        for d in &defines {
            command.arg("-A").arg(d);
        }
        // evrexec sets no SO_RCVBUF: its socket gets rmem_default, which is
        // raised to evrhost's buffer while Kamailio opens it, and put back.
        let old = std::fs::read_to_string(RMEM_DEFAULT).ok().map(|s| s.trim().to_string());
        let raised = rcvbuf.is_some_and(|size| std::fs::write(RMEM_DEFAULT, size.to_string()).is_ok());
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).spawn();
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut kamailio = Kamailio { child: child.context("kamailio")?, udp, rpc, socket, log, id: 0 };
        let ready = kamailio.wait_ready(Duration::from_secs(15));
        if raised {
            if let Some(old) = &old {
                let _ = std::fs::write(RMEM_DEFAULT, old);
            }
        }
        ready?;
        let buffer = match (raised, rcvbuf) {
            (true, Some(size)) => {
                format!("its data socket's buffer {size} bytes (rmem_default raised while it started)")
            }
            _ => format!("its data socket's buffer rmem_default ({} bytes)", old.as_deref().unwrap_or("?")),
        };
        let how = format!(
            "Kamailio: {} processes, evrexec workers=1{}, {buffer}",
            1 + children(kamailio.child.id()).len(),
            if fifo { ", under chrt -f 10" } else { "" },
        );
        Ok((kamailio, how))
    }

    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(anyhow!("kamailio exited ({status}): {}", self.log_tail()));
            }
            if self.count().is_ok() {
                return Ok(());
            }
            if start.elapsed() > within {
                return Err(anyhow!("kamailio did not answer htable.get within {within:?}: {}", self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// `htable.get ["cnt","rx"]` over its JSON-RPC datagram socket.
    fn count(&mut self) -> anyhow::Result<u64> {
        self.id += 1;
        let request = format!(r#"{{"jsonrpc":"2.0","method":"htable.get","params":["cnt","rx"],"id":{}}}"#, self.id);
        self.socket.send_to(request.as_bytes(), self.rpc)?;
        let mut buf = [0u8; 4096];
        loop {
            let (n, _) = self.socket.recv_from(&mut buf)?;
            let doc: serde_json::Value = serde_json::from_slice(&buf[..n])?;
            // An answer to an earlier, timed-out request: skip it.
            if doc["id"].as_u64() != Some(self.id) {
                continue;
            }
            if let Some(v) = doc["result"]["item"]["value"].as_u64() {
                return Ok(v);
            }
            // Before the first datagram the key does not exist yet.
            if doc["error"].is_object() {
                return Ok(0);
            }
            return Err(anyhow!("htable.get answered {doc}"));
        }
    }

    fn pids(&self) -> Vec<u32> {
        let main = self.child.id();
        std::iter::once(main).chain(children(main)).collect()
    }
}

impl Side for Kamailio {
    fn name(&self) -> &'static str {
        "kamailio"
    }

    fn addr(&self) -> SocketAddr {
        self.udp
    }

    fn handled(&mut self) -> anyhow::Result<u64> {
        let mut last = anyhow!("no answer");
        for _ in 0..3 {
            match self.count() {
                Ok(n) => return Ok(n),
                Err(e) => last = e,
            }
        }
        Err(last.context("kamailio htable.get"))
    }

    fn cpu(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([("kamailio".to_string(), self.outside_cpu())])
    }

    fn outside_cpu(&self) -> f64 {
        self.pids().into_iter().map(process_cpu).sum()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // SIGTERM: the main process stops its children.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
