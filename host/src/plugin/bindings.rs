//! The host side's one `bindgen!` of wit/: typed imports to implement and exports to call.
//!
//! It binds the newest world (0.2.0), which includes 0.1.0's interfaces unchanged; a 0.1.0
//! plugin is the same component without 0.2.0's imports and its `describe` export.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "weir:plugin/plugin@0.2.0",
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
