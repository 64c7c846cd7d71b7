//! The host side's one `bindgen!` of wit/: typed imports to implement and exports to call.
//!
//! It binds the newest world (0.3.0), which includes 0.2.0's and 0.1.0's interfaces unchanged;
//! an older plugin is the same component without the newer worlds' imports and exports
//! (`describe` from 0.2.0, `chunks` from 0.3.0).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "weir:plugin/plugin@0.3.0",
    imports: {
        "weir:plugin/http-client@0.1.0.send": async | trappable,
        // A kv on Redis awaits the network; the memory kv answers at once.
        "weir:plugin/kv@0.1.0.get": async | trappable,
        "weir:plugin/kv@0.1.0.set": async | trappable,
        "weir:plugin/kv@0.1.0.delete": async | trappable,
        "weir:plugin/kv@0.1.0.incr": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    with: {
        "weir:plugin/http@0.1.0.request": crate::view::RequestView,
        "weir:plugin/http@0.1.0.response": crate::view::ResponseView,
    },
});
