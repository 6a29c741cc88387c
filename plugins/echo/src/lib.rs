//! Answers every request with its own data and parameters.

use evrhost_sdk::{export, Reply, Request, Route};

struct Echo;

impl Route for Echo {
    fn handle(req: Request) -> Result<Reply, String> {
        let mut reply = Reply::handled().retval("ok").data(req.data);
        reply.params = req.params;
        Ok(reply)
    }
}

export!(Echo: route);
