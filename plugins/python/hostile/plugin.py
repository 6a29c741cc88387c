"""A Python plugin that misbehaves on request, by route name (its last `:`
segment, so `t1:loop` loops too): `loop` never
returns, `bomb` allocates without bound, `raise` raises, `ok` is
well-behaved, `kv` answers with the kind of the HostError a kv call raised
(run it with kv denied)."""

import evrhost
from evrhost import HostError, Reply, Request, kv


class Route(evrhost.Route):
    def handle(self, req: Request) -> Reply:
        kind = req.route.split(":")[-1]
        if kind == "ok":
            return Reply.handled().retval("ok")
        if kind == "loop":
            while True:
                pass
        if kind == "bomb":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if kind == "raise":
            raise ValueError("py-hostile raises on purpose")
        if kind == "kv":
            try:
                kv.incr("hostile")
                return Reply.handled().retval("allowed")
            except HostError as e:
                return Reply.handled().retval(e.kind)
        raise ValueError(f"unknown hostile route {kind}")
