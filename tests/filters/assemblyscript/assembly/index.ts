// A proxy-wasm filter in AssemblyScript, on @solo-io/proxy-runtime (ABI 0.2.0), for Weir's tests.
// On request headers it adds `x-as: hello`, and when `:path` is `/as-local` answers 403 itself
// with body `denied by assemblyscript` and header `x-as-local: yes`. On response headers it adds
// `x-as-response: yes`.

// The functions the host calls: proxy_on_*, proxy_abi_version_0_2_0, malloc.
export * from "@solo-io/proxy-runtime/proxy";
import {
  Context,
  FilterHeadersStatusValues,
  GrpcStatusValues,
  HeaderPair,
  Headers,
  RootContext,
  registerRootContext,
  send_local_response,
  stream_context,
} from "@solo-io/proxy-runtime";

class WeirRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new WeirFilter(context_id, this);
  }

  // The runtime's own onConfigure reads the configuration with the size's value passed as the
  // pointer the host writes the returned size to; this filter has no configuration to read.
  onConfigure(configuration_size: u32): bool {
    return true;
  }
}

class WeirFilter extends Context {
  constructor(context_id: u32, root_context: WeirRoot) {
    super(context_id, root_context);
  }

  onRequestHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.add("x-as", "hello");
    if (stream_context.headers.request.get(":path") == "/as-local") {
      const extra: Headers = [];
      extra.push(new HeaderPair(String.UTF8.encode("x-as-local"), String.UTF8.encode("yes")));
      send_local_response(
        403,
        "",
        String.UTF8.encode("denied by assemblyscript"),
        extra,
        GrpcStatusValues.InvalidCode,
      );
      return FilterHeadersStatusValues.StopIteration;
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-as-response", "yes");
    return FilterHeadersStatusValues.Continue;
  }
}

// The runtime picks the root context by the host's `plugin_root_id` property: registered under
// "", the root id a host gives when a plugin names none.
registerRootContext((context_id: u32) => {
  return new WeirRoot(context_id);
}, "");
