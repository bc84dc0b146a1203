//! `broker serve` and `broker token`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ledger::ids::PrincipalId;
use ledger::{Config, Ledger};

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
    /// What one query may cost.
    #[command(flatten)]
    pub limits: QueryLimits,
    /// The longest bearer token lifetime accepted, e.g. `15m` or `8h` (at most 24h). Longer
    /// lets an open ADBC connection or a notebook last a working day; every call still checks
    /// the caller's current key and status on the ledger, so a rotation or revocation takes
    /// effect at once, but a stolen token works until it expires.
    #[arg(long, env = "CONSENTRY_MAX_TOKEN_LIFETIME", default_value = "15m", value_parser = parse_lifetime)]
    pub max_token_lifetime: Duration,
}

/// A token lifetime: a duration from 1 minute to 24 hours.
fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = parse_ttl(s)?;
    if d < Duration::from_secs(60) || d > crate::auth::LONGEST_LIFETIME {
        return Err(format!("{s:?}: a token lifetime is from 1m to 24h"));
    }
    Ok(d)
}

/// What one query may cost. A query that exceeds a limit while running fails, is charged its
/// privacy spend (how a query fails must not be a free oracle) and is receipted `failed`; the
/// broker keeps serving the others.
#[derive(Debug, Args, Clone)]
pub struct QueryLimits {
    /// Memory one query's aggregates, joins and sorts may hold, e.g. `1GiB`, `512MiB` (nothing
    /// spills to disk).
    #[arg(long, env = "CONSENTRY_QUERY_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub query_memory: u64,
    /// How long one query may run, e.g. `60s`, `2m`.
    #[arg(long, env = "CONSENTRY_QUERY_DEADLINE", default_value = "60s", value_parser = parse_duration)]
    pub query_deadline: Duration,
    /// The most rows a join may produce in the worst case the policy's bounds allow; a join
    /// that could produce more is refused before it runs.
    #[arg(long, env = "CONSENTRY_QUERY_JOIN_ROWS", default_value_t = 50_000_000)]
    pub query_join_rows: u64,
    /// Memory the broker keeps released answers in for identical repeats, per dataset
    /// version, e.g. `64MiB` (older ones are read back from the data directory when repeated).
    #[arg(long, env = "CONSENTRY_REPEAT_MEMORY", default_value = "64MiB", value_parser = parse_bytes)]
    pub repeat_memory: u64,
    /// The release schedule's first step, in milliseconds: a query's answer (or its failure)
    /// leaves at the first of 1, 2, 4, 8... times this after its draw began that the draw has
    /// reached, so how long the rows took to read shows only as a step. 0 turns it off
    /// (answers leave as soon as drawn, and their timing can tell what the rows cost).
    #[arg(long, env = "CONSENTRY_RELEASE_LADDER_MS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub release_ladder_ms: u64,
}

impl Default for QueryLimits {
    fn default() -> QueryLimits {
        let d = anonymizer::Limits::default();
        QueryLimits {
            query_memory: d.memory as u64,
            query_deadline: d.deadline,
            query_join_rows: d.join_rows,
            repeat_memory: d.repeat_memory as u64,
            release_ladder_ms: u64::try_from(d.ladder.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl QueryLimits {
    /// Measures the release schedule's costs (on synthetic rows) before any caller is served:
    /// the machine still idle, and no first query waiting for it. Says them on stderr.
    pub async fn measure_schedule(&self) {
        if self.release_ladder_ms > 0 {
            let c = anonymizer::schedule::costs().await;
            eprintln!(
                "release schedule: a row costs {:.0} ns, a function call {:.0} ns (measured)",
                c.per_row * 1e9,
                c.per_call * 1e9
            );
        }
    }

    /// The engine's form.
    pub fn engine(&self) -> anonymizer::Limits {
        anonymizer::Limits {
            memory: usize::try_from(self.query_memory).unwrap_or(usize::MAX),
            deadline: self.query_deadline,
            join_rows: self.query_join_rows,
            repeat_memory: usize::try_from(self.repeat_memory).unwrap_or(usize::MAX),
            ladder: Duration::from_millis(self.release_ladder_ms),
        }
    }
}

/// Parses `1GiB`, `512MiB`, `64KiB` or a number of bytes; at least 1 MiB.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size like 1GiB, 512MiB or 1048576");
    let (num, mult) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    let n = num
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)?;
    if n < 1 << 20 {
        return Err(format!("{s:?}: a query needs at least 1MiB"));
    }
    Ok(n)
}

/// Parses a positive duration: `90`, `90s`, `10m`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_ttl(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    Ok(d)
}

/// Arguments of `broker token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Lifetime, e.g. `10m`, `90s`, `8h` (at most 24h; brokers accept more than 15m only
    /// where their operator allows it with --max-token-lifetime).
    #[arg(long, env = "CONSENTRY_TOKEN_TTL", default_value = "10m", value_parser = parse_ttl)]
    pub ttl: Duration,
}

/// Parses `90`, `90s`, `10m`, `2h`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (num, mult) = match (s.strip_suffix('h'), s.strip_suffix('m')) {
        (Some(n), _) => (n, 3600),
        (_, Some(n)) => (n, 60),
        _ => (s.strip_suffix('s').unwrap_or(s), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is not a duration like 10m or 90s"))
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
        let broker = Broker::with_limits(
            ledger.clone(),
            &args.data_dir,
            args.limits.engine(),
            args.max_token_lifetime,
        )?;
        args.limits.measure_schedule().await;
        let tls = args.tls_cert.clone().zip(args.tls_key.clone());
        let running = server::serve(
            broker,
            ServeOptions {
                listen: args.listen,
                tls,
                drain: server::DRAIN,
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
pub fn token(conn: &super::conn::Conn, args: TokenArgs) -> anyhow::Result<()> {
    let key = conn.signer()?;
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
        assert!(parse_ttl("99999999999999999999m").is_err());
        assert!(
            parse_ttl("999999999999999999m").is_err(),
            "overflow is an error"
        );
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2097152"), Ok(2 << 20));
        for bad in ["1KiB", "lots", "-1MiB", "99999999999GiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
