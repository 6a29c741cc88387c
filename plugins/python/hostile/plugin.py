"""A Python plugin that misbehaves on request, by route name: `loop` never
returns, `bomb` allocates without bound, `raise` raises, `ok` is
well-behaved, `kv` answers with the kind of the HostError a kv call raised
(run it with kv denied)."""

import evrhost
from evrhost import HostError, Reply, Request, kv


class Route(evrhost.Route):
    def handle(self, req: Request) -> Reply:
        if req.route == "ok":
            return Reply.handled().retval("ok")
        if req.route == "loop":
            while True:
                pass
        if req.route == "bomb":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if req.route == "raise":
            raise ValueError("py-hostile raises on purpose")
        if req.route == "kv":
            try:
                kv.incr("hostile")
                return Reply.handled().retval("allowed")
            except HostError as e:
                return Reply.handled().retval(e.kind)
        raise ValueError(f"unknown hostile route {req.route}")
