//! The gRPC services (`proto/consentry/v1`), served by `broker serve`.
//!
//! [`Broker`] is the shared state: the ledger, the data directory's dataset store and the
//! loaded query engines. Every service but health and reflection sits behind [`authenticate`],
//! which checks the bearer JWT against the ledger and puts the [`Caller`] into the request.
//!
//! Modules: `registry`, `consent`, `query`, `audit`, `ledger_svc` (one per service).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ledger::Ledger;
use ledger::ids::Timestamp;
use proto::v1;
use tonic::{Request, Status};

use crate::auth::{self, Caller};
use crate::error::Error;
use crate::secrets::Secrets;
use crate::store::Store;

mod audit;
mod consent;
pub mod flight;
mod ledger_svc;
mod query;
mod registry;

/// Largest gRPC message sent (bundles and exports), and what clients accept.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Largest gRPC message accepted: a ledger entry's limit and some room (uploads come in 1 MiB
/// chunks). A larger request is refused by the transport before it is parsed (a 54 MB consent
/// once took 7.8 s and 600 MB to be refused by the ledger).
pub const MAX_REQUEST: usize = ledger::storage::MAX_RECORD + (1 << 20);

/// The broker's shared state.
pub struct Broker {
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) store: Store,
    pub(crate) secrets: Arc<Secrets>,
    /// The longest token lifetime accepted.
    pub(crate) max_token_lifetime: std::time::Duration,
}

impl Broker {
    /// A broker over an open ledger and the data directory that holds its datasets, with the
    /// default limits per query.
    pub fn new(ledger: Arc<Ledger>, data_dir: &Path) -> Result<Arc<Broker>, Error> {
        Self::with_limits(
            ledger,
            data_dir,
            anonymizer::Limits::default(),
            auth::MAX_LIFETIME,
        )
    }

    /// [`Broker::new`] whose queries run within `limits`, accepting tokens that live up to
    /// `max_token_lifetime`.
    pub fn with_limits(
        ledger: Arc<Ledger>,
        data_dir: &Path,
        limits: anonymizer::Limits,
        max_token_lifetime: std::time::Duration,
    ) -> Result<Arc<Broker>, Error> {
        Ok(Arc::new(Broker {
            max_token_lifetime,
            store: Store::open(data_dir, limits)?,
            secrets: Arc::new(
                Secrets::open(data_dir, ledger.derived_key(crate::secrets::KEY_CONTEXT))
                    .map_err(|e| Error::internal("opening the study secrets", e))?,
            ),
            ledger,
        }))
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Runs a blocking ledger call (an append waits for its fsync) off the async threads.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&Ledger) -> ledger::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || f(&ledger))
            .await
            .map_err(|e| Error::internal("a ledger task failed", e))?
            .map_err(Error::from)
    }
}

/// The caller put into the request by [`authenticate`].
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Error> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Error::unauthenticated("no authenticated caller"))
}

/// Checks the bearer token (or Basic credentials carrying one, [`auth::credentials`]) of a
/// request against the ledger's current state.
pub fn authenticate(broker: &Broker, mut req: Request<()>) -> Result<Request<()>, Status> {
    let value = req
        .metadata()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or(""));
    let caller = auth::credentials(value)
        .and_then(|(t, user)| {
            let caller = auth::verify(
                &t,
                &broker.ledger.state(),
                Timestamp::now().unix(),
                broker.max_token_lifetime,
            )?;
            match user {
                Some(u) if u != caller.id => Err(auth::AuthError::Invalid(
                    "the user name is not the token's principal".into(),
                )),
                _ => Ok(caller),
            }
        })
        .map_err(|e| {
            tracing::info!(error = %e, "call refused: unauthenticated");
            Status::from(Error::unauthenticated(e.to_string()))
        })?;
    req.extensions_mut().insert(caller);
    Ok(req)
}

/// Decodes a signed entry sent by a client and checks that its author is the caller: the
/// broker appends only what the caller itself signed.
pub(crate) fn signed_by_caller(
    caller: &Caller,
    e: Option<v1::SignedEntry>,
) -> Result<ledger::entry::SignedEntry, Error> {
    let leaf = e
        .ok_or_else(|| Error::invalid("the signed entry is missing"))?
        .leaf;
    let signed = ledger::entry::SignedEntry::from_leaf(&leaf, true)
        .map_err(|e| Error::invalid(format!("signed entry: {e}")))?;
    if signed.entry.author.as_str() != caller.id {
        return Err(Error::forbidden(format!(
            "the entry's author {} is not the caller {}; sign entries with your own key",
            signed.entry.author, caller.id
        )));
    }
    Ok(signed)
}

/// A caller's value quoted in a message: at most 64 characters of it, and its size when
/// longer (a 60 MB study name once came back as a 60 MB status).
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &s[..end], s.len()),
    }
}

pub(crate) fn appended(a: &ledger::Appended) -> v1::Appended {
    v1::Appended {
        index: a.index,
        leaf_hash: ledger::ids::Digest::from_bytes(a.leaf_hash).to_string(),
        tree_size: a.index + 1,
    }
}

/// Where `broker serve` listens and with what.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// PEM certificate chain and key for TLS; plaintext when absent.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long a shutdown waits for calls in flight before it cancels them ([`DRAIN`]).
    pub drain: std::time::Duration,
}

/// How long a shutdown waits, by default, for calls in flight (queries and their receipts
/// finish well within it; an upload left open by its client does not hold the broker up).
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// A running server.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    drain: std::time::Duration,
}

impl Running {
    /// Stops accepting calls, lets in-flight calls (and their appends) finish for up to the
    /// drain time, cancels what is left, and returns. A cancelled call has written nothing
    /// that is not acknowledged: appends are durable before they answer.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(self.drain, &mut self.task).await {
            Ok(served) => served
                .map_err(|e| Error::internal("the server task", e))?
                .map_err(|e| Error::internal("serving", e))?,
            Err(_) => {
                tracing::warn!(drain = ?self.drain, "calls still open after the drain time were cancelled");
                self.task.abort();
            }
        }
        Ok(())
    }

    /// Waits until the server stops on its own (an error) or `signal` completes.
    pub async fn until(self, signal: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        signal.await;
        self.shutdown().await
    }
}

/// Starts serving every service on `opts.listen`.
pub async fn serve(broker: Arc<Broker>, opts: ServeOptions) -> Result<Running, Error> {
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| Error::internal("listening on the address", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("listening on the address", e))?;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::internal("building reflection", e))?;
    // v1alpha too: grpcio's reflection client, older grpcurl and Postman still speak it.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::internal("building reflection", e))?;

    let b = broker.clone();
    let check = move |req: Request<()>| authenticate(&b, req);
    macro_rules! svc {
        ($server:ty, $imp:expr) => {
            tonic::service::interceptor::InterceptedService::new(
                <$server>::new($imp)
                    .max_decoding_message_size(MAX_REQUEST)
                    .max_encoding_message_size(MAX_MESSAGE),
                check.clone(),
            )
        };
    }
    use v1::audit_server::AuditServer;
    use v1::consent_server::ConsentServer;
    use v1::ledger_server::LedgerServer;
    use v1::query_server::QueryServer;
    use v1::registry_server::RegistryServer;
    health_reporter
        .set_serving::<RegistryServer<registry::RegistryService>>()
        .await;
    health_reporter
        .set_serving::<QueryServer<query::QueryService>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let mut builder = Server::builder();
    if let Some((cert, key)) = &opts.tls {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| Error::internal("reading the TLS files", e));
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| Error::internal("configuring TLS", e))?;
    }
    let router = builder
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc!(
            RegistryServer<registry::RegistryService>,
            registry::RegistryService(broker.clone())
        ))
        .add_service(svc!(
            ConsentServer<consent::ConsentService>,
            consent::ConsentService(broker.clone())
        ))
        .add_service(svc!(
            QueryServer<query::QueryService>,
            query::QueryService(broker.clone())
        ))
        .add_service(svc!(
            AuditServer<audit::AuditService>,
            audit::AuditService(broker.clone())
        ))
        .add_service(svc!(
            LedgerServer<ledger_svc::LedgerService>,
            ledger_svc::LedgerService(broker.clone())
        ))
        .add_service(svc!(
            arrow_flight::flight_service_server::FlightServiceServer<flight::Envelopes>,
            flight::Envelopes(flight::FlightSql::new(broker.clone())?)
        ));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Small responses (a header, then the result) must not wait for delayed ACKs: without
    // TCP_NODELAY each query took 40 ms more on loopback.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, tls = opts.tls.is_some(), "broker serving");
    Ok(Running {
        addr,
        shutdown: Some(tx),
        task,
        drain: opts.drain,
    })
}
