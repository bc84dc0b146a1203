//! `broker serve` and `broker token`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ledger::ids::PrincipalId;
use ledger::{Config, Ledger, keyfile};

use crate::server::{self, Broker, ServeOptions};

/// Arguments of `broker serve`.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// The data directory: the ledger in `ledger/`, datasets in `datasets/`. Created, with a
    /// new ledger, when it has none.
    #[arg(long, env = "CONSENTRY_DATA_DIR", default_value = "consentry-data")]
    pub data_dir: PathBuf,
    /// Address to listen on (gRPC; port 0 picks a free port).
    #[arg(long, env = "CONSENTRY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// PEM certificate chain for TLS (with --tls-key); plaintext without.
    #[arg(long, env = "CONSENTRY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "CONSENTRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Checkpoint origin of a ledger created by this command.
    #[arg(
        long,
        env = "CONSENTRY_ORIGIN",
        default_value = "consentry.local/ledger"
    )]
    pub origin: String,
    /// Operator id of a ledger created by this command (the ledger key's name).
    #[arg(long, env = "CONSENTRY_OPERATOR", default_value = "operator")]
    pub operator: String,
}

/// Arguments of `broker token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The principal's private key file (signed-note text form, mode 0600).
    #[arg(long, env = "CONSENTRY_KEY")]
    pub key: PathBuf,
    /// Lifetime, e.g. `10m`, `90s` (at most 15m).
    #[arg(long, env = "CONSENTRY_TOKEN_TTL", default_value = "10m", value_parser = parse_ttl)]
    pub ttl: Duration,
}

/// Parses `90`, `90s`, `10m`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (num, mult) = match s.strip_suffix('m') {
        Some(n) => (n, 60),
        None => (s.strip_suffix('s').unwrap_or(s), 1),
    };
    num.parse::<u64>()
        .map(|n| Duration::from_secs(n * mult))
        .map_err(|_| format!("{s:?} is not a duration like 10m or 90s"))
}

/// Opens the data directory's ledger, creating it when the directory has none.
pub fn open_or_init(args: &ServeArgs) -> anyhow::Result<Ledger> {
    let dir = args.data_dir.join("ledger");
    if !dir.join("ledger.json").exists() {
        let op = PrincipalId::new(&args.operator)?;
        let l = Ledger::init(&dir, &args.origin, &op, Config::default())
            .with_context(|| format!("creating the ledger in {}", dir.display()))?;
        eprintln!(
            "created the ledger {} in {}; operator key: {}",
            args.origin,
            dir.display(),
            dir.join("ledger.key").display()
        );
        return Ok(l);
    }
    let (l, report) = Ledger::open(&dir, Config::default())
        .with_context(|| format!("opening the ledger in {}", dir.display()))?;
    if report.truncated_bytes > 0 {
        eprintln!(
            "note: cut {} bytes of a torn tail left by a crash (no acknowledged entry lost)",
            report.truncated_bytes
        );
    }
    Ok(l)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Runs `broker serve` until SIGINT or SIGTERM; in-flight calls and their appends finish
/// before the ledger closes.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ledger = Arc::new(open_or_init(&args)?);
    rt.block_on(async {
        let broker = Broker::new(ledger.clone(), &args.data_dir)?;
        let tls = args.tls_cert.clone().zip(args.tls_key.clone());
        let running = server::serve(
            broker,
            ServeOptions {
                listen: args.listen,
                tls,
            },
        )
        .await?;
        eprintln!("serving on {}", running.addr);
        running.until(shutdown_signal()).await
    })?;
    drop(rt);
    close(ledger)?;
    eprintln!("stopped");
    Ok(())
}

/// Closes the ledger once the server that shared it has stopped.
pub fn close(ledger: Arc<Ledger>) -> anyhow::Result<()> {
    match Arc::try_unwrap(ledger) {
        Ok(l) => l.close()?,
        Err(_) => eprintln!("note: the ledger was still referenced at shutdown"),
    }
    Ok(())
}

/// Runs `broker token`: prints a bearer token.
pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let key = keyfile::read_private_key(&args.key)
        .with_context(|| format!("reading the key {}", args.key.display()))?;
    println!("{}", crate::auth::mint(&key, args.ttl)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("ten").is_err());
        assert!(parse_ttl("-1m").is_err());
    }
}
