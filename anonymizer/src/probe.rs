//! Health probes: `SELECT 1`, `SELECT 'ok' AS status` and the like, which BI tools and
//! connection pools send to test a connection.
//!
//! A probe is a SELECT of literals and nothing else (no FROM, WHERE or any other clause; at
//! most [`MAX_ITEMS`] values). It reads no table, so its answer depends on nothing the data
//! holds, and it is answered here without the query path: no consent, budget or receipt.
//! Anything else is not a probe and goes the whole way.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::sql::sqlparser::ast::{Expr, SelectItem, SetExpr, Statement, Value};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// Most values a probe may select.
pub const MAX_ITEMS: usize = 16;

/// Longest SQL text considered for a probe.
const MAX_SQL: usize = 1024;

/// The answer to `sql` when it is a probe (a SELECT of literals alone), else `None`.
pub fn answer(sql: &str) -> Option<RecordBatch> {
    if sql.len() > MAX_SQL {
        return None;
    }
    let mut statements = Parser::parse_sql(&GenericDialect {}, sql).ok()?;
    let [Statement::Query(query)] = statements.as_mut_slice() else {
        return None;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let items = &select.projection;
    if items.is_empty() || items.len() > MAX_ITEMS {
        return None;
    }
    // Nothing but the list of values: the statement prints back as `SELECT <items>`, so any
    // other clause (FROM, WHERE, DISTINCT, ORDER BY, LIMIT, WITH...) makes it no probe.
    let bare = format!(
        "SELECT {}",
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if query.to_string() != bare {
        return None;
    }
    let mut fields = Vec::with_capacity(items.len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(items.len());
    for item in items {
        let (expr, name) = match item {
            SelectItem::UnnamedExpr(e) => (e, e.to_string()),
            SelectItem::ExprWithAlias { expr, alias } => (expr, alias.value.clone()),
            _ => return None,
        };
        let Expr::Value(v) = expr else {
            return None;
        };
        let column: ArrayRef = match &v.value {
            Value::Number(n, _) => match n.parse::<i64>() {
                Ok(i) => Arc::new(Int64Array::from(vec![i])),
                Err(_) => Arc::new(Float64Array::from(vec![n.parse::<f64>().ok()?])),
            },
            Value::SingleQuotedString(s) => Arc::new(StringArray::from(vec![s.as_str()])),
            Value::Boolean(b) => Arc::new(BooleanArray::from(vec![*b])),
            Value::Null => Arc::new(StringArray::from(vec![None::<&str>])),
            _ => return None,
        };
        fields.push(Field::new(name, column.data_type().clone(), true));
        columns.push(column);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray as _};
    use arrow::datatypes::Int64Type;

    #[test]
    fn literals_alone_are_probes() {
        let b = answer("SELECT 1").unwrap();
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.column(0).as_primitive::<Int64Type>().value(0), 1);
        let b = answer("select 'ok' as status, 2.5, true, null").unwrap();
        assert_eq!(b.schema().field(0).name(), "status");
        assert_eq!(b.column(0).as_string::<i32>().value(0), "ok");
        assert_eq!(b.num_columns(), 4);
        assert!(b.column(3).is_null(0));
    }

    #[test]
    fn anything_else_goes_the_whole_way() {
        for sql in [
            "SELECT 1 FROM patients",
            "SELECT COUNT(*) FROM patients",
            "SELECT 1 WHERE 1 = 1",
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM patients WHERE ssn = '1')",
            "SELECT 1 + 1",
            "SELECT now()",
            "SELECT DISTINCT 1",
            "SELECT 1 ORDER BY 1",
            "SELECT 1 LIMIT 1",
            "WITH t AS (SELECT 1) SELECT 1",
            "SELECT 1 UNION SELECT 2",
            "SELECT 1; SELECT 2",
            "SELECT (SELECT COUNT(*) FROM patients)",
            "SELECT *",
            "VALUES (1)",
            "",
        ] {
            assert!(answer(sql).is_none(), "{sql}");
        }
        let many = format!("SELECT {}", vec!["1"; MAX_ITEMS + 1].join(", "));
        assert!(answer(&many).is_none());
    }
}
