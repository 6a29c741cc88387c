//! Logs what reaches a route, like the seed's `event_route[evrexec:udp]`
//! (`xinfo("udp socket data: [$evr(data)] from [$evr(srcip)]")`) and
//! `event_route[evrexec:test]` (`xlog("rpc command data: $evr(data)")`).

use evrhost_sdk::{export, log, Origin, Reply, Request, Route};

struct Xlog;

impl Route for Xlog {
    fn handle(req: Request) -> Result<Reply, String> {
        let data = req.data_str();
        match &req.origin {
            Origin::Udp(peer) => log::info(&format!("udp socket data: [{data}] from [{}]:{}", peer.ip, peer.port)),
            Origin::Rpc => log::info(&format!("rpc command data: {data}")),
            _ => log::info(&format!("{} data: {data}", req.route)),
        }
        Ok(Reply::handled())
    }
}

export!(Xlog: route);
