// A JavaScript plugin that misbehaves on request, by route name (its last
// `:` segment, so `t1:loop` loops too): `loop`
// never returns, `bomb` allocates without bound, `throw` throws an Error,
// `recurse` recurses without end, `ok` is well-behaved, `kv` answers with
// the kind of the HostError a kv call raised (run it with kv denied).

import { defineRoute, HostError, kv, Reply } from "evrhost";

function recurse(n) {
  return recurse(n + 1) + 1;
}

export const route = defineRoute((req) => {
  const kind = req.route.split(":").pop();
  switch (kind) {
    case "ok":
      return Reply.handled().retval("ok");
    case "loop":
      for (;;) {}
    case "bomb": {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(1 << 20).fill(hoard.length));
    }
    case "throw":
      throw new Error("js-hostile throws on purpose");
    case "kv":
      try {
        kv.incr("hostile");
        return Reply.handled().retval("allowed");
      } catch (e) {
        return Reply.handled().retval(e instanceof HostError ? e.kind : `not a HostError: ${e}`);
      }
    case "recurse":
      return Reply.handled().retval(String(recurse(0)));
    default:
      throw new Error(`unknown hostile route ${kind}`);
  }
});
