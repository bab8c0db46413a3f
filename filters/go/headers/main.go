// Command headers is a proxy-wasm test filter built with the official Go SDK.
//
// Plugin configuration (JSON, every field optional):
//
//	{"header": "x-go-filter", "value": "hello from go"}
//
// Request headers: adds `<header>: <value>`.
// Response headers: adds `x-go-response: <value>` and
// `x-go-config-size: <length of the plugin configuration in bytes>`.
// OnPluginStart logs "go headers filter configured" at info level.
package main

import (
	"encoding/json"
	"strconv"

	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm"
	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm/types"
)

func main() {}

func init() {
	proxywasm.SetPluginContext(func(contextID uint32) types.PluginContext {
		return &pluginContext{}
	})
}

type config struct {
	Header string `json:"header"`
	Value  string `json:"value"`
}

type pluginContext struct {
	types.DefaultPluginContext
	cfg        config
	configSize int
}

// OnPluginStart implements types.PluginContext.
func (p *pluginContext) OnPluginStart(pluginConfigurationSize int) types.OnPluginStartStatus {
	p.cfg = config{Header: "x-go-filter", Value: "hello from go"}
	data, err := proxywasm.GetPluginConfiguration()
	if err != nil && err != types.ErrorStatusNotFound {
		proxywasm.LogCriticalf("error reading plugin configuration: %v", err)
		return types.OnPluginStartStatusFailed
	}
	p.configSize = len(data)
	if len(data) > 0 {
		if err := json.Unmarshal(data, &p.cfg); err != nil {
			proxywasm.LogCriticalf("invalid plugin configuration: %v", err)
			return types.OnPluginStartStatusFailed
		}
	}
	proxywasm.LogInfo("go headers filter configured")
	return types.OnPluginStartStatusOK
}

// NewHttpContext implements types.PluginContext.
func (p *pluginContext) NewHttpContext(contextID uint32) types.HttpContext {
	return &httpContext{plugin: p}
}

type httpContext struct {
	types.DefaultHttpContext
	plugin *pluginContext
}

// OnHttpRequestHeaders implements types.HttpContext.
func (h *httpContext) OnHttpRequestHeaders(numHeaders int, endOfStream bool) types.Action {
	if err := proxywasm.AddHttpRequestHeader(h.plugin.cfg.Header, h.plugin.cfg.Value); err != nil {
		proxywasm.LogErrorf("failed to add request header: %v", err)
	}
	return types.ActionContinue
}

// OnHttpResponseHeaders implements types.HttpContext.
func (h *httpContext) OnHttpResponseHeaders(numHeaders int, endOfStream bool) types.Action {
	if err := proxywasm.AddHttpResponseHeader("x-go-response", h.plugin.cfg.Value); err != nil {
		proxywasm.LogErrorf("failed to add response header: %v", err)
	}
	if err := proxywasm.AddHttpResponseHeader("x-go-config-size", strconv.Itoa(h.plugin.configSize)); err != nil {
		proxywasm.LogErrorf("failed to add response header: %v", err)
	}
	return types.ActionContinue
}
