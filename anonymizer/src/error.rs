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
        /// Which part of the budget: `epsilon` or `delta`.
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
            D::SchemaError(e, _) => Error::InvalidQuery(e.to_string()),
            other => Error::Engine(other.to_string()),
        }
    }
}

/// The anonymizer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
