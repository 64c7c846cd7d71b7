//! A gateway process for the tests that need one of their own (see `weir_tests::ChildGateway`).

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    weir_tests::serve_as_child().await;
}
