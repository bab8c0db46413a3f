// add_header: a proxy-wasm test filter written with the AssemblyScript SDK
// (@solo-io/proxy-runtime). Root id: "add_header".
//
// - onConfigure: keeps the plugin configuration as a string ("" when none).
// - request headers: adds `x-as-request: 1`.
// - response headers: adds `x-as-filter: <configuration>`, or `x-as-filter: no config`
//   when the configuration is empty.

// Exports the proxy_on_* callbacks, malloc and the ABI version marker.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";

class AddHeaderRoot extends RootContext {
  config: string = "";

  createContext(context_id: u32): Context {
    return new AddHeader(context_id, this);
  }

  onConfigure(configuration_size: u32): bool {
    if (configuration_size == 0) {
      this.config = "";
      return true;
    }
    if (!super.onConfigure(configuration_size)) {
      return false;
    }
    this.config = this.getConfiguration();
    return true;
  }
}

class AddHeader extends Context {
  root: AddHeaderRoot;

  constructor(context_id: u32, root_context: AddHeaderRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.add("x-as-request", "1");
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const config = this.root.config;
    stream_context.headers.response.add("x-as-filter", config == "" ? "no config" : config);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32): RootContext => {
  return new AddHeaderRoot(context_id);
}, "add_header");
