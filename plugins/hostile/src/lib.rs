//! Misbehaving handlers that prove the sandbox. The route's name picks the
//! misbehaviour; `ok` answers normally, to show the plugin recovers.

use evrhost_sdk::{export, log, Reply, Request, Route};

struct Hostile;

#[inline(never)]
fn recurse(depth: u64, pad: &mut [u8; 256]) -> u64 {
    pad[(depth % 256) as usize] = depth as u8;
    // `black_box` keeps the recursion from being turned into a loop.
    1 + recurse(std::hint::black_box(depth + 1), std::hint::black_box(pad))
}

impl Route for Hostile {
    fn handle(req: Request) -> Result<Reply, String> {
        match req.route.as_str() {
            "ok" => Ok(Reply::handled().retval("ok")),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut chunk = vec![0u8; 1 << 20];
                    chunk[0] = 1;
                    hoard.push(std::hint::black_box(chunk));
                }
            }
            "recurse" => {
                let mut pad = [0u8; 256];
                Ok(Reply::handled().retval(recurse(0, &mut pad).to_string()))
            }
            "panic" => panic!("hostile plugin panics on purpose"),
            "bigreply" => Ok(Reply::handled().data(vec![b'x'; 8 << 20])),
            "logflood" => {
                let line = "x".repeat(10_000);
                for _ in 0..1_000_000 {
                    log::info(&line);
                }
                Ok(Reply::handled().retval("flooded"))
            }
            "fail" => Err("hostile plugin refuses".into()),
            // Panics on the datagram `panic`, answers the others: in a
            // batch, one bad request among good ones.
            "panicon" if req.data == b"panic" => panic!("hostile plugin panics on one request"),
            "panicon" | "shortbatch" => Ok(Reply::handled().retval(req.data_str())),
            // Slow but well-behaved: busy for `data` milliseconds.
            "spin" => {
                let ms: u64 = req.data_str().trim().parse().unwrap_or(10);
                let until = evrhost_sdk::now_us() + ms * 1000;
                while evrhost_sdk::now_us() < until {
                    std::hint::spin_loop();
                }
                Ok(Reply::handled().retval("spun"))
            }
            // Hungry but well-behaved: touches `data` MiB, then frees it.
            "grow" => {
                let mib: usize = req.data_str().trim().parse().unwrap_or(8);
                let block = std::hint::black_box(vec![1u8; mib << 20]);
                Ok(Reply::handled().retval(block.len().to_string()))
            }
            // Tries a command: `data` is "COMMAND ARGS"; the host's answer
            // or its refusal (`denied: …`, `not found: …`) is the retval.
            "call" => {
                let text = req.data_str();
                let (command, args) = text.split_once(' ').unwrap_or((&text, ""));
                let retval = match evrhost_sdk::call(command, args) {
                    Ok(text) => format!("ok: {text}"),
                    Err(e) => e.message(),
                };
                Ok(Reply::handled().retval(retval))
            }
            other => Err(format!("unknown hostile route {other}")),
        }
    }

    /// `shortbatch` breaks the batch contract: one result short.
    fn handle_batch(requests: Vec<Request>) -> Vec<Result<Reply, String>> {
        let short = requests.first().is_some_and(|r| r.route == "shortbatch");
        let mut results: Vec<_> = requests.into_iter().map(Self::handle).collect();
        if short {
            results.pop();
        }
        results
    }
}

export!(Hostile: route);
