//! The host side's one `bindgen!` of wit/: typed imports to implement and exports to call.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: {
        "weir:plugin/http-client.send": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    with: {
        "weir:plugin/http.request": crate::exchange::RequestView,
        "weir:plugin/http.response": crate::exchange::ResponseView,
    },
});
