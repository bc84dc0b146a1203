//! `broker principal …`: the operator registers principals, rotates their keys and revokes
//! them, over gRPC while the broker serves (the ledger has one writer: the broker).

use clap::{Args, Subcommand};
use ledger::entry::Body;
use proto::v1;

use super::conn::{self, Conn};
use crate::client;

/// Arguments of `broker principal`.
#[derive(Debug, Args)]
pub struct PrincipalArgs {
    /// The principal command.
    #[command(subcommand)]
    pub command: PrincipalCommand,
}

/// Principal commands, signed with --key (the operator's: the ledger key, `ledger/ledger.key`).
#[derive(Debug, Subcommand)]
pub enum PrincipalCommand {
    /// Register a principal with its verifier key (the principal makes its key pair with
    /// `broker ledger keygen` and hands over only the verifier key it prints).
    Add {
        /// The principal's id (the name in its key).
        #[arg(long, env = "CONSENTRY_PRINCIPAL")]
        id: String,
        /// What it may do: custodian, irb, researcher, sponsor, patient, witness or operator.
        #[arg(long, env = "CONSENTRY_ROLE")]
        role: String,
        /// Its verifier key (signed-note text form, `<id>+<hash>+<base64>`).
        #[arg(long, env = "CONSENTRY_VERIFIER_KEY")]
        verifier_key: String,
        /// For a patient: the privacy-unit id that is theirs in the datasets.
        #[arg(long, env = "CONSENTRY_SUBJECT")]
        subject: Option<String>,
        /// A human-readable name (an institution's; never a patient's name).
        #[arg(long, env = "CONSENTRY_DISPLAY_NAME")]
        display_name: Option<String>,
    },
    /// Replace a principal's key (tokens signed with the old key stop working at once).
    Rotate {
        /// The principal's id.
        #[arg(long, env = "CONSENTRY_PRINCIPAL")]
        id: String,
        /// Its new verifier key (same name).
        #[arg(long, env = "CONSENTRY_VERIFIER_KEY")]
        verifier_key: String,
    },
    /// Revoke a principal for good (its tokens stop working at once).
    Revoke {
        /// The principal's id.
        #[arg(long, env = "CONSENTRY_PRINCIPAL")]
        id: String,
        /// Why, for the record.
        #[arg(long, env = "CONSENTRY_REASON")]
        reason: Option<String>,
    },
}

/// The entry a principal command appends.
fn entry(command: PrincipalCommand) -> anyhow::Result<Body> {
    let (kind, json) = match command {
        PrincipalCommand::Add {
            id,
            role,
            verifier_key,
            subject,
            display_name,
        } => {
            let mut json = serde_json::json!({"id": id, "role": role, "key": verifier_key});
            if let Some(s) = subject {
                json["subject"] = s.into();
            }
            if let Some(d) = display_name {
                json["display_name"] = d.into();
            }
            ("principal_registered", json)
        }
        PrincipalCommand::Rotate { id, verifier_key } => (
            "key_rotated",
            serde_json::json!({"id": id, "key": verifier_key}),
        ),
        PrincipalCommand::Revoke { id, reason } => {
            let mut json = serde_json::json!({"id": id});
            if let Some(r) = reason {
                json["reason"] = r.into();
            }
            ("principal_revoked", json)
        }
    };
    Ok(Body::from_json(kind, &json.to_string())?)
}

/// Runs a principal command.
pub fn run(conn: &Conn, args: PrincipalArgs) -> anyhow::Result<()> {
    // Bad input is refused before any connection is made.
    let body = entry(args.command)?;
    conn::block_on(async move {
        let (key, auth) = conn.channel().await?;
        let a = v1::registry_client::RegistryClient::new(auth)
            .append(client::sign(&key, body)?)
            .await
            .map_err(conn::status)?
            .into_inner();
        conn::print_json(&conn::appended(&a))
    })
}
