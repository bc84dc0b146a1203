//! What every client command needs: the broker's address and the caller's key.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use ledger::note::SignerKey;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::client::{self, Bearer};

/// A broker to call, as a principal: global flags of `broker`, given before or after the
/// command (`broker --key K study create ...` or `broker study create ... --key K`).
#[derive(Debug, Args, Clone, PartialEq, Eq)]
pub struct Conn {
    /// The broker's address (client commands).
    #[arg(
        long,
        env = "CONSENTRY_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub url: String,
    /// The caller's private key file (signed-note text form, mode 0600): it signs the
    /// entries a command writes and the bearer token of every call (client commands, `token`,
    /// `ledger append` and `ledger cosign`).
    #[arg(long, env = "CONSENTRY_KEY", global = true)]
    pub key: Option<PathBuf>,
}

/// An authenticated channel.
pub type Auth = InterceptedService<Channel, Bearer>;

impl Conn {
    /// The caller's key file, which this command needs.
    pub fn key_path(&self) -> anyhow::Result<&std::path::Path> {
        self.key.as_deref().context(
            "this command signs as a principal: give its private key file with --key FILE \
             (or CONSENTRY_KEY)",
        )
    }

    /// The caller's key.
    pub fn signer(&self) -> anyhow::Result<SignerKey> {
        let path = self.key_path()?;
        ledger::keyfile::read_private_key(path)
            .with_context(|| format!("reading the key {}", path.display()))
    }

    /// Connects, with a fresh bearer token on every call.
    pub async fn channel(&self) -> anyhow::Result<(SignerKey, Auth)> {
        let key = self.signer()?;
        let channel = client::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        let bearer = Bearer::new(SignerKey::parse(&key.to_text())?);
        Ok((key, InterceptedService::new(channel, bearer)))
    }
}

/// Runs a client command on a small runtime.
pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// A gRPC refusal as an error a person can act on: the code and the broker's message.
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Prints a value as pretty JSON.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// An append's result as JSON.
pub fn appended(a: &proto::v1::Appended) -> serde_json::Value {
    serde_json::json!({"index": a.index, "leaf_hash": a.leaf_hash})
}

/// Creates `path` for writing; never overwrites an existing file.
pub fn create_new(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}
