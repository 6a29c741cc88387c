"""Counts events per key from `key=value;key=value;…` datagrams, as the
Rust `kvcount` does, in the tenant's kv store; `kvcount.get KEY` reads a
count. It also counts the bus events it subscribed to (`kvcount.events
NAME`), and as an exec task it ticks `kvcount:ticks` every `tick_ms`."""

import evrhost
from evrhost import Event, Reply, Request, config, events, kv, log, sleep

# Keys counted from one datagram at most; the rest is ignored.
MAX_KEYS = 64


def counter(key: str) -> str:
    return f"kvcount:{key}"


class Route(evrhost.Route):
    def handle(self, req: Request) -> Reply:
        counted = 0
        segments = [s.strip() for s in req.text.split(";") if s.strip()]
        for segment in segments[:MAX_KEYS]:
            key = segment.split("=", 1)[0].strip()
            if not key:
                continue
            kv.incr(counter(key))
            counted += 1
        return Reply.handled().retval(str(counted)).data(str(counted))


class Api(evrhost.Api):
    @evrhost.command("kvcount.get", usage="KEY", description="how many datagrams named KEY")
    def get(self, args: str) -> str:
        return kv.get_text(counter(args.strip())) or "0"

    @evrhost.command("kvcount.watch", usage="EVENT", description="count the bus events called EVENT from now on")
    def watch(self, args: str) -> str:
        events.subscribe(args.strip())
        return f"watching {args.strip()}"

    @evrhost.command("kvcount.events", usage="EVENT", description="how many EVENT events arrived since kvcount.watch")
    def count_events(self, args: str) -> str:
        return kv.get_text(f"kvcount:event:{args.strip()}") or "0"


class Subscriber(evrhost.Subscriber):
    def on_event(self, event: Event) -> None:
        kv.incr(f"kvcount:event:{event.name}")


class Task(evrhost.Task):
    def run(self, worker: str) -> None:
        tick = int(config("tick_ms") or "100")
        log.info(f"kvcount task {worker} ticks every {tick} ms")
        while True:
            kv.incr("kvcount:ticks")
            sleep(tick)
