//! The entry point of child gateway processes (see `weir_tests::ChildGateway`).

/// Runs a gateway in this process when started as a child; not a test on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by the tests that need a gateway process"]
async fn gateway_process() {
    weir_tests::serve_as_child().await;
}
