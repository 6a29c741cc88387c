// Package api exports the contract's `api` interface: import it and call
// Serve in init, and the plugin offers commands.
package api

import (
	"evrhost.dev/sdk"
	wt "evrhost.dev/sdk/internal/bindings/evrhost_plugin_types"
	witTypes "evrhost.dev/sdk/internal/wit/types"
)

var handler evrhost.API

// Serve makes h the plugin's command handler.
func Serve(h evrhost.API) { handler = h }

func commands() []wt.CommandInfo {
	if handler == nil {
		return []wt.CommandInfo{}
	}
	list := handler.Commands()
	out := make([]wt.CommandInfo, len(list))
	for i, c := range list {
		out[i] = wt.CommandInfo{Name: c.Name, Usage: c.Usage, Description: c.Description}
	}
	return out
}

func execute(command, args string) (out witTypes.Result[string, string]) {
	if handler == nil {
		return witTypes.Err[string, string]("the plugin imports evrhost.dev/sdk/api but never called api.Serve")
	}
	defer func() {
		if p := recover(); p != nil {
			out = witTypes.Err[string, string]("panic: " + evrhost.Failure(p))
		}
	}()
	text, err := handler.Execute(command, args)
	if err != nil {
		return witTypes.Err[string, string](err.Error())
	}
	return witTypes.Ok[string, string](text)
}
