//! Extract mode: de-identified, k-anonymous rows, for studies whose IRB approval allows them.
//!
//! A researcher's row-level SELECT is checked on DataFusion's logical plan (never its text):
//! only projections of plain columns, WHERE, ORDER BY and aliases over one table of the
//! dataset. No direct identifier may appear anywhere in the plan; the privacy unit may only be
//! selected (it is released as the study pseudonym), and columns whose released form is
//! generalized (dates, ZIP codes, ages, bands) cannot be used in conditions or sorting, which
//! would reveal the exact values the release hides.
//!
//! The query runs over the consented rows only (the consent bitmap of [`crate::consent`],
//! applied right above the table scan, as in the DP path). Its output then goes through:
//! 1. domain checks (a value outside a column's declared domain is released as NULL);
//! 2. Safe Harbor and the policy's quasi-identifier generalizations ([`crate::safe_harbor`]);
//! 3. pseudonyms for the privacy unit, fresh for each extract ([`crate::pseudonym`]), so two
//!    extracts cannot be joined on them;
//! 4. k-anonymity over every released column that is not sensitive (quasi-identifiers and
//!    public columns alike: sex or race single patients out in combination too): a row is
//!    released only if at least k distinct patients share those values; the other rows are
//!    suppressed and counted in [`Extract::suppressed_rows`], which the broker receipts.
//!
//! The query's expressions are made total ([`crate::total`]) and it reads only guarded rows
//! ([`crate::scan`]), as in the DP path.
//!
//! The released rows are sorted by their released values, never in the table's order (two
//! extracts of single columns would otherwise be zipped back into the rows k-anonymity
//! suppressed). Any error releases nothing. [`MinCellSize`] is the small-cell rule for aggregate outputs
//! that a study releases outside differential privacy.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type};
use arrow::row::{RowConverter, SortField};
use chrono::NaiveDate;
use datafusion::common::Column;
use datafusion::logical_expr::{Expr, LogicalPlan, Projection};

use crate::consent::ConsentFilter;
use crate::dataset::{Dataset, UNIT_COLUMN};
use crate::engine::{Engine, normalize_sql};
use crate::error::{Error, Result};
use crate::policy::{ColumnClass, ColumnPolicy, Domain, Policy};
use crate::pseudonym::StudySecret;
use crate::safe_harbor::Rule;

/// One extract.
#[derive(Debug)]
pub struct ExtractRequest<'a> {
    /// The SQL (DataFusion dialect): a row-level SELECT over one table.
    pub sql: &'a str,
    /// Who may be included.
    pub filter: &'a ConsentFilter,
    /// The k of the study's IRB approval: every released row is shared by at least k patients
    /// on its quasi-identifiers.
    pub k: u32,
    /// The study's pseudonym secret.
    pub secret: &'a StudySecret,
    /// The day ages and birth years are measured at (the day of the release).
    pub reference_date: NaiveDate,
}

/// A released extract and what its receipt records (the extract counterpart of
/// [`crate::engine::Release`]).
#[derive(Debug, Clone)]
pub struct Extract {
    /// Output schema: the selected columns in their released (generalized) types.
    pub schema: SchemaRef,
    /// The released rows.
    pub batches: Vec<RecordBatch>,
    /// The normalized SQL.
    pub sql: String,
    /// SHA-256 of the consent snapshot ([`crate::ConsentFilter::digest`]).
    pub consent_digest: [u8; 32],
    /// SHA-256 of the released result (its Arrow IPC stream).
    pub result_digest: [u8; 32],
    /// Rows released.
    pub rows: u64,
    /// Rows suppressed because fewer than k patients shared their quasi-identifiers.
    pub suppressed_rows: u64,
    /// The k applied.
    pub k: u32,
    /// The output columns k-anonymity was computed over (every non-sensitive one).
    pub quasi_identifiers: Vec<String>,
}

/// What an output column is and how it is released.
#[derive(Debug, Clone)]
struct OutColumn {
    /// Output name (the SELECT's alias, if any).
    name: String,
    /// The table column it comes from.
    source: String,
    class: ColumnClass,
    rule: Rule,
    domain: Option<Domain>,
}

/// A checked extract query.
#[derive(Debug)]
struct Checked {
    plan: LogicalPlan,
    columns: Vec<OutColumn>,
}

fn refuse(construct: impl Into<String>, advice: impl Into<String>) -> Error {
    Error::Refused {
        construct: construct.into(),
        advice: advice.into(),
    }
}

const SHAPE: &str = "an extract is SELECT <columns> FROM <one table> [WHERE ...]";

/// What the walk over the plan knows: the one table read, and the policy.
struct Walk<'a> {
    policy: &'a Policy,
    dataset: &'a Dataset,
    table: Option<String>,
}

impl Walk<'_> {
    fn table(&self) -> Result<&str> {
        self.table
            .as_deref()
            .ok_or_else(|| Error::Engine("a column before any table".into()))
    }

    fn policy_of(&self, source: &str) -> Result<&ColumnPolicy> {
        if source == UNIT_COLUMN {
            return Err(refuse(
                "the internal unit column",
                "select the dataset's own columns",
            ));
        }
        self.policy
            .column(self.table()?, source)
            .ok_or_else(|| Error::InvalidQuery(format!("unknown column {source}")))
    }

    fn rule_of(&self, source: &str, cp: &ColumnPolicy) -> Result<Rule> {
        let table = self.table()?;
        let t = self
            .dataset
            .tables
            .iter()
            .find(|t| t.name == table)
            .and_then(|t| t.schema.field_with_name(source).ok())
            .map(|f| f.data_type().clone())
            .ok_or_else(|| Error::InvalidQuery(format!("unknown column {source}")))?;
        Rule::for_column(source, cp, &t)
    }

    /// A column the SELECT releases.
    fn released(&self, source: &str) -> Result<()> {
        if self.policy_of(source)?.class == ColumnClass::DirectIdentifier {
            return Err(refuse(
                format!("reading column {source}"),
                "it is a direct identifier and is never read or released; leave it out",
            ));
        }
        Ok(())
    }

    /// A column used in WHERE or ORDER BY.
    fn condition(&self, source: &str, place: &str) -> Result<()> {
        let cp = self.policy_of(source)?;
        match cp.class {
            ColumnClass::DirectIdentifier => Err(refuse(
                format!("column {source} in {place}"),
                "it is a direct identifier and can never be read",
            )),
            ColumnClass::PrivacyUnit => Err(refuse(
                format!("the privacy unit {source} in {place}"),
                "patient ids are released only as study pseudonyms; select it instead",
            )),
            _ if self.rule_of(source, cp)? != Rule::Keep => Err(refuse(
                format!("column {source} in {place}"),
                "its values are generalized in the release (Safe Harbor or the policy), and a \
                 condition or order on the exact values would reveal them; filter on other \
                 columns",
            )),
            _ => Ok(()),
        }
    }

    /// Checks `plan`; returns the source column of each output field.
    fn walk(&mut self, plan: &LogicalPlan) -> Result<Vec<String>> {
        match plan {
            LogicalPlan::TableScan(s) => {
                let name = s.table_name.table().to_string();
                match &self.table {
                    Some(t) if *t != name => {
                        return Err(refuse(
                            "reading more than one table",
                            "extract from one table at a time",
                        ));
                    }
                    _ => self.table = Some(name),
                }
                if !s.filters.is_empty() {
                    return Err(refuse("filters inside the table scan", SHAPE));
                }
                Ok(s.projected_schema
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect())
            }
            LogicalPlan::Projection(p) => {
                let src = self.walk(&p.input)?;
                let mut out = Vec::with_capacity(p.expr.len());
                for e in &p.expr {
                    no_subquery(e)?;
                    let Expr::Column(c) = strip_alias(e) else {
                        return Err(refuse(
                            format!("the expression {} in SELECT", strip_alias(e)),
                            "select columns as they are; the extract generalizes them per the \
                             policy",
                        ));
                    };
                    let s = source(&p.input, &src, c)?;
                    self.released(&s)?;
                    out.push(s);
                }
                Ok(out)
            }
            LogicalPlan::Filter(f) => {
                let src = self.walk(&f.input)?;
                no_subquery(&f.predicate)?;
                for c in f.predicate.column_refs() {
                    self.condition(&source(&f.input, &src, c)?, "WHERE")?;
                }
                Ok(src)
            }
            LogicalPlan::Sort(s) => {
                let src = self.walk(&s.input)?;
                for e in &s.expr {
                    no_subquery(&e.expr)?;
                    for c in e.expr.column_refs() {
                        self.condition(&source(&s.input, &src, c)?, "ORDER BY")?;
                    }
                }
                Ok(src)
            }
            LogicalPlan::Limit(_) => Err(refuse(
                "LIMIT and OFFSET in an extract",
                "an extract releases every row of its query (two limits one row apart would \
                 single that row out); narrow it with WHERE",
            )),
            LogicalPlan::SubqueryAlias(s) => self.walk(&s.input),
            LogicalPlan::Aggregate(_) => Err(refuse(
                "aggregates in an extract",
                "run aggregates as differentially private queries",
            )),
            LogicalPlan::Join(_) => Err(refuse("joins", "extract from one table at a time")),
            LogicalPlan::Distinct(_) => Err(refuse(
                "SELECT DISTINCT",
                "select the rows; k-anonymity already groups them",
            )),
            LogicalPlan::Union(_) => Err(refuse("UNION", "run each extract separately")),
            LogicalPlan::Window(_) => Err(refuse("window functions", SHAPE)),
            other => Err(refuse(format!("the {} operator", other.display()), SHAPE)),
        }
    }
}

/// The source column of `c`, a column of `input`'s output.
fn source(input: &LogicalPlan, src: &[String], c: &Column) -> Result<String> {
    let i = input
        .schema()
        .index_of_column(c)
        .map_err(|_| Error::InvalidQuery(format!("unknown column {}", c.name)))?;
    src.get(i)
        .cloned()
        .ok_or_else(|| Error::Engine("plan schema mismatch".into()))
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

fn no_subquery(e: &Expr) -> Result<()> {
    if crate::plan::has_subquery(e)? {
        return Err(refuse("subqueries", SHAPE));
    }
    Ok(())
}

fn check(plan: &LogicalPlan, dataset: &Dataset) -> Result<Checked> {
    let mut walk = Walk {
        policy: &dataset.policy,
        dataset,
        table: None,
    };
    let sources = walk.walk(plan)?;
    let mut columns = Vec::with_capacity(sources.len());
    for (f, s) in plan.schema().fields().iter().zip(sources) {
        // Every released column was checked by a projection; check again at the root so a
        // plan without one cannot release a direct identifier.
        walk.released(&s)?;
        let cp = walk.policy_of(&s)?;
        columns.push(OutColumn {
            name: f.name().clone(),
            rule: walk.rule_of(&s, cp)?,
            class: cp.class,
            domain: cp.domain.clone(),
            source: s,
        });
    }
    Ok(Checked {
        plan: plan.clone(),
        columns,
    })
}

fn unit_column(plan: &LogicalPlan) -> Result<Expr> {
    let (q, f) = plan
        .schema()
        .qualified_field_with_unqualified_name(UNIT_COLUMN)
        .map_err(|_| Error::Engine("the unit column is missing".into()))?;
    Ok(Expr::Column(Column::from((q, f))))
}

/// The plan to run (its scans already guarded): the unit column carried up through every
/// projection (as the last output column) for pseudonyms and k-anonymity.
fn rewrite(plan: &LogicalPlan) -> Result<LogicalPlan> {
    match plan {
        LogicalPlan::TableScan(_) => Ok(plan.clone()),
        LogicalPlan::Projection(p) => {
            let child = rewrite(&p.input)?;
            let mut exprs = p.expr.clone();
            exprs.push(unit_column(&child)?);
            Ok(LogicalPlan::Projection(Projection::try_new(
                exprs,
                Arc::new(child),
            )?))
        }
        other => {
            let inputs = other.inputs();
            let [input] = inputs.as_slice() else {
                return Err(Error::Engine("unexpected plan shape in an extract".into()));
            };
            let child = rewrite(input)?;
            Ok(other.with_new_exprs(other.expressions(), vec![child])?)
        }
    }
}

/// What an extract's pseudonyms are keyed with besides the study secret: its normalized SQL
/// and consent snapshot (see [`StudySecret::pseudonymizer_for`]).
pub fn pseudonym_context(sql: &str, consent_digest: &[u8; 32]) -> Vec<u8> {
    let mut c = (sql.len() as u64).to_le_bytes().to_vec();
    c.extend_from_slice(sql.as_bytes());
    c.extend_from_slice(consent_digest);
    c
}

impl Engine {
    /// Runs a de-identified, k-anonymous extract. Nothing is released on any error.
    pub async fn extract(&self, req: &ExtractRequest<'_>) -> Result<Extract> {
        if req.k == 0 {
            return Err(Error::InvalidQuery("k must be at least 1".into()));
        }
        let sql = std::panic::catch_unwind(|| normalize_sql(req.sql))
            .unwrap_or_else(|_| Err(crate::engine::unplannable()))?;
        let prepared = self.consent(req.filter);
        let consent = prepared.digest;
        // Planning reads no row: a panic in it is a refusal of the query.
        let planned = async {
            let (plan, calls) = crate::plan::make_total(self.analyzed(&sql).await?)?;
            Ok::<_, Error>((check(&plan, self.dataset())?, calls))
        };
        let (checked, calls) =
            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(planned))
                .await
                .unwrap_or_else(|_| Err(crate::engine::unplannable()))?;
        // Its worst case, as if every table's rows went through every call.
        let rows = self
            .dataset()
            .tables
            .iter()
            .map(|t| self.dataset().table_rows(&t.name))
            .fold(0, u64::saturating_add);
        let worst = self.worst_case(rows, calls).await?;
        let run = async {
            let plan = rewrite(&self.guarded(checked.plan.clone(), prepared.set.as_ref())?)?;
            let out_schema = plan.schema().inner().clone();
            let mut batches = self.collect(plan).await?;
            if batches.is_empty() {
                batches.push(RecordBatch::new_empty(out_schema));
            }
            let pseudonyms = req
                .secret
                .pseudonymizer_for(&pseudonym_context(&sql, &consent));
            let released = generalize(&checked.columns, &batches, req, &pseudonyms)?;
            let qi: Vec<usize> = checked
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    matches!(c.class, ColumnClass::QuasiIdentifier | ColumnClass::Public)
                })
                .map(|(i, _)| i)
                .collect();
            let (batches, suppressed) = k_anonymize(&released, &qi, req.k)?;
            let schema = released[0].0.schema();
            let batches = vec![sorted(&schema, &batches)?];
            let result_digest = crate::release::digest(&schema, &batches)?;
            Ok::<_, Error>(Extract {
                rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
                schema,
                batches,
                sql: sql.clone(),
                consent_digest: consent,
                result_digest,
                suppressed_rows: suppressed,
                k: req.k,
                quasi_identifiers: qi
                    .iter()
                    .map(|&i| checked.columns[i].name.clone())
                    .collect(),
            })
        };
        let bounded = tokio::time::timeout(self.limits().deadline, run);
        let drawn = crate::schedule::on_schedule(
            self.limits().ladder,
            worst,
            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(bounded)),
        );
        match drawn.await {
            Ok(Ok(Ok(x))) => Ok(x),
            Ok(Ok(Err(e))) => {
                tracing::warn!(kind = e.kind(), "an extract failed while running");
                Err(Error::Failed {
                    epsilon: 0.0,
                    delta: 0.0,
                    rho: None,
                })
            }
            Ok(Err(_)) | Err(_) => Err(Error::Failed {
                epsilon: 0.0,
                delta: 0.0,
                rho: None,
            }),
        }
    }
}

/// Domain checks, generalizations and pseudonyms: each output batch in its released form,
/// with its rows' unit numbers.
fn generalize(
    columns: &[OutColumn],
    batches: &[RecordBatch],
    req: &ExtractRequest<'_>,
    pseudonyms: &crate::pseudonym::Pseudonymizer,
) -> Result<Vec<(RecordBatch, UInt32Array)>> {
    let mut out = Vec::with_capacity(batches.len());
    let mut schema: Option<SchemaRef> = None;
    for b in batches {
        let unit_idx = b
            .schema()
            .fields()
            .iter()
            .rposition(|f| f.name() == UNIT_COLUMN)
            .ok_or_else(|| Error::Engine("the unit column is missing".into()))?;
        let units = b.column(unit_idx).as_primitive::<UInt32Type>().clone();
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len());
        for (i, c) in columns.iter().enumerate() {
            let mut a = crate::safe_harbor::plain_text(b.column(i))?;
            if let Some(d) = &c.domain {
                a = crate::safe_harbor::within_domain(&a, d)?;
            }
            arrays.push(match c.class {
                ColumnClass::PrivacyUnit => pseudonyms.pseudonymize(&a, &units)?,
                ColumnClass::DirectIdentifier => {
                    return Err(Error::Engine(
                        "a direct identifier reached the output".into(),
                    ));
                }
                _ => c.rule.apply(&c.source, &a, req.reference_date)?,
            });
        }
        let schema = schema
            .get_or_insert_with(|| {
                Arc::new(Schema::new(
                    columns
                        .iter()
                        .zip(&arrays)
                        .map(|(c, a)| Field::new(&c.name, a.data_type().clone(), true))
                        .collect::<Vec<_>>(),
                ))
            })
            .clone();
        let batch =
            RecordBatch::try_new(schema, arrays).map_err(|e| Error::Engine(e.to_string()))?;
        out.push((batch, units));
    }
    Ok(out)
}

/// The released rows in the order of their released values (every column, ascending, nulls
/// first): never in the order the table stores them, which two extracts of the same rows
/// would share, so rows could be matched by position across extracts (the pseudonyms, fresh
/// per extract, sort the rows of an extract that carries them in an order of its own).
fn sorted(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let eng = |e: arrow::error::ArrowError| Error::Engine(e.to_string());
    let all = arrow::compute::concat_batches(schema, batches).map_err(eng)?;
    if all.num_rows() < 2 || all.num_columns() == 0 {
        return Ok(all);
    }
    let columns: Vec<arrow::compute::SortColumn> = all
        .columns()
        .iter()
        .map(|c| arrow::compute::SortColumn {
            values: c.clone(),
            options: Some(arrow::compute::SortOptions {
                descending: false,
                nulls_first: true,
            }),
        })
        .collect();
    let order = arrow::compute::lexsort_to_indices(&columns, None).map_err(eng)?;
    arrow::compute::take_record_batch(&all, &order).map_err(eng)
}

/// Suppresses every row whose quasi-identifier values (columns `qi`) are shared by fewer than
/// `k` distinct units over the whole output. Returns the kept rows and the number suppressed.
fn k_anonymize(
    batches: &[(RecordBatch, UInt32Array)],
    qi: &[usize],
    k: u32,
) -> Result<(Vec<RecordBatch>, u64)> {
    let eng = |e: arrow::error::ArrowError| Error::Engine(e.to_string());
    // Equivalence class of each row: its quasi-identifier values in Arrow's row format.
    let mut class_of: HashMap<Box<[u8]>, u32> = HashMap::new();
    let mut classes: Vec<Vec<u32>> = Vec::with_capacity(batches.len());
    let converter = match batches.first() {
        Some((b, _)) if !qi.is_empty() => Some(
            RowConverter::new(
                qi.iter()
                    .map(|&i| SortField::new(b.column(i).data_type().clone()))
                    .collect(),
            )
            .map_err(eng)?,
        ),
        _ => None,
    };
    let mut pairs: Vec<u64> = Vec::new();
    for (b, units) in batches {
        let mut ids = Vec::with_capacity(b.num_rows());
        match &converter {
            Some(conv) => {
                let cols: Vec<ArrayRef> = qi.iter().map(|&i| b.column(i).clone()).collect();
                let rows = conv.convert_columns(&cols).map_err(eng)?;
                for r in rows.iter() {
                    let key = r.as_ref();
                    let id = match class_of.get(key) {
                        Some(&id) => id,
                        None => {
                            let id = u32::try_from(class_of.len())
                                .map_err(|_| Error::Engine("too many classes".into()))?;
                            class_of.insert(key.into(), id);
                            id
                        }
                    };
                    ids.push(id);
                }
            }
            None => ids.resize(b.num_rows(), 0),
        }
        pairs.extend(
            ids.iter()
                .zip(units.values())
                .map(|(&c, &u)| (u64::from(c) << 32) | u64::from(u)),
        );
        classes.push(ids);
    }
    // Distinct units per class.
    pairs.sort_unstable();
    pairs.dedup();
    let mut units_in = vec![0u32; class_of.len().max(1)];
    for p in &pairs {
        units_in[(p >> 32) as usize] += 1;
    }
    let mut out = Vec::with_capacity(batches.len());
    let mut suppressed = 0u64;
    for ((b, _), ids) in batches.iter().zip(&classes) {
        let mask: BooleanArray = ids
            .iter()
            .map(|&c| Some(units_in[c as usize] >= k))
            .collect();
        suppressed += mask.false_count() as u64;
        let kept = if mask.false_count() == 0 {
            b.clone()
        } else {
            arrow::compute::filter_record_batch(b, &mask).map_err(eng)?
        };
        if kept.num_rows() > 0 || out.is_empty() {
            out.push(kept);
        }
    }
    Ok((out, suppressed))
}

/// The minimum cell-size rule for aggregate results released outside differential privacy:
/// a cell counting from 1 to `min - 1` is not shown (CMS cell suppression policy: no cell of 1
/// to 10, i.e. `MinCellSize(11)`); 0 is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinCellSize(pub u64);

impl MinCellSize {
    /// CMS's rule: counts 1 to 10 are suppressed.
    pub const CMS: MinCellSize = MinCellSize(11);

    /// Nulls the `count` column where it is from 1 to `min - 1`, and in those rows also each
    /// `dependent` column (sums, means: statistics of the same small cell). Returns the batch
    /// and the number of cells suppressed. Unknown columns are errors naming them.
    pub fn apply(
        &self,
        batch: &RecordBatch,
        count: &str,
        dependent: &[&str],
    ) -> Result<(RecordBatch, u64)> {
        use arrow::compute::kernels::{boolean, cmp};
        let eng = |e: arrow::error::ArrowError| Error::Engine(e.to_string());
        let index = |name: &str| {
            batch
                .schema()
                .index_of(name)
                .map_err(|_| Error::InvalidQuery(format!("unknown column {name}")))
        };
        let ci = index(count)?;
        let counts = arrow::compute::cast(batch.column(ci), &DataType::UInt64)
            .map_err(|_| Error::InvalidQuery(format!("column {count} is not a count")))?;
        let lo = arrow::array::UInt64Array::new_scalar(1);
        let hi = arrow::array::UInt64Array::new_scalar(self.0);
        let small = boolean::and(
            &cmp::gt_eq(&counts, &lo).map_err(eng)?,
            &cmp::lt(&counts, &hi).map_err(eng)?,
        )
        .map_err(eng)?;
        let n = small.true_count() as u64;
        if n == 0 {
            return Ok((batch.clone(), 0));
        }
        let mut targets = vec![ci];
        for d in dependent {
            targets.push(index(d)?);
        }
        let mut cols = batch.columns().to_vec();
        for i in targets {
            cols[i] = arrow::compute::nullif(&cols[i], &small).map_err(eng)?;
        }
        let fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(eng)?;
        Ok((out, n))
    }
}

#[cfg(test)]
mod tests;
