//! The `broker` binary: parse the command line, set up logging, run the command.

use clap::Parser as _;

/// jemalloc: a long-running broker's freed memory goes back to the system within seconds
/// (glibc's per-thread arenas held on to it; see the workspace's Cargo.toml).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    quiet_on_closed_pipe();
    let cli = broker::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONSENTRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log)),
        )
        .with_writer(std::io::stderr)
        .init();
    match broker::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Output piped into a reader that stops early (`broker dataset inspect --json | head`) ends
/// the command quietly, as SIGPIPE ends other tools (exit status 141), instead of a panic:
/// Rust ignores SIGPIPE, so printing to the closed pipe panics.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
