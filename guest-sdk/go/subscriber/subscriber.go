// Package subscriber exports the contract's `subscriber` interface: import
// it and call Serve in init, and the plugin receives the events it
// subscribed to.
package subscriber

import (
	"evrhost.dev/sdk"
	wt "evrhost.dev/sdk/internal/bindings/evrhost_plugin_types"
)

var handler evrhost.Subscriber

// Serve makes h the plugin's event handler.
func Serve(h evrhost.Subscriber) { handler = h }

func onEvent(raw wt.Event) {
	if handler == nil {
		evrhost.Error("the plugin imports evrhost.dev/sdk/subscriber but never called subscriber.Serve")
		return
	}
	// A panic is logged, not lost, and the instance stays usable.
	defer func() {
		if p := recover(); p != nil {
			evrhost.Error("subscriber panicked on " + raw.Name + ": " + evrhost.Failure(p))
		}
	}()
	handler.OnEvent(evrhost.EventOf(raw))
}
