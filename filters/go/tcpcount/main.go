// Command tcpcount is a proxy-wasm network (L4) test filter built with the official Go SDK.
//
// No plugin configuration. Per connection:
//
//   - OnDownstreamData: adds the size to counter `go_tcp_downstream_bytes`; data containing
//     "QUIT!" closes the downstream (and nothing of it is forwarded), any other data is forwarded
//     upper-cased (ReplaceDownstreamData).
//   - OnUpstreamData: adds the size to counter `go_tcp_upstream_bytes`.
//   - OnStreamDone: counter `go_tcp_connections_done` +1.
package main

import (
	"bytes"

	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm"
	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm/types"
)

func main() {}

func init() {
	proxywasm.SetPluginContext(func(contextID uint32) types.PluginContext {
		return &pluginContext{}
	})
}

type pluginContext struct {
	types.DefaultPluginContext
	down, up, done proxywasm.MetricCounter
}

// OnPluginStart implements types.PluginContext.
func (p *pluginContext) OnPluginStart(int) types.OnPluginStartStatus {
	p.down = proxywasm.DefineCounterMetric("go_tcp_downstream_bytes")
	p.up = proxywasm.DefineCounterMetric("go_tcp_upstream_bytes")
	p.done = proxywasm.DefineCounterMetric("go_tcp_connections_done")
	return types.OnPluginStartStatusOK
}

// NewTcpContext implements types.PluginContext.
func (p *pluginContext) NewTcpContext(contextID uint32) types.TcpContext {
	return &tcpContext{plugin: p}
}

type tcpContext struct {
	types.DefaultTcpContext
	plugin *pluginContext
}

func (c *tcpContext) OnDownstreamData(dataSize int, endOfStream bool) types.Action {
	// The end of stream comes with no data; a counter incremented by 0 is BAD_ARGUMENT in
	// Envoy (and here), which the SDK turns into a panic.
	if dataSize == 0 {
		return types.ActionContinue
	}
	c.plugin.down.Increment(uint64(dataSize))
	data, err := proxywasm.GetDownstreamData(0, dataSize)
	if err != nil {
		proxywasm.LogErrorf("tcpcount: reading downstream data: %v", err)
		return types.ActionContinue
	}
	if bytes.Contains(data, []byte("QUIT!")) {
		if err := proxywasm.CloseDownstream(); err != nil {
			proxywasm.LogErrorf("tcpcount: closing: %v", err)
		}
		return types.ActionPause
	}
	if err := proxywasm.ReplaceDownstreamData(bytes.ToUpper(data)); err != nil {
		proxywasm.LogErrorf("tcpcount: replacing downstream data: %v", err)
	}
	return types.ActionContinue
}

func (c *tcpContext) OnUpstreamData(dataSize int, endOfStream bool) types.Action {
	if dataSize > 0 {
		c.plugin.up.Increment(uint64(dataSize))
	}
	return types.ActionContinue
}

func (c *tcpContext) OnStreamDone() {
	c.plugin.done.Increment(1)
}
