// Command body is a proxy-wasm test filter built with the official Go SDK.
//
// Plugin configuration (JSON, every field optional):
//
//	{"from": "hello", "to": "HELLO"}
//
// Both header callbacks remove content-length. Both body callbacks buffer the
// body (returning ActionPause) until end of stream, then replace every
// occurrence of `from` with `to` in the whole body.
package main

import (
	"bytes"
	"encoding/json"

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
	From string `json:"from"`
	To   string `json:"to"`
}

type pluginContext struct {
	types.DefaultPluginContext
	cfg config
}

// OnPluginStart implements types.PluginContext.
func (p *pluginContext) OnPluginStart(pluginConfigurationSize int) types.OnPluginStartStatus {
	p.cfg = config{From: "hello", To: "HELLO"}
	data, err := proxywasm.GetPluginConfiguration()
	if err != nil && err != types.ErrorStatusNotFound {
		proxywasm.LogCriticalf("error reading plugin configuration: %v", err)
		return types.OnPluginStartStatusFailed
	}
	if len(data) > 0 {
		if err := json.Unmarshal(data, &p.cfg); err != nil {
			proxywasm.LogCriticalf("invalid plugin configuration: %v", err)
			return types.OnPluginStartStatusFailed
		}
	}
	if p.cfg.From == "" {
		proxywasm.LogCritical(`plugin configuration: "from" must not be empty`)
		return types.OnPluginStartStatusFailed
	}
	proxywasm.LogInfof("go body filter configured: %q -> %q", p.cfg.From, p.cfg.To)
	return types.OnPluginStartStatusOK
}

// NewHttpContext implements types.PluginContext.
func (p *pluginContext) NewHttpContext(contextID uint32) types.HttpContext {
	return &httpContext{from: []byte(p.cfg.From), to: []byte(p.cfg.To)}
}

type httpContext struct {
	types.DefaultHttpContext
	from, to []byte
}

// OnHttpRequestHeaders implements types.HttpContext.
func (h *httpContext) OnHttpRequestHeaders(numHeaders int, endOfStream bool) types.Action {
	if err := proxywasm.RemoveHttpRequestHeader("content-length"); err != nil {
		proxywasm.LogErrorf("failed to remove request content-length: %v", err)
	}
	return types.ActionContinue
}

// OnHttpRequestBody implements types.HttpContext.
func (h *httpContext) OnHttpRequestBody(bodySize int, endOfStream bool) types.Action {
	if !endOfStream {
		// Wait until the whole body is buffered.
		return types.ActionPause
	}
	if bodySize == 0 {
		return types.ActionContinue
	}
	body, err := proxywasm.GetHttpRequestBody(0, bodySize)
	if err != nil {
		proxywasm.LogErrorf("failed to get request body: %v", err)
		return types.ActionContinue
	}
	if err := proxywasm.ReplaceHttpRequestBody(bytes.ReplaceAll(body, h.from, h.to)); err != nil {
		proxywasm.LogErrorf("failed to replace request body: %v", err)
	}
	return types.ActionContinue
}

// OnHttpResponseHeaders implements types.HttpContext.
func (h *httpContext) OnHttpResponseHeaders(numHeaders int, endOfStream bool) types.Action {
	if err := proxywasm.RemoveHttpResponseHeader("content-length"); err != nil {
		proxywasm.LogErrorf("failed to remove response content-length: %v", err)
	}
	return types.ActionContinue
}

// OnHttpResponseBody implements types.HttpContext.
func (h *httpContext) OnHttpResponseBody(bodySize int, endOfStream bool) types.Action {
	if !endOfStream {
		// Wait until the whole body is buffered.
		return types.ActionPause
	}
	if bodySize == 0 {
		return types.ActionContinue
	}
	body, err := proxywasm.GetHttpResponseBody(0, bodySize)
	if err != nil {
		proxywasm.LogErrorf("failed to get response body: %v", err)
		return types.ActionContinue
	}
	if err := proxywasm.ReplaceHttpResponseBody(bytes.ReplaceAll(body, h.from, h.to)); err != nil {
		proxywasm.LogErrorf("failed to replace response body: %v", err)
	}
	return types.ActionContinue
}
