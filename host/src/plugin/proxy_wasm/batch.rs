//! The callbacks the gateway makes back to back, run in one entry into the guest.
//!
//! Each entry into a guest from the host is a fiber set up, switched to and torn down, and
//! a request's context makes six or seven of them: create, request headers, response
//! headers (and body), done, log and delete. A module of the gateway's own, instantiated next
//! to each filter instance and linked to its exports, makes create and request headers in
//! one entry; response headers and a body that arrived whole in another; and done, log and
//! delete in a third. Between two callbacks it calls the host, so that each callback still
//! runs under a CPU deadline of its own.

use std::sync::OnceLock;

use wasm_encoder::{
    BlockType, CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection,
    ImportSection, TypeSection, ValType,
};
use wasmtime::{AsContextMut, Caller, Engine, Extern, Func, Instance, Module, Store, TypedFunc};

use super::abi::ACTION_CONTINUE;
use crate::plugin::host::InstanceState;

/// The imports of the batch module, in its function index order, each with its type: the
/// filter's callbacks (a stand-in where it exports none), then the host's `rearm` and
/// `proceed`.
const IMPORTS: [(&str, u32); 9] = [
    ("proxy_on_context_create", 0),
    ("proxy_on_request_headers", 1),
    ("proxy_on_done", 2),
    ("proxy_on_log", 3),
    ("proxy_on_delete", 3),
    ("proxy_on_response_headers", 1),
    ("proxy_on_response_body", 1),
    ("rearm", 4),
    ("proceed", 7),
];
const CONTEXT_CREATE: u32 = 0;
const REQUEST_HEADERS: u32 = 1;
const DONE: u32 = 2;
const LOG: u32 = 3;
const DELETE: u32 = 4;
const RESPONSE_HEADERS: u32 = 5;
const RESPONSE_BODY: u32 = 6;
const REARM: u32 = 7;
const PROCEED: u32 = 8;
/// The host's own imports, which a filter's exports never stand in for.
const HOST: [&str; 2] = ["rearm", "proceed"];

/// The batch module, compiled once for the gateway's engine (every filter's store has it).
static MODULE: OnceLock<Result<Module, String>> = OnceLock::new();

/// The batch module for `engine`: the one compiled for the gateway's engine, or a new one for
/// another.
fn module(engine: &Engine) -> wasmtime::Result<Module> {
    let compiled = MODULE.get_or_init(|| Module::new(engine, encode()).map_err(|e| e.to_string()));
    match compiled {
        Ok(module) if Engine::same(module.engine(), engine) => Ok(module.clone()),
        Ok(_) => Module::new(engine, encode()),
        Err(e) => Err(wasmtime::format_err!(
            "the batch module did not compile: {e}"
        )),
    }
}

/// A fresh CPU deadline for the next callback: each gets the whole of it.
pub fn rearm(mut store: impl AsContextMut<Data = InstanceState>) {
    let mut store = store.as_context_mut();
    store.data_mut().clock.ticks_used = 0;
    store.set_epoch_deadline(1);
}

/// The batch module's bytes.
fn encode() -> Vec<u8> {
    let i32 = ValType::I32;
    let mut types = TypeSection::new();
    types.ty().function([i32, i32], []); // 0: create (context, parent)
    types.ty().function([i32, i32, i32], [i32]); // 1: headers (context, count, end)
    types.ty().function([i32], [i32]); // 2: done (context)
    types.ty().function([i32], []); // 3: log, delete, end (context)
    types.ty().function([], []); // 4: rearm
    types.ty().function([i32, i32, i32, i32], [i32]); // 5: begin
    types.ty().function([i32, i32, i32], [i32]); // 6: respond
    types.ty().function([], [i32]); // 7: proceed
    let mut imports = ImportSection::new();
    for (name, ty) in IMPORTS {
        imports.import("filter", name, EntityType::Function(ty));
    }
    let mut functions = FunctionSection::new();
    functions.function(5).function(3).function(6);
    let first = IMPORTS.len() as u32;
    let mut exports = ExportSection::new();
    exports
        .export("begin", ExportKind::Func, first)
        .export("end", ExportKind::Func, first + 1)
        .export("respond", ExportKind::Func, first + 2);

    // begin(context, parent, count, end): create, then the request headers' action.
    let mut begin = Function::new([]);
    begin
        .instructions()
        .local_get(0)
        .local_get(1)
        .call(CONTEXT_CREATE)
        .call(REARM)
        .local_get(0)
        .local_get(2)
        .local_get(3)
        .call(REQUEST_HEADERS)
        .end();
    // end(context): done, log and delete, Envoy's order.
    let mut end = Function::new([]);
    end.instructions()
        .local_get(0)
        .call(DONE)
        .drop()
        .call(REARM)
        .local_get(0)
        .call(LOG)
        .call(REARM)
        .local_get(0)
        .call(DELETE)
        .end();
    // respond(context, header count, body size): the response headers' action; when they go
    // on and the host has a whole body for it, the body callback, with the end of the stream.
    let mut respond = Function::new([(1, i32)]);
    respond
        .instructions()
        .local_get(0)
        .local_get(1)
        .i32_const(0)
        .call(RESPONSE_HEADERS)
        .local_tee(3)
        .if_(BlockType::Empty)
        .local_get(3)
        .return_()
        .end()
        .call(PROCEED)
        .if_(BlockType::Empty)
        .local_get(0)
        .local_get(2)
        .i32_const(1)
        .call(RESPONSE_BODY)
        .drop()
        .end()
        .i32_const(0)
        .end();
    let mut code = CodeSection::new();
    code.function(&begin).function(&end).function(&respond);

    let mut module = wasm_encoder::Module::new();
    module
        .section(&types)
        .section(&imports)
        .section(&functions)
        .section(&exports)
        .section(&code);
    module.finish()
}

/// A filter instance's batched entries.
#[derive(Clone)]
pub struct Batch {
    /// `begin(context, parent, header count, end of stream)`: `proxy_on_context_create`,
    /// then `proxy_on_request_headers`, whose action it returns.
    pub begin: TypedFunc<(u32, u32, u32, u32), u32>,
    /// `end(context)`: `proxy_on_done`, `proxy_on_log` and `proxy_on_delete`.
    pub end: TypedFunc<u32, ()>,
    /// `respond(context, header count, body size)`: `proxy_on_response_headers`, whose action
    /// it returns; if that goes on and the filter state has a `next_body`,
    /// `proxy_on_response_body` over it, with the end of the stream.
    pub respond: TypedFunc<(u32, u32, u32), u32>,
}

impl Batch {
    /// Instantiates the batch module in `store`, linked to the filter `instance`'s exports.
    pub async fn link(
        store: &mut Store<InstanceState>,
        instance: &Instance,
    ) -> wasmtime::Result<Batch> {
        let module = module(store.engine())?;
        let mut imports = Vec::with_capacity(IMPORTS.len());
        for (name, _) in IMPORTS {
            // The host's imports are the host's, whatever the filter exports under their names.
            let func = match instance.get_func(&mut *store, name) {
                Some(func) if !HOST.contains(&name) => func,
                _ => stand_in(store, name),
            };
            imports.push(Extern::Func(func));
        }
        let batch = Instance::new_async(&mut *store, &module, &imports).await?;
        Ok(Batch {
            begin: batch.get_typed_func(&mut *store, "begin")?,
            end: batch.get_typed_func(&mut *store, "end")?,
            respond: batch.get_typed_func(&mut *store, "respond")?,
        })
    }
}

/// What runs in place of `name`: the host's `rearm` and `proceed`, or what the ABI says a
/// callback the filter does not export does (nothing, and go on).
fn stand_in(store: &mut Store<InstanceState>, name: &str) -> Func {
    match name {
        "rearm" => Func::wrap(&mut *store, |caller: Caller<'_, InstanceState>| {
            rearm(caller);
        }),
        // The body callback runs once the headers' went on with no local response and no
        // closed stream, and only over a body the host offered.
        "proceed" => Func::wrap(&mut *store, |mut caller: Caller<'_, InstanceState>| {
            let Some(filter) = caller.data_mut().filter.as_mut() else {
                return 0u32;
            };
            if filter.local_reply.is_some() || filter.closed {
                return 0;
            }
            let Some(body) = filter.next_body.take() else {
                return 0;
            };
            filter.body = Some(body);
            rearm(&mut caller);
            1
        }),
        "proxy_on_request_headers" | "proxy_on_response_headers" | "proxy_on_response_body" => {
            Func::wrap(&mut *store, |_: u32, _: u32, _: u32| ACTION_CONTINUE)
        }
        "proxy_on_done" => Func::wrap(&mut *store, |_: u32| 1u32),
        _ => Func::wrap(&mut *store, |_: u32| {}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_module_is_valid_and_compiles() {
        let engine = Engine::default();
        module(&engine).unwrap();
        // A second engine gets a module of its own.
        let other = Engine::default();
        let again = module(&other).unwrap();
        assert!(Engine::same(again.engine(), &other));
    }
}
