// Package evrhost is the SDK for evrhost plugins written in Go (mainline Go,
// GOOS=wasip1, built into a component by `evrhost build`).
//
// A plugin is a main package that hands its handlers to the packages of the
// interfaces it exports, in init; it exports exactly those interfaces:
//
//	package main
//
//	import (
//		"evrhost.dev/sdk"
//		"evrhost.dev/sdk/route"
//	)
//
//	type Echo struct{}
//
//	func (Echo) Handle(req *evrhost.Request) (*evrhost.Reply, error) {
//		return evrhost.Handled().Retval("ok").Data(req.Data), nil
//	}
//
//	func init() { route.Serve(Echo{}) }
//
//	func main() {} // required by Go; evrhost calls the exports, never main
//
// Return an error to fail a call: its text reaches the caller and the
// instance stays usable. Host calls that fail return a *HostError.
package evrhost

import (
	"fmt"

	"evrhost.dev/sdk/internal/bindings/evrhost_plugin_commands"
	"evrhost.dev/sdk/internal/bindings/evrhost_plugin_events"
	"evrhost.dev/sdk/internal/bindings/evrhost_plugin_fetch"
	"evrhost.dev/sdk/internal/bindings/evrhost_plugin_host"
	"evrhost.dev/sdk/internal/bindings/evrhost_plugin_kv"
	"evrhost.dev/sdk/internal/bindings/evrhost_plugin_messages"
	wt "evrhost.dev/sdk/internal/bindings/evrhost_plugin_types"
	witTypes "evrhost.dev/sdk/internal/wit/types"
)

// Header is one name/value pair; names may repeat and order is kept.
type Header struct{ Name, Value string }

// First returns the value of the first header called name.
func First(headers []Header, name string) (string, bool) {
	for _, h := range headers {
		if h.Name == name {
			return h.Value, true
		}
	}
	return "", false
}

// ---- errors ----------------------------------------------------------------

// HostError is a host call that was refused or failed.
type HostError struct {
	// Kind is "denied", "invalid", "not-found" or "failed".
	Kind   string
	Detail string
}

func (e *HostError) Error() string { return e.Kind + ": " + e.Detail }

func hostError(e wt.HostError) *HostError {
	switch e.Tag() {
	case wt.HostError_Denied:
		return &HostError{"denied", e.Denied()}
	case wt.HostError_Invalid:
		return &HostError{"invalid", e.Invalid()}
	case wt.HostError_NotFound:
		return &HostError{"not-found", e.NotFound()}
	default:
		return &HostError{"failed", e.Failed()}
	}
}

func result[T any](r witTypes.Result[T, wt.HostError]) (T, error) {
	if r.IsErr() {
		var zero T
		return zero, hostError(r.Err())
	}
	return r.Ok(), nil
}

func unit(r witTypes.Result[witTypes.Unit, wt.HostError]) error {
	_, err := result(r)
	return err
}

// ---- headers, both ways ----------------------------------------------------

// Headers converts the contract's pairs; for the export packages.
func Headers(pairs []witTypes.Tuple2[string, string]) []Header {
	out := make([]Header, len(pairs))
	for i, p := range pairs {
		out[i] = Header{p.F0, p.F1}
	}
	return out
}

// Pairs converts headers to the contract's pairs; for the export packages.
func Pairs(headers []Header) []witTypes.Tuple2[string, string] {
	out := make([]witTypes.Tuple2[string, string], len(headers))
	for i, h := range headers {
		out[i] = witTypes.Tuple2[string, string]{F0: h.Name, F1: h.Value}
	}
	return out
}

func option[T any](v *T) witTypes.Option[T] {
	if v == nil {
		return witTypes.None[T]()
	}
	return witTypes.Some(*v)
}

func pointer[T any](o witTypes.Option[T]) *T {
	if o.IsNone() {
		return nil
	}
	v := o.Some()
	return &v
}

// ---- requests and replies --------------------------------------------------

// Origin says where a request came from.
type Origin struct {
	// Kind is "cli", "startup", "udp", "rpc", "erlang", "yate" or "event".
	Kind string
	// For udp: the peer.
	IP   string
	Port uint16
	// The startup worker, the Erlang node or the event's name.
	Name string
	// For yate: the engine message as it arrived.
	Message *MessageInfo
}

// MessageInfo is an engine message as it arrived.
type MessageInfo struct {
	ID       string
	Time     uint64
	Name     string
	Retvalue string
}

// Request is one call of an event route.
type Request struct {
	// Route is the route's name, e.g. `evrexec:udp`.
	Route string
	// Data is the payload: a datagram, the RPC's evdata, a message body.
	Data   []byte
	Params []Header
	Origin Origin
}

// Text is the payload as a string.
func (r *Request) Text() string { return string(r.Data) }

// Param returns the first parameter called name.
func (r *Request) Param(name string) (string, bool) { return First(r.Params, name) }

// NewRequest converts the contract's request; for the export packages.
func NewRequest(raw wt.Request) *Request {
	o := Origin{}
	switch raw.Origin.Tag() {
	case wt.Origin_Cli:
		o.Kind = "cli"
	case wt.Origin_Startup:
		o.Kind, o.Name = "startup", raw.Origin.Startup()
	case wt.Origin_Udp:
		p := raw.Origin.Udp()
		o.Kind, o.IP, o.Port = "udp", p.Ip, p.Port
	case wt.Origin_Rpc:
		o.Kind = "rpc"
	case wt.Origin_Erlang:
		o.Kind, o.Name = "erlang", raw.Origin.Erlang()
	case wt.Origin_Yate:
		m := raw.Origin.Yate()
		o.Kind, o.Message = "yate", &MessageInfo{m.Id, m.Time, m.Name, m.Retvalue}
	case wt.Origin_Event:
		o.Kind, o.Name = "event", raw.Origin.Event()
	}
	return &Request{Route: raw.Route, Data: raw.Data, Params: Headers(raw.Params), Origin: o}
}

// Reply is the answer to a request, built step by step:
// evrhost.Handled().Retval("ok").Data(b).
type Reply struct {
	// Handled stops dispatch: later handlers of the route are not called.
	Handled bool
	Value   string
	Set     []Header
	Unset   []string
	// Bytes for the front-end to send back; nil sends none.
	Bytes []byte
}

// Handled is a reply that stops dispatch.
func Handled() *Reply { return &Reply{Handled: true} }

// Declined is a reply that lets later handlers of the route run.
func Declined() *Reply { return &Reply{} }

func (r *Reply) Retval(v string) *Reply { r.Value = v; return r }

func (r *Reply) Param(name, value string) *Reply {
	r.Set = append(r.Set, Header{name, value})
	return r
}

func (r *Reply) Params(headers []Header) *Reply { r.Set = append(r.Set, headers...); return r }

func (r *Reply) Delete(name string) *Reply { r.Unset = append(r.Unset, name); return r }

func (r *Reply) Data(b []byte) *Reply { r.Bytes = b; return r }

func (r *Reply) Text(s string) *Reply { r.Bytes = []byte(s); return r }

// Wit converts the reply to the contract's; for the export packages.
func (r *Reply) Wit() wt.Reply {
	if r == nil {
		r = Declined()
	}
	data := witTypes.None[[]uint8]()
	if r.Bytes != nil {
		data = witTypes.Some[[]uint8](r.Bytes)
	}
	unset := r.Unset
	if unset == nil {
		unset = []string{}
	}
	return wt.Reply{Handled: r.Handled, Retval: r.Value, Params: Pairs(r.Set), Unset: unset, Data: data}
}

// ---- what a plugin implements --------------------------------------------

// Route handles calls of event routes (package route serves it).
type Route interface {
	Handle(req *Request) (*Reply, error)
}

// Command is an API command a plugin offers.
type Command struct {
	// Name is dotted, e.g. `counter.get`.
	Name, Usage, Description string
}

// API offers commands (package api serves it).
type API interface {
	// Commands is read once, when the plugin loads.
	Commands() []Command
	Execute(command, args string) (string, error)
}

// Subscriber receives the events the plugin subscribed to (package
// subscriber serves it).
type Subscriber interface {
	OnEvent(event *Event)
}

// Task is an exec task; worker is its index as text (package task serves it).
type Task interface {
	Run(worker string) error
}

// Failure is the text of an error a handler returned or a panic it raised.
func Failure(err any) string {
	switch e := err.(type) {
	case error:
		return e.Error()
	case string:
		return e
	default:
		return fmt.Sprint(e)
	}
}

// ---- events ----------------------------------------------------------------

// Event is an event on the bus.
type Event struct {
	Name string
	// Subclass is set for CUSTOM events.
	Subclass *string
	Headers  []Header
	Body     *string
}

// NewEvent starts an event: evrhost.NewEvent("CUSTOM").Header("k", "v").
func NewEvent(name string) *Event { return &Event{Name: name} }

// Custom starts a CUSTOM event of this subclass.
func Custom(subclass string) *Event { return &Event{Name: "CUSTOM", Subclass: &subclass} }

func (e *Event) Header(name, value string) *Event {
	e.Headers = append(e.Headers, Header{name, value})
	return e
}

func (e *Event) WithBody(body string) *Event { e.Body = &body; return e }

// Get returns the first header called name.
func (e *Event) Get(name string) (string, bool) { return First(e.Headers, name) }

// EventOf converts the contract's event; for the export packages.
func EventOf(raw wt.Event) *Event {
	return &Event{Name: raw.Name, Subclass: pointer(raw.Subclass), Headers: Headers(raw.Headers), Body: pointer(raw.Body)}
}

// Fire sends an event on the bus.
func Fire(e *Event) error {
	return unit(evrhost_plugin_events.Fire(wt.Event{Name: e.Name, Subclass: option(e.Subclass), Headers: Pairs(e.Headers), Body: option(e.Body)}))
}

// Subscribe delivers matching events to the plugin's Subscriber; an empty
// subclass means every subclass.
func Subscribe(name, subclass string) error {
	return unit(evrhost_plugin_events.Subscribe(name, nonEmpty(subclass)))
}

// Unsubscribe reports whether a subscription was removed.
func Unsubscribe(name, subclass string) (bool, error) {
	return result(evrhost_plugin_events.Unsubscribe(name, nonEmpty(subclass)))
}

// Filter runs one of mod_event_socket's filter commands.
func Filter(command string) (string, error) {
	return result(evrhost_plugin_events.Filter(command))
}

func nonEmpty(s string) witTypes.Option[string] {
	if s == "" {
		return witTypes.None[string]()
	}
	return witTypes.Some(s)
}

// ---- host services ---------------------------------------------------------

func Debug(message string)  { evrhost_plugin_host.Log(wt.Level_Debug, message) }
func Info(message string)   { evrhost_plugin_host.Log(wt.Level_Info, message) }
func Notice(message string) { evrhost_plugin_host.Log(wt.Level_Notice, message) }
func Warn(message string)   { evrhost_plugin_host.Log(wt.Level_Warn, message) }
func Error(message string)  { evrhost_plugin_host.Log(wt.Level_Error, message) }
func Crit(message string)   { evrhost_plugin_host.Log(wt.Level_Crit, message) }

// Config returns a value from the plugin's [plugin.config] table.
func Config(key string) (string, bool) {
	v := evrhost_plugin_host.Config(key)
	if v.IsNone() {
		return "", false
	}
	return v.Some(), true
}

// NowMicros is microseconds since the Unix epoch.
func NowMicros() uint64 { return evrhost_plugin_host.Now() }

// Sleep suspends an exec task; other exports may not sleep.
func Sleep(ms uint32) error { return unit(evrhost_plugin_host.Sleep(ms)) }

// KVGet returns the tenant's value for key; ok is false when it is absent.
func KVGet(key string) (value []byte, ok bool, err error) {
	v, err := result(evrhost_plugin_kv.Get(key))
	if err != nil || v.IsNone() {
		return nil, false, err
	}
	return v.Some(), true, nil
}

// KVGetString is KVGet as text.
func KVGetString(key string) (string, bool, error) {
	v, ok, err := KVGet(key)
	return string(v), ok, err
}

func KVSet(key string, value []byte) error { return unit(evrhost_plugin_kv.Set(key, value)) }

// KVDelete reports whether the key existed.
func KVDelete(key string) (bool, error) { return result(evrhost_plugin_kv.Delete(key)) }

// KVIncr adds delta to a decimal counter (absent = 0) and returns the new value.
func KVIncr(key string, delta int64) (int64, error) { return result(evrhost_plugin_kv.Incr(key, delta)) }

// Call runs an API command: one of the tenant's plugins' or a granted built-in.
func Call(command, args string) (string, error) {
	return result(evrhost_plugin_commands.Call(command, args))
}

// Fetch asks the processes bound to section for a document (FreeSWITCH XML search).
func Fetch(section, tag, key, value string, params []Header) (string, error) {
	return result(evrhost_plugin_fetch.Fetch(section, tag, key, value, Pairs(params)))
}

// Answer is the engine's answer to a dispatched message.
type Answer struct {
	Handled        bool
	Name, Retvalue string
	Params         []Header
}

// Dispatch sends a message to the engine evrhost is a module of and waits.
func Dispatch(name, retvalue string, params []Header) (*Answer, error) {
	a, err := result(evrhost_plugin_messages.Dispatch(wt.Message{Name: name, Retvalue: retvalue, Params: Pairs(params)}))
	if err != nil {
		return nil, err
	}
	return &Answer{a.Handled, a.Name, a.Retvalue, Headers(a.Params)}, nil
}

// Enqueue sends a message to the engine without waiting.
func Enqueue(name, retvalue string, params []Header) error {
	return unit(evrhost_plugin_messages.Enqueue(wt.Message{Name: name, Retvalue: retvalue, Params: Pairs(params)}))
}
