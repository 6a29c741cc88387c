//! An exec task like Kamailio's `event_route[evrexec:timer]` example: it
//! counts and sleeps, forever. `[plugin.config] interval_ms` sets the pace
//! (600 by default, as the example's `sleep("600")`).

use std::time::Duration;

use evrhost_sdk::{config, export, log, sleep, Task};

struct Timer;

impl Task for Timer {
    fn run(worker: String) -> Result<(), String> {
        let interval = config("interval_ms").and_then(|v| v.parse().ok()).unwrap_or(600);
        let mut x: u64 = 0;
        loop {
            log::info(&format!("worker {worker}: x is {x}"));
            x += 1;
            sleep(Duration::from_millis(interval)).map_err(|e| e.message())?;
        }
    }
}

export!(Timer: task);
