// {{name}}: counts how often each text was sent and answers with the count.
// Try it: `evrhost call {{name}}.wasm hello world`.

import { defineApi, defineRoute, kv, log, Reply } from "evrhost";

export const route = defineRoute((req) => {
  const n = kv.incr(`seen:${req.text}`);
  log.info(`${req.text} seen ${n} times on ${req.route}`);
  return Reply.handled().retval(String(n)).data(`${req.text} #${n}`);
});

export const api = defineApi({
  "{{name}}.seen": {
    usage: "TEXT",
    description: "how often TEXT was sent",
    run: (args) => kv.getText(`seen:${args}`) ?? "0",
  },
});
