//! The anonymizer's error type.

/// Everything that can go wrong in the anonymizer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The query uses a construct that would not be safe to release; the message names it and
    /// says what to do instead.
    #[error("{construct} is not allowed: {advice}")]
    Refused {
        /// What was refused (e.g. `SELECT *`).
        construct: String,
        /// What to do instead.
        advice: String,
    },
    /// The query would spend more than the budget left.
    #[error("privacy budget exhausted: the query needs {what} {needed}, {left} left")]
    BudgetExhausted {
        /// Which part of the budget: `epsilon`, `rho` or `delta`.
        what: &'static str,
        /// What the query needs of it.
        needed: f64,
        /// What is left of it.
        left: f64,
    },
    /// The SQL does not parse or plan (unknown table or column, syntax).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// A column policy is malformed or does not match the data.
    #[error("policy: {0}")]
    Policy(String),
    /// A dataset file cannot be read.
    #[error("dataset: {0}")]
    Dataset(String),
    /// A noise mechanism could not be built or run.
    #[error("noise mechanism: {0}")]
    Mechanism(String),
    /// A column holds a value its policy does not allow (outside its domain, not a date, not a
    /// ZIP code). The message names the column, never the value.
    #[error("column {column}: {reason}")]
    BadValue {
        /// The column.
        column: String,
        /// What is wrong.
        reason: String,
    },
    /// A study secret is unusable (the message never shows it).
    #[error("study secret: {0}")]
    Secret(String),
    /// An error inside the query engine.
    #[error("query engine: {0}")]
    Engine(String),
    /// The query passed its checks and was charged, then failed while running (a limit of
    /// the broker, or an internal error). The message is the same whatever the cause: how a
    /// query fails must not depend on the rows it read.
    #[error("the query failed while running; its privacy spend was charged")]
    Failed {
        /// Epsilon charged.
        epsilon: f64,
        /// Delta charged.
        delta: f64,
        /// Rho charged, for a query with Gaussian noise.
        rho: Option<f64>,
    },
}

impl Error {
    /// An error of DataFusion's while planning a query against the schema-only catalog (no row
    /// is read there): the query is invalid. The message keeps DataFusion's first line,
    /// without the list of valid fields it appends (it would name hidden columns).
    pub fn planning(e: datafusion::error::DataFusionError) -> Error {
        match Error::from(e) {
            Error::InvalidQuery(m) | Error::Engine(m) => {
                let m = m.split("Valid fields are").next().unwrap_or("");
                let m = m.split("This issue was likely caused").next().unwrap_or("");
                let last = m.lines().map(str::trim).rfind(|l| !l.is_empty());
                Error::InvalidQuery(
                    last.unwrap_or("the query could not be planned")
                        .trim_end_matches('.')
                        .to_string(),
                )
            }
            other => other,
        }
    }

    /// The variant's name, for logs that must not carry a message (it may hold values).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Refused { .. } => "refused",
            Error::BudgetExhausted { .. } => "budget exhausted",
            Error::InvalidQuery(_) => "invalid query",
            Error::Policy(_) => "policy",
            Error::Dataset(_) => "dataset",
            Error::Mechanism(_) => "mechanism",
            Error::BadValue { .. } => "bad value",
            Error::Secret(_) => "secret",
            Error::Engine(_) => "engine",
            Error::Failed { .. } => "failed",
        }
    }
}

impl From<datafusion::error::DataFusionError> for Error {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as D;
        // DataFusion appends a bug-report request to some planning errors; it only confuses a
        // researcher whose query was simply wrong.
        let clean = |m: String| {
            m.split("This issue was likely caused")
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        };
        match e {
            D::Internal(m) => Error::InvalidQuery(clean(m)),
            D::Plan(m) | D::SQL(_, Some(m)) => Error::InvalidQuery(clean(m)),
            // Named without the list of valid fields DataFusion appends (it would show
            // columns the catalog hides).
            D::SchemaError(e, _) => match *e {
                datafusion::common::SchemaError::FieldNotFound { field, .. } => {
                    Error::InvalidQuery(format!("unknown column {}", field.name))
                }
                other => Error::InvalidQuery(other.to_string()),
            },
            other => Error::Engine(other.to_string()),
        }
    }
}

/// The anonymizer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
