//! The threads queries run on: a tokio runtime of their own, apart from whatever runtime
//! serves the callers, so that one query's operators (a join's build, a sort, a bounding
//! window) never hold up another caller's request. Dropping the future that waits for a
//! query stops the query (a deadline, a client gone).

use std::future::Future;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Stack of each query thread. Planning is bounded before it starts (the SQL's size), and
/// DataFusion grows its stack on deep plans (`recursive_protection`); this is headroom.
const STACK: usize = 8 << 20;

fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static QUERIES: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    QUERIES
        .get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(2, usize::from);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("consentry-query")
                .thread_stack_size(STACK)
                .enable_time()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Engine(format!("starting the query threads: {e}")))
}

/// Aborts the task when dropped.
struct Aborting<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `work` on the query threads and waits for it. A panic in it is an engine error (the
/// caller decides what the caller learns); dropping the returned future aborts `work`.
pub(crate) async fn run<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let mut task = Aborting(runtime()?.spawn(work));
    match (&mut task.0).await {
        Ok(out) => out,
        Err(e) if e.is_panic() => Err(Error::Engine("a query thread panicked".into())),
        Err(_) => Err(Error::Engine("the query was stopped".into())),
    }
}
