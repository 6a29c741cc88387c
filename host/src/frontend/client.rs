//! A JSON-RPC client over one keep-alive HTTP connection: `evrhost rpc`,
//! the tests and the benchmarks use it.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the response is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub struct RpcClient {
    addr: SocketAddr,
    token: Option<String>,
    sender: SendRequest<Full<Bytes>>,
    next_id: u64,
}

impl RpcClient {
    pub async fn connect(addr: SocketAddr, token: Option<String>) -> Result<RpcClient, ClientError> {
        let sender = Self::open(addr).await?;
        Ok(RpcClient { addr, token, sender, next_id: 1 })
    }

    async fn open(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends a raw body; returns the HTTP status and the response body.
    pub async fn post(&mut self, body: impl Into<Bytes>) -> Result<(u16, Bytes), ClientError> {
        let mut req =
            Request::post("/RPC").header(HOST, self.addr.to_string()).header(CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        // The builder's inputs are all valid header values, so it cannot fail.
        let req =
            req.body(Full::new(body.into())).map_err(|e| ClientError::Status { status: 0, body: e.to_string() })?;
        // The daemon closes keep-alive connections idle too long (or the
        // longest idle one when it is full): connect again, once.
        if self.sender.ready().await.is_err() {
            self.sender = Self::open(self.addr).await?;
            self.sender.ready().await?;
        }
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Calls a method; returns the whole response document (result or error).
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let body = serde_json::to_vec(&json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}))?;
        let (status, body) = self.post(body).await?;
        if status != 200 {
            return Err(ClientError::Status { status, body: String::from_utf8_lossy(&body).into_owned() });
        }
        Ok(serde_json::from_slice(&body)?)
    }
}
