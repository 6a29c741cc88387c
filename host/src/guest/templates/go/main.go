// {{name}}: counts how often each text was sent and answers with the count.
// Try it: `evrhost call {{name}}.wasm hello world`.
package main

import (
	"fmt"

	"evrhost.dev/sdk"
	"evrhost.dev/sdk/api"
	"evrhost.dev/sdk/route"
)

type Plugin struct{}

func (Plugin) Handle(req *evrhost.Request) (*evrhost.Reply, error) {
	n, err := evrhost.KVIncr("seen:"+req.Text(), 1)
	if err != nil {
		return nil, err
	}
	evrhost.Info(fmt.Sprintf("%s seen %d times on %s", req.Text(), n, req.Route))
	return evrhost.Handled().Retval(fmt.Sprint(n)).Text(fmt.Sprintf("%s #%d", req.Text(), n)), nil
}

func (Plugin) Commands() []evrhost.Command {
	return []evrhost.Command{{Name: "{{name}}.seen", Usage: "TEXT", Description: "how often TEXT was sent"}}
}

func (Plugin) Execute(command, args string) (string, error) {
	if command != "{{name}}.seen" {
		return "", fmt.Errorf("unknown command %s", command)
	}
	n, ok, err := evrhost.KVGetString("seen:" + args)
	if !ok {
		n = "0"
	}
	return n, err
}

// The packages imported above are the interfaces the plugin exports.
func init() {
	route.Serve(Plugin{})
	api.Serve(Plugin{})
}

func main() {} // required by Go; evrhost calls the exports, never main
