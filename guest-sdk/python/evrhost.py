"""The evrhost SDK for Python plugins (CPython in componentize-py, built by
`evrhost build`).

A plugin is a module, `plugin.py`, that defines any of the classes
``Route``, ``Api``, ``Subscriber`` and ``Task``, each a subclass of the
one here of the same name::

    import evrhost
    from evrhost import Reply, Request

    class Route(evrhost.Route):
        def handle(self, req: Request) -> Reply:
            return Reply.handled().retval("ok").data(req.data)

Raise to fail a call: the message reaches the caller and the instance stays
usable. Host calls that fail raise :class:`HostError`, naming the kind.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from componentize_py_types import Err
from wit_world.imports import commands as _commands
from wit_world.imports import events as _events
from wit_world.imports import fetch as _fetch
from wit_world.imports import host as _host
from wit_world.imports import kv as _kv
from wit_world.imports import messages as _messages
from wit_world.imports import types as _types

Headers = List[Tuple[str, str]]


# ---- errors ----------------------------------------------------------------

_KINDS = {
    _types.HostError_Denied: "denied",
    _types.HostError_Invalid: "invalid",
    _types.HostError_NotFound: "not-found",
    _types.HostError_Failed: "failed",
}


class HostError(Exception):
    """A host call refused or failed; ``kind`` is denied, invalid, not-found or failed."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def _host_call(f, *args):
    try:
        return f(*args)
    except Err as e:
        raise HostError(_KINDS.get(type(e.value), "failed"), str(getattr(e.value, "value", e.value))) from None


def _failure(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _pairs(headers) -> Headers:
    if headers is None:
        return []
    if isinstance(headers, dict):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def _first(headers: Headers, name: str) -> Optional[str]:
    for k, v in headers:
        if k == name:
            return v
    return None


def _bytes(value: Union[bytes, bytearray, str]) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


# ---- requests and replies ----------------------------------------------------


@dataclass
class Origin:
    """Where a request came from: ``kind`` is cli, startup, udp, rpc, erlang, yate or event."""

    kind: str
    ip: Optional[str] = None
    port: Optional[int] = None
    #: The startup worker, the Erlang node or the event's name.
    name: Optional[str] = None
    #: For yate: the engine message's id, time, name and retvalue.
    message: Optional[object] = None


def _origin(o) -> Origin:
    if isinstance(o, _types.Origin_Udp):
        return Origin("udp", ip=o.value.ip, port=o.value.port)
    if isinstance(o, _types.Origin_Startup):
        return Origin("startup", name=o.value)
    if isinstance(o, _types.Origin_Erlang):
        return Origin("erlang", name=o.value)
    if isinstance(o, _types.Origin_Event):
        return Origin("event", name=o.value)
    if isinstance(o, _types.Origin_Yate):
        return Origin("yate", message=o.value)
    return Origin("rpc" if isinstance(o, _types.Origin_Rpc) else "cli")


class Request:
    """One call of an event route."""

    def __init__(self, raw):
        self.route: str = raw.route
        self.data: bytes = bytes(raw.data)
        self.params: Headers = list(raw.params)
        self.origin: Origin = _origin(raw.origin)

    @property
    def text(self) -> str:
        """The payload as text (malformed UTF-8 becomes U+FFFD)."""
        return self.data.decode(errors="replace")

    def param(self, name: str) -> Optional[str]:
        """The first parameter called ``name``, or None."""
        return _first(self.params, name)


class Reply:
    """The answer to a request, built step by step: ``Reply.handled().retval("ok")``."""

    def __init__(self, handled: bool):
        self._handled = handled
        self._retval = ""
        self._params: Headers = []
        self._unset: List[str] = []
        self._data: Optional[bytes] = None

    @staticmethod
    def handled() -> "Reply":
        """Stops dispatch: later handlers of the route are not called."""
        return Reply(True)

    @staticmethod
    def declined() -> "Reply":
        """Lets later handlers of the route run."""
        return Reply(False)

    def retval(self, text) -> "Reply":
        self._retval = str(text)
        return self

    def param(self, name: str, value) -> "Reply":
        self._params.append((str(name), str(value)))
        return self

    def params(self, headers) -> "Reply":
        self._params.extend(_pairs(headers))
        return self

    def unset(self, name: str) -> "Reply":
        self._unset.append(str(name))
        return self

    def data(self, value: Union[bytes, bytearray, str]) -> "Reply":
        """Bytes for the front-end to send back."""
        self._data = _bytes(value)
        return self

    def _wit(self):
        return _types.Reply(self._handled, self._retval, self._params, self._unset, self._data)


def _reply(value):
    if isinstance(value, Reply):
        return value._wit()
    if isinstance(value, str):
        return Reply.handled().retval(value)._wit()
    if value is None:
        return Reply.declined()._wit()
    raise TypeError(f"a route handler returned {type(value).__name__}: return a Reply, a str, or None")


# ---- events ------------------------------------------------------------------


@dataclass
class Event:
    """An event on the bus: ``Event("CUSTOM", "my::thing").header("k", "v")``."""

    name: str
    subclass: Optional[str] = None
    headers: Headers = field(default_factory=list)
    body: Optional[str] = None

    def header(self, name: str, value) -> "Event":
        self.headers.append((str(name), str(value)))
        return self

    def get(self, name: str) -> Optional[str]:
        """The first header called ``name``, or None."""
        return _first(self.headers, name)

    def with_body(self, body: str) -> "Event":
        self.body = body
        return self


class events:
    """The event bus."""

    @staticmethod
    def fire(event: Event) -> None:
        raw = _types.Event(event.name, event.subclass, _pairs(event.headers), event.body)
        _host_call(_events.fire, raw)

    @staticmethod
    def subscribe(name: str, subclass: Optional[str] = None) -> None:
        _host_call(_events.subscribe, name, subclass)

    @staticmethod
    def unsubscribe(name: str, subclass: Optional[str] = None) -> bool:
        """True when a subscription was removed."""
        return _host_call(_events.unsubscribe, name, subclass)

    @staticmethod
    def filter(command: str) -> str:
        """mod_event_socket's filter commands; returns what was done."""
        return _host_call(_events.filter, command)


# ---- host services -------------------------------------------------------------


class log:
    """Lines in the plugin's log, tagged with plugin, tenant and route."""

    @staticmethod
    def debug(message) -> None:
        _host.log(_types.Level.DEBUG, str(message))

    @staticmethod
    def info(message) -> None:
        _host.log(_types.Level.INFO, str(message))

    @staticmethod
    def notice(message) -> None:
        _host.log(_types.Level.NOTICE, str(message))

    @staticmethod
    def warn(message) -> None:
        _host.log(_types.Level.WARN, str(message))

    @staticmethod
    def error(message) -> None:
        _host.log(_types.Level.ERROR, str(message))

    @staticmethod
    def crit(message) -> None:
        _host.log(_types.Level.CRIT, str(message))


def config(key: str) -> Optional[str]:
    """A value from the plugin's ``[plugin.config]`` table, or None."""
    return _host.config(key)


def now() -> int:
    """Microseconds since the Unix epoch."""
    return _host.now()


def sleep(ms: int) -> None:
    """Suspends an exec task for ``ms`` milliseconds; other exports may not sleep."""
    _host_call(_host.sleep, ms)


class kv:
    """The tenant's key-value store. Values are bytes; text is stored as UTF-8."""

    @staticmethod
    def get(key: str) -> Optional[bytes]:
        return _host_call(_kv.get, key)

    @staticmethod
    def get_text(key: str) -> Optional[str]:
        value = kv.get(key)
        return None if value is None else value.decode(errors="replace")

    @staticmethod
    def set(key: str, value: Union[bytes, bytearray, str]) -> None:
        _host_call(_kv.set, key, _bytes(value))

    @staticmethod
    def delete(key: str) -> bool:
        """True when the key existed."""
        return _host_call(_kv.delete, key)

    @staticmethod
    def incr(key: str, delta: int = 1) -> int:
        """Adds ``delta`` to a decimal counter and returns the new value."""
        return _host_call(_kv.incr, key, delta)


def call(command: str, args: str = "") -> str:
    """Calls an API command: one of the tenant's plugins' or a granted built-in."""
    return _host_call(_commands.call, command, args)


def fetch(section: str, tag: str = "", key: str = "", value: str = "", params=None) -> str:
    """Asks the processes bound to ``section`` for a document (FreeSWITCH XML search)."""
    return _host_call(_fetch.fetch, section, tag, key, value, _pairs(params))


class messages:
    """Messages for the engine evrhost is a module of (Yate)."""

    @staticmethod
    def dispatch(name: str, retvalue: str = "", params=None):
        """Dispatches and waits; the answer has handled, name, retvalue and params."""
        return _host_call(_messages.dispatch, _types.Message(name, retvalue, _pairs(params)))

    @staticmethod
    def enqueue(name: str, retvalue: str = "", params=None) -> None:
        _host_call(_messages.enqueue, _types.Message(name, retvalue, _pairs(params)))


# ---- what a plugin implements ----------------------------------------------------


class Route:
    """Handles calls of event routes: return a Reply, a str (handled, as retval) or None (declined)."""

    def handle(self, req: Request):
        raise NotImplementedError("Route.handle")


@dataclass
class Command:
    name: str
    usage: str
    description: str
    run: Callable[[str], str]


def command(name: str, usage: str = "", description: str = ""):
    """Marks an ``Api`` method as the command ``name``; it takes the argument text."""

    def mark(method):
        method._evrhost_command = (name, usage, description)
        return method

    return mark


class Api:
    """API commands: methods marked with ``@evrhost.command("name.verb", usage, description)``."""

    def _table(self) -> Dict[str, Command]:
        table = {}
        for attr in dir(type(self)):
            method = getattr(self, attr)
            mark = getattr(method, "_evrhost_command", None)
            if mark is not None:
                table[mark[0]] = Command(mark[0], mark[1], mark[2], method)
        return table


class Subscriber:
    """Receives the events the plugin subscribed to; a raise is logged, not lost."""

    def on_event(self, event: Event) -> None:
        raise NotImplementedError("Subscriber.on_event")


class Task:
    """An exec task; ``worker`` is its index as text. It may run forever, sleeping."""

    def run(self, worker: str) -> None:
        raise NotImplementedError("Task.run")


# ---- adapters the build's entry module exports -------------------------------------


def _adapters(plugin, listed: List[str]) -> dict:
    """The classes componentize-py exports, each wrapping the plugin's own."""
    bases = {"Route": Route, "Api": Api, "Subscriber": Subscriber, "Task": Task}
    out = {}
    for name in listed:
        own = getattr(plugin, name, None)
        if not (isinstance(own, type) and issubclass(own, bases[name])):
            raise TypeError(
                f"plugin.py defines no class {name}(evrhost.{name}), which plugin.toml lists: "
                f"add it or drop `{name.lower()}` from `exports`"
            )
        out[name] = globals()[f"_{name}Export"].bind(own)
    return out


class _Export:
    inner = None

    @classmethod
    def bind(cls, own):
        return type(cls.__name__, (cls,), {"inner": own()})


class _RouteExport(_Export):
    def handle(self, request):
        try:
            value = self.inner.handle(Request(request))
            return _reply(value)
        except Err:
            raise
        except Exception as e:
            raise Err(_failure(e))


class _ApiExport(_Export):
    def commands(self):
        return [_types.CommandInfo(c.name, c.usage, c.description) for c in self.inner._table().values()]

    def execute(self, command: str, args: str) -> str:
        entry = self.inner._table().get(command)
        if entry is None:
            raise Err(f"unknown command {command}")
        try:
            value = entry.run(args)
        except Exception as e:
            raise Err(_failure(e))
        return value if isinstance(value, str) else str(value)


class _SubscriberExport(_Export):
    def on_event(self, event) -> None:
        try:
            self.inner.on_event(Event(event.name, event.subclass, list(event.headers), event.body))
        except Exception as e:
            log.error(f"subscriber failed on {event.name}: {_failure(e)}")


class _TaskExport(_Export):
    def run(self, worker: str) -> None:
        try:
            self.inner.run(worker)
        except Exception as e:
            raise Err(_failure(e))
