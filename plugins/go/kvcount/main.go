// Counts events per key from `key=value;key=value;…` datagrams, as the Rust
// `kvcount` does, in the tenant's kv store; `kvcount.get KEY` reads a count.
// It also counts the bus events it subscribed to (`kvcount.events NAME`),
// and as an exec task it ticks `kvcount:ticks` every `tick_ms`.
package main

import (
	"fmt"
	"strconv"
	"strings"

	"evrhost.dev/sdk"
	"evrhost.dev/sdk/api"
	"evrhost.dev/sdk/route"
	"evrhost.dev/sdk/subscriber"
	"evrhost.dev/sdk/task"
)

// Keys counted from one datagram at most; the rest is ignored.
const maxKeys = 64

type KvCount struct{}

func counter(key string) string { return "kvcount:" + key }

func (KvCount) Handle(req *evrhost.Request) (*evrhost.Reply, error) {
	counted := 0
	for _, segment := range strings.Split(req.Text(), ";") {
		segment = strings.TrimSpace(segment)
		if segment == "" {
			continue
		}
		if counted == maxKeys {
			break
		}
		key, _, _ := strings.Cut(segment, "=")
		key = strings.TrimSpace(key)
		if key == "" {
			continue
		}
		if _, err := evrhost.KVIncr(counter(key), 1); err != nil {
			return nil, fmt.Errorf("counting `%s`: %w", key, err)
		}
		counted++
	}
	n := strconv.Itoa(counted)
	return evrhost.Handled().Retval(n).Text(n), nil
}

func (KvCount) Commands() []evrhost.Command {
	return []evrhost.Command{
		{Name: "kvcount.get", Usage: "KEY", Description: "how many datagrams named KEY"},
		{Name: "kvcount.watch", Usage: "EVENT", Description: "count the bus events called EVENT from now on"},
		{Name: "kvcount.events", Usage: "EVENT", Description: "how many EVENT events arrived since kvcount.watch"},
	}
}

func read(key string) (string, error) {
	v, ok, err := evrhost.KVGetString(key)
	if !ok {
		v = "0"
	}
	return v, err
}

func (KvCount) Execute(command, args string) (string, error) {
	args = strings.TrimSpace(args)
	switch command {
	case "kvcount.get":
		return read(counter(args))
	case "kvcount.watch":
		if err := evrhost.Subscribe(args, ""); err != nil {
			return "", err
		}
		return "watching " + args, nil
	case "kvcount.events":
		return read("kvcount:event:" + args)
	}
	return "", fmt.Errorf("unknown command %s", command)
}

func (KvCount) OnEvent(event *evrhost.Event) {
	if _, err := evrhost.KVIncr("kvcount:event:"+event.Name, 1); err != nil {
		evrhost.Error("counting " + event.Name + ": " + err.Error())
	}
}

func (KvCount) Run(worker string) error {
	tick := uint32(100)
	if v, ok := evrhost.Config("tick_ms"); ok {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return fmt.Errorf("tick_ms %q: %w", v, err)
		}
		tick = uint32(n)
	}
	evrhost.Info(fmt.Sprintf("kvcount task %s ticks every %d ms", worker, tick))
	for {
		if _, err := evrhost.KVIncr("kvcount:ticks", 1); err != nil {
			return err
		}
		if err := evrhost.Sleep(tick); err != nil {
			return err
		}
	}
}

func init() {
	route.Serve(KvCount{})
	api.Serve(KvCount{})
	subscriber.Serve(KvCount{})
	task.Serve(KvCount{})
}

func main() {} // required by Go; evrhost calls the exports, never main
