// The evrhost SDK for JavaScript plugins (QuickJS, built by `evrhost build`).
//
// A plugin is an ES module that exports any of `route`, `api`,
// `subscriber` and `task`, each made by the matching `define…` below:
//
//     import { defineRoute, Reply } from "evrhost";
//     export const route = defineRoute((req) => Reply.handled().retval("ok").data(req.bytes));
//
// Throw to fail a call: the message reaches the caller and the instance
// stays usable. Host calls that fail throw a `HostError` naming the kind.
// Integers from the host (`kv.incr`, `now`) are JS Numbers: exact to 2^53.

import host from "evrhost:plugin/host@0.2.0";
import rawKv from "evrhost:plugin/kv@0.2.0";
import rawEvents from "evrhost:plugin/events@0.2.0";
import rawCommands from "evrhost:plugin/commands@0.2.0";
import rawFetch from "evrhost:plugin/fetch@0.2.0";
import rawMessages from "evrhost:plugin/messages@0.2.0";

// ---- text ----------------------------------------------------------------

// QuickJS has no TextEncoder/TextDecoder; plugins see bytes as Uint8Array
// and text as strings, so the SDK converts with these two.

/** UTF-8 bytes of `text`. */
export function encode(text) {
  const s = String(text);
  const out = [];
  for (let i = 0; i < s.length; i++) {
    let c = s.codePointAt(i);
    if (c > 0xffff) i++;
    if (c >= 0xd800 && c <= 0xdfff) c = 0xfffd; // a lone surrogate
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
  }
  return Uint8Array.from(out);
}

/** Text of UTF-8 `bytes`; malformed sequences become U+FFFD. */
export function decode(bytes) {
  let out = "";
  let chunk = [];
  const flush = () => {
    out += String.fromCodePoint(...chunk);
    chunk = [];
  };
  for (let i = 0; i < bytes.length; ) {
    const b = bytes[i];
    const need = b < 0x80 ? 0 : b >= 0xc2 && b < 0xe0 ? 1 : b >= 0xe0 && b < 0xf0 ? 2 : b >= 0xf0 && b < 0xf5 ? 3 : -1;
    let c = need === 0 ? b : need === 1 ? b & 31 : need === 2 ? b & 15 : b & 7;
    let ok = need >= 0;
    for (let k = 1; ok && k <= need; k++) {
      const n = bytes[i + k];
      if (n === undefined || (n & 0xc0) !== 0x80) ok = false;
      else c = (c << 6) | (n & 63);
    }
    if (ok && ((need === 2 && (c < 0x800 || (c >= 0xd800 && c <= 0xdfff))) || (need === 3 && (c < 0x10000 || c > 0x10ffff)))) ok = false;
    chunk.push(ok ? c : 0xfffd);
    i += ok ? need + 1 : 1;
    if (chunk.length >= 4096) flush();
  }
  flush();
  return out;
}

function bytesOf(value) {
  if (value instanceof Uint8Array) return value;
  if (Array.isArray(value)) return Uint8Array.from(value);
  return encode(value);
}

// ---- errors --------------------------------------------------------------

/** A host call refused or failed; `kind` is denied, invalid, not-found or failed. */
export class HostError extends Error {
  constructor(kind, message) {
    super(`${kind}: ${message}`);
    this.name = "HostError";
    this.kind = kind;
    this.detail = message;
  }
}

// Imports returning result<_, host-error> throw an Error whose `payload`
// is the error's variant, `{ tag, val }`.
function hostCall(f) {
  try {
    return f();
  } catch (e) {
    const v = e && typeof e === "object" && "payload" in e ? e.payload : e;
    if (v && typeof v === "object" && typeof v.tag === "string") throw new HostError(v.tag, String(v.val ?? ""));
    throw e;
  }
}

// What a guest's thrown value says, for an `err(string)`.
function failure(e) {
  if (e instanceof Error) return e.message || e.name;
  return typeof e === "string" ? e : JSON.stringify(e) ?? String(e);
}

// ---- headers -------------------------------------------------------------

function pairs(headers) {
  if (headers === undefined || headers === null) return [];
  if (Array.isArray(headers)) return headers.map(([k, v]) => [String(k), String(v)]);
  return Object.entries(headers).map(([k, v]) => [k, String(v)]);
}

function first(headers, name) {
  for (const [k, v] of headers) if (k === name) return v;
  return null;
}

// ---- requests and replies --------------------------------------------------

/** One call of an event route. */
export class Request {
  constructor(raw) {
    /** The route's name, e.g. `evrexec:udp`. */
    this.route = raw.route;
    /** The payload, as bytes. */
    this.bytes = raw.data instanceof Uint8Array ? raw.data : Uint8Array.from(raw.data);
    /** Named parameters, in order: an array of `[name, value]`. */
    this.params = raw.params;
    /** Where it came from: `{ kind: "udp", ip, port }`, `{ kind: "rpc" }`, `{ kind: "event", name }`, … */
    this.origin = originOf(raw.origin);
    this._text = null;
  }
  /** The payload as text (malformed UTF-8 becomes U+FFFD). */
  get text() {
    if (this._text === null) this._text = decode(this.bytes);
    return this._text;
  }
  /** The first parameter called `name`, or null. */
  param(name) {
    return first(this.params, name);
  }
}

function originOf(o) {
  switch (o.tag) {
    case "udp":
      return { kind: "udp", ip: o.val.ip, port: o.val.port };
    case "startup":
      return { kind: "startup", worker: o.val };
    case "erlang":
      return { kind: "erlang", node: o.val };
    case "event":
      return { kind: "event", name: o.val };
    case "yate":
      return { kind: "yate", message: o.val };
    default:
      return { kind: o.tag };
  }
}

/** The answer to a request, built step by step: `Reply.handled().retval("ok")`. */
export class Reply {
  constructor(handled) {
    this.handled = handled;
    this._retval = "";
    this._params = [];
    this._unset = [];
    this._data = null;
  }
  /** Stops dispatch: later handlers of the route are not called. */
  static handled() {
    return new Reply(true);
  }
  /** Lets later handlers of the route run. */
  static declined() {
    return new Reply(false);
  }
  retval(text) {
    this._retval = String(text);
    return this;
  }
  param(name, value) {
    this._params.push([String(name), String(value)]);
    return this;
  }
  /** Sets every `[name, value]` of `headers` (an array of pairs or an object). */
  params(headers) {
    this._params.push(...pairs(headers));
    return this;
  }
  unset(name) {
    this._unset.push(String(name));
    return this;
  }
  /** Bytes for the front-end to send back: a Uint8Array or text. */
  data(value) {
    this._data = bytesOf(value);
    return this;
  }
  toWit() {
    return { handled: this.handled, retval: this._retval, params: this._params, unset: this._unset, data: this._data };
  }
}

function replyOf(value) {
  if (value instanceof Reply) return value.toWit();
  if (typeof value === "string") return Reply.handled().retval(value).toWit();
  if (value === undefined || value === null) return Reply.declined().toWit();
  throw new Error(`a route handler returned ${typeof value}: return a Reply, a string, or nothing`);
}

// ---- events ----------------------------------------------------------------

/** An event on the bus: `new Event("CUSTOM", "my::thing").header("k", "v")`. */
export class Event {
  constructor(name, subclass = null) {
    this.name = String(name);
    this.subclass = subclass === null || subclass === undefined ? null : String(subclass);
    this.headers = [];
    this.body = null;
  }
  static fromWit(raw) {
    const e = new Event(raw.name, raw.subclass);
    e.headers = raw.headers;
    e.body = raw.body;
    return e;
  }
  header(name, value) {
    this.headers.push([String(name), String(value)]);
    return this;
  }
  /** The first header called `name`, or null. */
  get(name) {
    return first(this.headers, name);
  }
  withBody(body) {
    this.body = String(body);
    return this;
  }
  toWit() {
    return { name: this.name, subclass: this.subclass, headers: pairs(this.headers), body: this.body };
  }
}

export const events = {
  /** Fires an Event (or an object with name, subclass, headers, body). */
  fire(event) {
    const e = event instanceof Event ? event : Object.assign(new Event(event.name, event.subclass), { headers: pairs(event.headers), body: event.body ?? null });
    hostCall(() => rawEvents.fire(e.toWit()));
  },
  subscribe(name, subclass = null) {
    hostCall(() => rawEvents.subscribe(name, subclass));
  },
  /** True when a subscription was removed. */
  unsubscribe(name, subclass = null) {
    return hostCall(() => rawEvents.unsubscribe(name, subclass));
  },
  /** mod_event_socket's filter commands; returns what was done. */
  filter(command) {
    return hostCall(() => rawEvents.filter(command));
  },
};

// ---- host services ---------------------------------------------------------

export const log = {
  debug: (message) => host.log("debug", String(message)),
  info: (message) => host.log("info", String(message)),
  notice: (message) => host.log("notice", String(message)),
  warn: (message) => host.log("warn", String(message)),
  error: (message) => host.log("error", String(message)),
  crit: (message) => host.log("crit", String(message)),
};

/** A value from the plugin's `[plugin.config]` table, or null. */
export function config(key) {
  return host.config(key) ?? null;
}

/** Microseconds since the Unix epoch. */
export function now() {
  return Number(host.now());
}

/** Suspends an exec task for `ms` milliseconds; other exports may not sleep. */
export function sleep(ms) {
  hostCall(() => host.sleep(ms));
}

/** The tenant's key-value store. Values are bytes; text is stored as UTF-8. */
export const kv = {
  /** The value as a Uint8Array, or null. */
  get(key) {
    return hostCall(() => rawKv.get(key)) ?? null;
  },
  /** The value as text, or null. */
  getText(key) {
    const v = kv.get(key);
    return v === null ? null : decode(v);
  },
  set(key, value) {
    hostCall(() => rawKv.set(key, bytesOf(value)));
  },
  /** True when the key existed. */
  delete(key) {
    return hostCall(() => rawKv.delete(key));
  },
  /** Adds `delta` (default 1) to a decimal counter and returns the new value. */
  incr(key, delta = 1) {
    return Number(hostCall(() => rawKv.incr(key, delta)));
  },
};

/** Calls an API command: one of the tenant's plugins' or a granted built-in. */
export const commands = {
  call(command, args = "") {
    return hostCall(() => rawCommands.call(command, String(args)));
  },
};

/** Asks the processes bound to `section` for a document (FreeSWITCH XML search). */
export function fetch(section, { tag = "", key = "", value = "", params = [] } = {}) {
  return hostCall(() => rawFetch.fetch(section, tag, key, value, pairs(params)));
}

/** Messages for the engine evrhost is a module of (Yate). */
export const messages = {
  /** Dispatches and waits: `{ handled, name, retvalue, params }`. */
  dispatch(name, { retvalue = "", params = [] } = {}) {
    return hostCall(() => rawMessages.dispatch({ name, retvalue, params: pairs(params) }));
  },
  enqueue(name, { retvalue = "", params = [] } = {}) {
    hostCall(() => rawMessages.enqueue({ name, retvalue, params: pairs(params) }));
  },
};

// ---- exports ---------------------------------------------------------------

/** `export const route = defineRoute((req) => …)`: return a Reply, a string (handled, as retval) or nothing (declined). */
export function defineRoute(handler) {
  return {
    handle(raw) {
      let value;
      try {
        value = handler(new Request(raw));
      } catch (e) {
        throw failure(e);
      }
      return replyOf(value);
    },
  };
}

/**
 * `export const api = defineApi({ "name.verb": { usage, description, run(args) } })`:
 * each command's `run` returns text (anything else is turned into JSON).
 */
export function defineApi(table) {
  const names = Object.keys(table);
  for (const name of names) {
    if (typeof table[name].run !== "function") throw new Error(`command ${name}: no run(args) function`);
  }
  return {
    commands() {
      return names.map((name) => ({ name, usage: String(table[name].usage ?? ""), description: String(table[name].description ?? "") }));
    },
    execute(command, args) {
      const entry = Object.prototype.hasOwnProperty.call(table, command) ? table[command] : null;
      if (entry === null) throw `unknown command ${command}`;
      let value;
      try {
        value = entry.run(args);
      } catch (e) {
        throw failure(e);
      }
      return typeof value === "string" ? value : JSON.stringify(value ?? null);
    },
  };
}

/** `export const subscriber = defineSubscriber((event) => …)`; a throw is logged, not lost. */
export function defineSubscriber(handler) {
  return {
    onEvent(raw) {
      try {
        handler(Event.fromWit(raw));
      } catch (e) {
        log.error(`subscriber failed on ${raw.name}: ${failure(e)}`);
      }
    },
  };
}

/** `export const task = defineTask((worker) => …)`: an exec task; `worker` is its index as text. */
export function defineTask(body) {
  return {
    run(worker) {
      try {
        body(worker);
      } catch (e) {
        throw failure(e);
      }
    },
  };
}
