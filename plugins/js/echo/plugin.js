// Answers every request with its own data and parameters, as the Rust
// `echo` does; `js-echo.upper TEXT` is a command, to show an `api` export.

import { defineApi, defineRoute, Reply } from "evrhost";

export const route = defineRoute((req) => Reply.handled().retval("ok").params(req.params).data(req.bytes));

export const api = defineApi({
  "js-echo.upper": {
    usage: "TEXT",
    description: "TEXT in capitals",
    run: (args) => args.toUpperCase(),
  },
});
