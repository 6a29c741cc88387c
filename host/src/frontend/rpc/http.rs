//! JSON-RPC over HTTP/1.1 (POST, keep-alive), loopback by default, with an
//! optional bearer token.
//!
//! At most `MAX_CONNECTIONS` are served; past it, a new connection closes
//! the one idle the longest (never one with a request in progress), so
//! that idle connections — a client's spare keep-alives, or an attacker's
//! thousand sockets that never send a byte — cannot lock real work out.
//! A connection that sends no complete request head within 30 s (hyper's
//! header timeout, also between keep-alive requests) is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::jsonrpc::{self, Server};
use crate::frontend::metrics::Registry;
use crate::sync::lock;

/// A request body over this is refused with 413.
pub const MAX_BODY: usize = 1 << 20;
/// Connections served at once; past it the longest idle one is closed.
const MAX_CONNECTIONS: usize = 1024;

/// One connection, as eviction sees it.
struct Conn {
    /// Requests in progress.
    busy: AtomicU32,
    /// When it last finished a request (or was accepted), in ms since the
    /// listener started.
    idle_since: AtomicU64,
    close: CancellationToken,
}

/// The connections being served.
struct Conns {
    started: Instant,
    next: AtomicU64,
    all: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(self.now()),
            close: CancellationToken::new(),
        });
        lock(&self.all).insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        lock(&self.all).remove(&id);
    }

    /// Makes room for one more: false when every connection is busy.
    fn make_room(&self) -> bool {
        let all = lock(&self.all);
        if all.len() < MAX_CONNECTIONS {
            return true;
        }
        let oldest = all
            .values()
            .filter(|c| c.busy.load(Relaxed) == 0 && !c.close.is_cancelled())
            .min_by_key(|c| c.idle_since.load(Relaxed));
        match oldest {
            Some(conn) => {
                conn.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves until the task is dropped. The listener comes from `bind`; it
/// joins the reactor of the runtime this runs on (the RPC thread's).
pub async fn serve(listener: std::net::TcpListener, s: Arc<Server>, metrics: Arc<Registry>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "the RPC listener cannot join the runtime; no JSON-RPC over HTTP");
            return;
        }
    };
    let token: Option<Arc<str>> = s.settings.token.clone().map(Into::into);
    let conns = Arc::new(Conns { started: Instant::now(), next: AtomicU64::new(0), all: Mutex::default() });
    let mut refused = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: wait rather than spin.
                tracing::warn!(error = %e, "rpc accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !conns.make_room() {
            // Every one of them is working: this one waits for none.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, max = MAX_CONNECTIONS, "rpc: every connection is busy; closing a new one");
            }
            continue;
        }
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let (s, metrics, token) = (s.clone(), metrics.clone(), token.clone());
        let (id, conn) = conns.add();
        let conns = conns.clone();
        // Only a peer that got past the token makes the daemon tell its
        // subscribers it went away: 401s cannot be turned into a flood of
        // E_CORE_TCP_DISCONNECT events.
        let authorized = Arc::new(AtomicBool::new(token.is_none()));
        tokio::spawn(async move {
            let bus = s.dispatcher.bus().clone();
            let seen = authorized.clone();
            let (state, clock) = (conn.clone(), conns.clone());
            let service = service_fn(move |req| {
                let (s, metrics, token, seen) = (s.clone(), metrics.clone(), token.clone(), seen.clone());
                let (state, clock) = (state.clone(), clock.clone());
                state.busy.fetch_add(1, Relaxed);
                async move {
                    let response = respond(&s, &metrics, token.as_deref(), &seen, req).await;
                    state.idle_since.store(clock.now(), Relaxed);
                    state.busy.fetch_sub(1, Relaxed);
                    Ok::<_, Infallible>(response)
                }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(served);
            let result = tokio::select! {
                result = served.as_mut() => result,
                _ = conn.close.cancelled() => {
                    // Evicted while idle: closes at once (a request that
                    // slipped in first is finished).
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "rpc connection ended with an error");
            }
            conns.remove(id);
            if authorized.load(Relaxed) {
                crate::frontend::disconnected(&bus, local, Some(peer), "tcp");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn authorized(token: Option<&str>, req: &Request<Incoming>) -> bool {
    let Some(token) = token else { return true };
    let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Length and content compared without an early exit.
    given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0
    })
}

async fn respond(
    s: &Server,
    metrics: &Registry,
    token: Option<&str>,
    seen: &AtomicBool,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    if authorized(token, &req) {
        seen.store(true, Relaxed);
    } else {
        return reply(
            StatusCode::UNAUTHORIZED,
            JSON,
            r#"{"jsonrpc":"2.0","error":{"code":401,"message":"Unauthorized"},"id":null}"#,
        );
    }
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/" | "/RPC" | "/rpc") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    return reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        JSON,
                        format!(
                            r#"{{"jsonrpc":"2.0","error":{{"code":-32600,"message":"request body over {MAX_BODY} bytes"}},"id":null}}"#
                        ),
                    )
                }
            };
            match jsonrpc::handle(s, &body).await {
                Some(out) => reply(StatusCode::OK, JSON, out),
                None => reply(StatusCode::NO_CONTENT, JSON, Bytes::new()),
            }
        }
        (&Method::GET, "/health") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/metrics") => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics.render(&s.dispatcher)),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "POST JSON-RPC 2.0 to /RPC\n"),
    }
}

/// Binds the listener (non-blocking, for `serve`); the address in the
/// error names what failed.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let context = |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(context)?;
    // As tokio's own bind: a restart finds the port free at once, and a
    // burst of connects waits in a backlog as deep as MAX_CONNECTIONS.
    socket.set_reuse_address(true).map_err(context)?;
    socket.set_nonblocking(true).map_err(context)?;
    socket.bind(&addr.into()).map_err(context)?;
    socket.listen(MAX_CONNECTIONS as i32).map_err(context)?;
    Ok(socket.into())
}
