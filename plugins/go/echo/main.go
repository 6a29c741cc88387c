// Answers every request with its own data and parameters, as the Rust
// `echo` does; `go-echo.upper TEXT` is a command, to show an `api` export.
package main

import (
	"strings"

	"evrhost.dev/sdk"
	"evrhost.dev/sdk/api"
	"evrhost.dev/sdk/route"
)

type Echo struct{}

func (Echo) Handle(req *evrhost.Request) (*evrhost.Reply, error) {
	return evrhost.Handled().Retval("ok").Params(req.Params).Data(req.Data), nil
}

func (Echo) Commands() []evrhost.Command {
	return []evrhost.Command{{Name: "go-echo.upper", Usage: "TEXT", Description: "TEXT in capitals"}}
}

func (Echo) Execute(command, args string) (string, error) {
	return strings.ToUpper(args), nil
}

func init() {
	route.Serve(Echo{})
	api.Serve(Echo{})
}

func main() {}
