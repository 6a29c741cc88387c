// Package route exports the contract's `route` interface: import it and
// call Serve in init, and the plugin handles event routes.
package route

import (
	"evrhost.dev/sdk"
	wt "evrhost.dev/sdk/internal/bindings/evrhost_plugin_types"
	witTypes "evrhost.dev/sdk/internal/wit/types"
)

var handler evrhost.Route

// Serve makes h the plugin's route handler.
func Serve(h evrhost.Route) { handler = h }

func handle(raw wt.Request) (out witTypes.Result[wt.Reply, string]) {
	if handler == nil {
		return witTypes.Err[wt.Reply, string]("the plugin imports evrhost.dev/sdk/route but never called route.Serve")
	}
	defer func() {
		if p := recover(); p != nil {
			out = witTypes.Err[wt.Reply, string]("panic: " + evrhost.Failure(p))
		}
	}()
	reply, err := handler.Handle(evrhost.NewRequest(raw))
	if err != nil {
		return witTypes.Err[wt.Reply, string](err.Error())
	}
	return witTypes.Ok[wt.Reply, string](reply.Wit())
}
