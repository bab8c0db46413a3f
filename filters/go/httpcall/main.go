// Command httpcall is a proxy-wasm test filter built with the official Go SDK.
//
// Plugin configuration (JSON, every field optional):
//
//	{"cluster": "auth", "path": "/check"}
//
// On request headers it dispatches `GET <path>` (`:authority` = cluster) to
// `cluster` with a 1000 ms timeout and pauses the request. When the callout
// answers:
//   - no headers (the callout failed): local reply 503 "callout failed\n";
//   - `:status` 200: adds request header `x-go-callout-user` with the callout
//     response's `x-user` and resumes the request;
//   - any other status: local reply 403 "forbidden\n" with header
//     `x-go-callout-status: <status>`.
//
// If the dispatch itself fails, it replies 503 "callout failed\n" at once.
package main

import (
	"encoding/json"
	"strings"

	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm"
	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm/types"
)

const timeoutMillis = 1000

func main() {}

func init() {
	proxywasm.SetPluginContext(func(contextID uint32) types.PluginContext {
		return &pluginContext{}
	})
}

type config struct {
	Cluster string `json:"cluster"`
	Path    string `json:"path"`
}

type pluginContext struct {
	types.DefaultPluginContext
	cfg config
}

// OnPluginStart implements types.PluginContext.
func (p *pluginContext) OnPluginStart(pluginConfigurationSize int) types.OnPluginStartStatus {
	p.cfg = config{Cluster: "auth", Path: "/check"}
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
	proxywasm.LogInfof("go httpcall filter configured: cluster=%s path=%s", p.cfg.Cluster, p.cfg.Path)
	return types.OnPluginStartStatusOK
}

// NewHttpContext implements types.PluginContext.
func (p *pluginContext) NewHttpContext(contextID uint32) types.HttpContext {
	return &httpContext{cfg: p.cfg}
}

type httpContext struct {
	types.DefaultHttpContext
	cfg config
}

// OnHttpRequestHeaders implements types.HttpContext.
func (h *httpContext) OnHttpRequestHeaders(numHeaders int, endOfStream bool) types.Action {
	headers := [][2]string{
		{":method", "GET"},
		{":path", h.cfg.Path},
		{":authority", h.cfg.Cluster},
	}
	if _, err := proxywasm.DispatchHttpCall(h.cfg.Cluster, headers, nil, nil, timeoutMillis, onCalloutResponse); err != nil {
		proxywasm.LogErrorf("dispatching the http call to %s failed: %v", h.cfg.Cluster, err)
		sendLocal(503, nil, "callout failed\n")
		return types.ActionPause
	}
	return types.ActionPause
}

// onCalloutResponse runs in the context of the paused request once the callout completes.
func onCalloutResponse(numHeaders, bodySize, numTrailers int) {
	if numHeaders == 0 {
		sendLocal(503, nil, "callout failed\n")
		return
	}
	headers, err := proxywasm.GetHttpCallResponseHeaders()
	if err != nil {
		proxywasm.LogErrorf("reading the callout response headers: %v", err)
		sendLocal(503, nil, "callout failed\n")
		return
	}
	status := header(headers, ":status")
	if status != "200" {
		sendLocal(403, [][2]string{{"x-go-callout-status", status}}, "forbidden\n")
		return
	}
	if err := proxywasm.AddHttpRequestHeader("x-go-callout-user", header(headers, "x-user")); err != nil {
		proxywasm.LogErrorf("failed to add x-go-callout-user: %v", err)
	}
	if err := proxywasm.ResumeHttpRequest(); err != nil {
		proxywasm.LogErrorf("failed to resume the request: %v", err)
	}
}

func sendLocal(status uint32, headers [][2]string, body string) {
	if err := proxywasm.SendHttpResponse(status, headers, []byte(body), -1); err != nil {
		proxywasm.LogErrorf("failed to send the %d local response: %v", status, err)
	}
}

// header returns the first value of the (lower-case) header name, or "".
func header(headers [][2]string, name string) string {
	for _, h := range headers {
		if strings.EqualFold(h[0], name) {
			return h[1]
		}
	}
	return ""
}
