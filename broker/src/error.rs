//! The broker's error type, and the one place where gRPC status codes are chosen.
//!
//! The store, the kept releases and the services return [`Error`]; only the tonic handlers
//! turn it into a [`tonic::Status`], through the one `match` in `From<Error> for Status`.
//! Variants are named for what the caller can do about them. A fault of the broker
//! ([`Error::Internal`], a ledger's storage failure, an engine's own error) is logged with
//! its detail and reaches the caller as `INTERNAL` with fixed words: messages never carry
//! record values, keys or file paths.

use tonic::{Code, Status};

/// Everything a broker call can end with, other than success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ledger refused the entry, or failed (its variants choose the code).
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
    /// The query engine refused or failed (its variants choose the code).
    #[error(transparent)]
    Anonymizer(#[from] anonymizer::Error),
    /// The request is malformed or out of bounds; nothing changed. Fix the request.
    #[error("{0}")]
    Invalid(String),
    /// No credentials, or credentials that do not verify. Sign in again.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (its role, the study's membership or state, consent).
    #[error("{0}")]
    Forbidden(String),
    /// The object named does not exist, or is not the caller's to know of.
    #[error("{0}")]
    NotFound(String),
    /// What the request would create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the state does not allow it now (a step missing before it).
    #[error("{0}")]
    Precondition(String),
    /// A limit is reached (a privacy budget, the results waiting for download); the message
    /// says which. Wait, or ask for more.
    #[error("{0}")]
    Exhausted(String),
    /// Stored bytes are missing or damaged; the operator must restore them.
    #[error("{0}")]
    DataLoss(String),
    /// The caller went silent for too long (an upload that stopped sending).
    #[error("{0}")]
    TimedOut(String),
    /// A request stream's own status (a message that did not decode, a call cancelled by
    /// its client): passed on with the transport's code.
    #[error("{}", .0.message())]
    Stream(tonic::Status),
    /// A call the broker does not offer (a Flight SQL command outside statements and the
    /// catalog).
    #[error("{0}")]
    Unsupported(String),
    /// The broker cannot take the call now (shutting down, the ledger busy); retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A query passed its checks, was charged, and then failed while running (a limit, an
    /// engine error, a panic, a receipt refused after the draw). Its words are fixed: how a
    /// query fails must not depend on the rows it read.
    #[error(
        "the query failed while running (it may have exceeded the broker's memory or time \
         limit per query); its privacy spend was charged"
    )]
    Failed,
    /// A refusal receipted on the ledger: the caller can point the IRB at the receipt. The
    /// code is the refusal's.
    #[error("{error} (receipt {receipt})")]
    Receipted {
        /// The refusal.
        error: Box<Error>,
        /// The receipt's ledger index.
        receipt: u64,
    },
    /// A fault of the broker. `what` is what failed, in fixed words the caller may read;
    /// `detail` goes to the operator's log only.
    #[error("{what}: {detail}")]
    Internal {
        /// What failed (fixed words, sent).
        what: &'static str,
        /// Why (logged, never sent).
        detail: String,
    },
}

/// The broker's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A malformed or out-of-bounds request.
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }

    /// A caller without valid credentials.
    pub fn unauthenticated(msg: impl Into<String>) -> Error {
        Error::Unauthenticated(msg.into())
    }

    /// A caller that may not do this.
    pub fn forbidden(msg: impl Into<String>) -> Error {
        Error::Forbidden(msg.into())
    }

    /// An unknown object.
    pub fn not_found(msg: impl Into<String>) -> Error {
        Error::NotFound(msg.into())
    }

    /// A duplicate.
    pub fn already_exists(msg: impl Into<String>) -> Error {
        Error::AlreadyExists(msg.into())
    }

    /// A request the state does not allow now.
    pub fn precondition(msg: impl Into<String>) -> Error {
        Error::Precondition(msg.into())
    }

    /// A limit reached.
    pub fn exhausted(msg: impl Into<String>) -> Error {
        Error::Exhausted(msg.into())
    }

    /// Damaged or missing stored bytes.
    pub fn data_loss(msg: impl Into<String>) -> Error {
        Error::DataLoss(msg.into())
    }

    /// A call the broker cannot take now.
    pub fn unavailable(msg: impl Into<String>) -> Error {
        Error::Unavailable(msg.into())
    }

    /// A fault of the broker: `what` is sent, `detail` only logged.
    pub fn internal(what: &'static str, detail: impl std::fmt::Display) -> Error {
        Error::Internal {
            what,
            detail: detail.to_string(),
        }
    }

    /// Whether this is a privacy budget that cannot pay (the ledger's refusal of a receipt,
    /// or the engine's before it ran): recognized by type, never by a status code.
    pub fn is_budget_exhausted(&self) -> bool {
        matches!(
            self,
            Error::Ledger(ledger::Error::BudgetExhausted { .. })
                | Error::Anonymizer(anonymizer::Error::BudgetExhausted { .. })
        )
    }

    /// The status code, and whether the message may be sent (`false`: a fault whose detail
    /// stays in the log). The one place where codes are chosen.
    fn code(&self) -> (Code, bool) {
        use anonymizer::Error as A;
        use ledger::Error as L;
        match self {
            Error::Ledger(e) => match e {
                L::Decode(_)
                | L::InvalidValue(_)
                | L::BadSignature { .. }
                | L::ClockSkew { .. } => (Code::InvalidArgument, true),
                L::Proof(_) => (Code::InvalidArgument, true),
                L::Invalid(_) | L::Note(_) => (Code::FailedPrecondition, true),
                L::UnknownPrincipal(_) | L::RevokedPrincipal(_) => (Code::PermissionDenied, true),
                L::WrongRole { .. } | L::Forbidden(_) => (Code::PermissionDenied, true),
                L::AlreadyExists(_) => (Code::AlreadyExists, true),
                L::NotFound { .. } => (Code::NotFound, true),
                L::BudgetExhausted { .. } => (Code::ResourceExhausted, true),
                L::OutOfRange { .. } => (Code::OutOfRange, true),
                L::Poisoned | L::Locked => (Code::Unavailable, true),
                L::Corrupt { .. } | L::NotInitialized | L::AlreadyInitialized | L::Io(_) => {
                    (Code::Internal, false)
                }
            },
            // Refusals at plan time name the construct: they depend on the SQL and the policy
            // only, never on the rows.
            Error::Anonymizer(e) => match e {
                A::Refused { .. } | A::InvalidQuery(_) => (Code::InvalidArgument, true),
                A::BudgetExhausted { .. } => (Code::ResourceExhausted, true),
                A::Policy(_) | A::Dataset(_) | A::BadValue { .. } => {
                    (Code::FailedPrecondition, true)
                }
                A::Failed { .. } => (Code::Internal, true),
                A::Mechanism(_) | A::Engine(_) | A::Secret(_) => (Code::Internal, false),
            },
            Error::Invalid(_) => (Code::InvalidArgument, true),
            Error::Unauthenticated(_) => (Code::Unauthenticated, true),
            Error::Forbidden(_) => (Code::PermissionDenied, true),
            Error::NotFound(_) => (Code::NotFound, true),
            Error::AlreadyExists(_) => (Code::AlreadyExists, true),
            Error::Precondition(_) => (Code::FailedPrecondition, true),
            Error::Exhausted(_) => (Code::ResourceExhausted, true),
            Error::DataLoss(_) => (Code::DataLoss, true),
            Error::Unavailable(_) => (Code::Unavailable, true),
            Error::TimedOut(_) => (Code::DeadlineExceeded, true),
            Error::Unsupported(_) => (Code::Unimplemented, true),
            Error::Stream(s) => (s.code(), true),
            Error::Failed => (Code::Internal, true),
            Error::Receipted { error, .. } => error.code(),
            Error::Internal { .. } => (Code::Internal, false),
        }
    }

    /// The words the caller gets (and a denial's receipt records): the message, or fixed
    /// words for a fault, whose detail only the log sees.
    pub fn words(&self) -> String {
        if self.code().1 {
            return self.to_string();
        }
        match self {
            Error::Internal { what, .. } => format!("{what}; see the broker's log"),
            Error::Anonymizer(_) => {
                "the query could not be run because of an internal error".into()
            }
            Error::Receipted { error, receipt } => {
                format!("{} (receipt {receipt})", error.words())
            }
            _ => "the ledger failed; the operator has been told in the broker's log".into(),
        }
    }

    /// The status code (for logs).
    pub fn grpc_code(&self) -> Code {
        self.code().0
    }

    /// Logs a fault's detail (an engine's message may quote values: only its kind is
    /// logged).
    fn log(&self) {
        match self {
            Error::Receipted { error, .. } => error.log(),
            Error::Anonymizer(e) => tracing::error!(kind = e.kind(), "internal error in a query"),
            e if !e.code().1 => tracing::error!(error = %e, "internal error"),
            _ => {}
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let (code, public) = e.code();
        if !public {
            e.log();
        }
        Status::new(code, e.words())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: Error, code: Code, sent: Option<&str>) {
        let what = format!("{e:?}");
        let s = Status::from(e);
        assert_eq!(s.code(), code, "{what}");
        match sent {
            Some(m) => assert_eq!(s.message(), m, "{what}"),
            // A fault's detail never reaches the caller.
            None => assert!(
                !s.message().contains("SECRET-DETAIL")
                    && (s.message().contains("log") || s.message().contains("internal error")),
                "{what}: {}",
                s.message()
            ),
        }
    }

    #[test]
    fn every_broker_arm_has_its_code() {
        check(Error::invalid("bad"), Code::InvalidArgument, Some("bad"));
        check(
            Error::unauthenticated("who"),
            Code::Unauthenticated,
            Some("who"),
        );
        check(Error::forbidden("no"), Code::PermissionDenied, Some("no"));
        check(Error::not_found("gone"), Code::NotFound, Some("gone"));
        check(
            Error::already_exists("twice"),
            Code::AlreadyExists,
            Some("twice"),
        );
        check(
            Error::precondition("first"),
            Code::FailedPrecondition,
            Some("first"),
        );
        check(
            Error::exhausted("spent"),
            Code::ResourceExhausted,
            Some("spent"),
        );
        check(Error::data_loss("damaged"), Code::DataLoss, Some("damaged"));
        check(
            Error::unavailable("later"),
            Code::Unavailable,
            Some("later"),
        );
        check(
            Error::Unsupported("PUT".into()),
            Code::Unimplemented,
            Some("PUT"),
        );
        check(
            Error::TimedOut("silent".into()),
            Code::DeadlineExceeded,
            Some("silent"),
        );
        check(
            Error::Stream(Status::invalid_argument("undecodable")),
            Code::InvalidArgument,
            Some("undecodable"),
        );
        check(
            Error::Failed,
            Code::Internal,
            Some(
                "the query failed while running (it may have exceeded the broker's memory or \
                 time limit per query); its privacy spend was charged",
            ),
        );
        check(
            Error::internal("the store failed", "SECRET-DETAIL /var/data/x"),
            Code::Internal,
            None,
        );
        assert!(
            Status::from(Error::internal("the store failed", "x"))
                .message()
                .starts_with("the store failed")
        );
    }

    #[test]
    fn every_ledger_arm_has_its_code() {
        use ledger::Error as L;
        let io = || std::io::Error::other("SECRET-DETAIL");
        let cases: Vec<(L, Code)> = vec![
            (
                L::Decode(ledger::entry::DecodeError::Json("x".into())),
                Code::InvalidArgument,
            ),
            (
                L::BadSignature { author: "a".into() },
                Code::InvalidArgument,
            ),
            (
                L::ClockSkew {
                    skew_secs: 900,
                    max_secs: 300,
                },
                Code::InvalidArgument,
            ),
            (L::Invalid("rule".into()), Code::FailedPrecondition),
            (L::UnknownPrincipal("p".into()), Code::PermissionDenied),
            (L::RevokedPrincipal("p".into()), Code::PermissionDenied),
            (L::Forbidden("theirs".into()), Code::PermissionDenied),
            (L::AlreadyExists("v1".into()), Code::AlreadyExists),
            (
                L::NotFound {
                    what: "study",
                    id: "s".into(),
                },
                Code::NotFound,
            ),
            (
                L::BudgetExhausted {
                    study: "s".into(),
                    dataset: "d".into(),
                    epsilon_left: 0.0,
                    delta_left: 0.0,
                },
                Code::ResourceExhausted,
            ),
            (
                L::OutOfRange {
                    what: "leaf index",
                    value: 9,
                    size: 3,
                },
                Code::OutOfRange,
            ),
            (L::Poisoned, Code::Unavailable),
            (L::Locked, Code::Unavailable),
        ];
        for (e, code) in cases {
            let sent = e.to_string();
            check(Error::Ledger(e), code, Some(&sent));
        }
        for e in [
            L::Io(io()),
            L::Corrupt {
                index: 3,
                file: "entries.log",
                reason: "SECRET-DETAIL".into(),
            },
            L::NotInitialized,
            L::AlreadyInitialized,
        ] {
            check(Error::Ledger(e), Code::Internal, None);
        }
    }

    #[test]
    fn every_anonymizer_arm_has_its_code() {
        use anonymizer::Error as A;
        let sent = [
            (
                A::Refused {
                    construct: "SELECT *".into(),
                    advice: "name columns".into(),
                },
                Code::InvalidArgument,
            ),
            (
                A::InvalidQuery("no such column".into()),
                Code::InvalidArgument,
            ),
            (
                A::BudgetExhausted {
                    what: "epsilon",
                    needed: 1.0,
                    left: 0.5,
                },
                Code::ResourceExhausted,
            ),
            (A::Policy("p".into()), Code::FailedPrecondition),
            (A::Dataset("d".into()), Code::FailedPrecondition),
            (
                A::BadValue {
                    column: "c".into(),
                    reason: "r".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                A::Failed {
                    epsilon: 1.0,
                    delta: 0.0,
                    rho: None,
                },
                Code::Internal,
            ),
        ];
        for (e, code) in sent {
            let m = e.to_string();
            check(Error::Anonymizer(e), code, Some(&m));
        }
        for e in [
            A::Mechanism("SECRET-DETAIL".into()),
            A::Engine("SECRET-DETAIL".into()),
            A::Secret("SECRET-DETAIL".into()),
        ] {
            check(Error::Anonymizer(e), Code::Internal, None);
        }
    }

    #[test]
    fn budget_exhaustion_is_known_by_type() {
        let ledger_refusal = Error::Ledger(ledger::Error::BudgetExhausted {
            study: "s".into(),
            dataset: "d".into(),
            epsilon_left: 0.0,
            delta_left: 0.0,
        });
        assert!(ledger_refusal.is_budget_exhausted());
        assert!(
            Error::Anonymizer(anonymizer::Error::BudgetExhausted {
                what: "rho",
                needed: 1.0,
                left: 0.0,
            })
            .is_budget_exhausted()
        );
        // Other limits share the code, not the type.
        assert!(!Error::exhausted("results waiting").is_budget_exhausted());
        assert_eq!(
            Error::exhausted("x").grpc_code(),
            ledger_refusal.grpc_code()
        );
    }

    #[test]
    fn a_receipted_refusal_keeps_its_code_and_names_its_receipt() {
        check(
            Error::Receipted {
                error: Box::new(Error::forbidden("not a member")),
                receipt: 7,
            },
            Code::PermissionDenied,
            Some("not a member (receipt 7)"),
        );
        let fault = Error::Receipted {
            error: Box::new(Error::Anonymizer(anonymizer::Error::Engine(
                "SECRET-DETAIL".into(),
            ))),
            receipt: 8,
        };
        assert_eq!(
            fault.words(),
            "the query could not be run because of an internal error (receipt 8)"
        );
        let s = Status::from(fault);
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("SECRET-DETAIL"));
    }
}
