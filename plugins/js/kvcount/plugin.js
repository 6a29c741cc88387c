// Counts events per key from `key=value;key=value;…` datagrams, as the
// Rust `kvcount` does, in the tenant's kv store; `kvcount.get KEY` reads a
// count. It also counts the bus events it subscribed to (`kvcount.events
// NAME`), and as an exec task it ticks `kvcount:ticks` every `tick_ms`.

import { config, defineApi, defineRoute, defineSubscriber, defineTask, events, kv, log, Reply, sleep } from "evrhost";

// Keys counted from one datagram at most; the rest is ignored.
const MAX_KEYS = 64;

const counter = (key) => `kvcount:${key}`;

export const route = defineRoute((req) => {
  let counted = 0;
  for (const segment of req.text.split(";").map((s) => s.trim()).filter((s) => s.length > 0).slice(0, MAX_KEYS)) {
    const key = segment.split("=")[0].trim();
    if (key.length === 0) continue;
    kv.incr(counter(key));
    counted++;
  }
  return Reply.handled().retval(String(counted)).data(String(counted));
});

export const api = defineApi({
  "kvcount.get": {
    usage: "KEY",
    description: "how many datagrams named KEY",
    run: (args) => kv.getText(counter(args.trim())) ?? "0",
  },
  "kvcount.watch": {
    usage: "EVENT",
    description: "count the bus events called EVENT from now on",
    run: (args) => {
      events.subscribe(args.trim());
      return `watching ${args.trim()}`;
    },
  },
  "kvcount.events": {
    usage: "EVENT",
    description: "how many EVENT events arrived since kvcount.watch",
    run: (args) => kv.getText(`kvcount:event:${args.trim()}`) ?? "0",
  },
});

export const subscriber = defineSubscriber((event) => {
  kv.incr(`kvcount:event:${event.name}`);
});

export const task = defineTask((worker) => {
  const tick = Number(config("tick_ms") ?? "100");
  log.info(`kvcount task ${worker} ticks every ${tick} ms`);
  for (;;) {
    kv.incr("kvcount:ticks");
    sleep(tick);
  }
});
