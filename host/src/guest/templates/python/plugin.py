"""{{name}}: counts how often each text was sent and answers with the count.

Try it: `evrhost call {{name}}.wasm hello world`.
"""

import evrhost
from evrhost import Reply, Request, kv, log


class Route(evrhost.Route):
    def handle(self, req: Request) -> Reply:
        n = kv.incr(f"seen:{req.text}")
        log.info(f"{req.text} seen {n} times on {req.route}")
        return Reply.handled().retval(str(n)).data(f"{req.text} #{n}")


class Api(evrhost.Api):
    @evrhost.command("{{name}}.seen", usage="TEXT", description="how often TEXT was sent")
    def seen(self, args: str) -> str:
        return kv.get_text(f"seen:{args}") or "0"
