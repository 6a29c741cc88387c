"""Answers every request with its own data and parameters, as the Rust
`echo` does; `py-echo.upper TEXT` is a command, to show an `api` export."""

import evrhost
from evrhost import Reply, Request


class Route(evrhost.Route):
    def handle(self, req: Request) -> Reply:
        return Reply.handled().retval("ok").params(req.params).data(req.data)


class Api(evrhost.Api):
    @evrhost.command("py-echo.upper", usage="TEXT", description="TEXT in capitals")
    def upper(self, args: str) -> str:
        return args.upper()
