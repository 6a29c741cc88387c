// Package task exports the contract's `task` interface: import it and call
// Serve in init, and the plugin can run as an exec task.
package task

import (
	"evrhost.dev/sdk"
	witTypes "evrhost.dev/sdk/internal/wit/types"
)

var handler evrhost.Task

// Serve makes h the plugin's exec task.
func Serve(h evrhost.Task) { handler = h }

func run(worker string) (out witTypes.Result[witTypes.Unit, string]) {
	if handler == nil {
		return witTypes.Err[witTypes.Unit, string]("the plugin imports evrhost.dev/sdk/task but never called task.Serve")
	}
	defer func() {
		if p := recover(); p != nil {
			out = witTypes.Err[witTypes.Unit, string]("panic: " + evrhost.Failure(p))
		}
	}()
	if err := handler.Run(worker); err != nil {
		return witTypes.Err[witTypes.Unit, string](err.Error())
	}
	return witTypes.Ok[witTypes.Unit, string](witTypes.Unit{})
}
