//! Loading a dataset version into memory, once, ready for private queries.
//!
//! Every table is read (Parquet or Arrow IPC) and checked against the policy. Two things are
//! done once per version instead of once per query, which keeps the query path at the speed
//! of plain SQL:
//! - each privacy-unit id is given a dense number, stored in an extra column [`UNIT_COLUMN`],
//!   so consent filters are bitmap lookups instead of joins against a million ids;
//! - contribution bounding: a unit with more than the table's `max_rows_per_unit` rows keeps
//!   only its first `max_rows_per_unit` rows (a fixed, per-unit transformation; adding or
//!   removing one unit never changes another unit's rows).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanBuilder, RecordBatch, UInt32Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::error::{Error, Result};
use crate::policy::Policy;

/// The column added to every table with the dense number of the row's privacy unit.
pub const UNIT_COLUMN: &str = "__consentry_unit";

/// Privacy-unit ids as they appear in the data, and their dense numbers.
#[derive(Debug, Default)]
pub struct UnitIndex {
    ints: HashMap<i64, u32>,
    strings: HashMap<String, u32>,
}

impl UnitIndex {
    /// Number of distinct units.
    pub fn len(&self) -> usize {
        self.ints.len() + self.strings.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The dense number of a unit id given as text (integer ids are parsed).
    pub fn lookup(&self, id: &str) -> Option<u32> {
        if !self.ints.is_empty() {
            return id
                .parse::<i64>()
                .ok()
                .and_then(|v| self.ints.get(&v).copied());
        }
        self.strings.get(id).copied()
    }
    fn number(&mut self, col: &ArrayRef) -> Result<UInt32Array> {
        let next = |n: usize| u32::try_from(n).map_err(|_| Error::Dataset("too many units".into()));
        let mut out = Vec::with_capacity(col.len());
        if col.null_count() > 0 {
            return Err(Error::Dataset("the privacy-unit column has nulls".into()));
        }
        // Parquet readers give text as `Utf8View`: number every text type as `Utf8`.
        let col = &crate::safe_harbor::plain_text(col)?;
        match col.data_type() {
            DataType::Int64 => {
                for v in col.as_primitive::<Int64Type>().values() {
                    let n = next(self.ints.len())?;
                    out.push(*self.ints.entry(*v).or_insert(n));
                }
            }
            DataType::Int32 => {
                for v in col.as_primitive::<arrow::datatypes::Int32Type>().values() {
                    let n = next(self.ints.len())?;
                    out.push(*self.ints.entry(i64::from(*v)).or_insert(n));
                }
            }
            DataType::Utf8 => {
                for v in col.as_string::<i32>().iter().flatten() {
                    let n = next(self.strings.len())?;
                    match self.strings.get(v) {
                        Some(&c) => out.push(c),
                        None => {
                            self.strings.insert(v.to_string(), n);
                            out.push(n);
                        }
                    }
                }
            }
            other => {
                return Err(Error::Dataset(format!(
                    "privacy-unit column of type {other} is not supported"
                )));
            }
        }
        Ok(UInt32Array::from(out))
    }
}

impl Table {
    /// For each of its columns with a public domain, how many of its (bounded) rows hold a
    /// value that is not NULL and not in the domain: a GROUP BY over the column would leave
    /// them out, so a registration refuses them (the count only, never the values). Rows past
    /// a patient's bound are in no answer and not counted.
    pub fn outside_domains(&self, policy: &Policy) -> Result<Vec<(String, u64)>> {
        let (table, batches) = (&self.name, &self.batches);
        let Some(tp) = policy.tables.get(table) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (column, cp) in &tp.columns {
            let Some(domain) = &cp.domain else {
                continue;
            };
            let keys: std::collections::HashSet<String> = domain.as_text().into_iter().collect();
            let mut outside = 0u64;
            for b in batches {
                let Some(c) = b.column_by_name(column) else {
                    continue;
                };
                let text = arrow::compute::cast(c, &DataType::Utf8)
                    .map_err(|e| Error::Dataset(format!("table {table}, column {column}: {e}")))?;
                outside += text
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .filter(|v| !keys.contains(*v))
                    .count() as u64;
            }
            out.push((column.clone(), outside));
        }
        Ok(out)
    }

    /// For each of its columns declared `per_unit`, how many units hold more than one value
    /// in it (NULL is a value): a registration refuses them, since every query would drop
    /// such a unit's rows past its first group (the count only, never the values). Rows past
    /// a unit's bound are in no answer and not looked at.
    pub fn varying_per_unit(&self, policy: &Policy) -> Result<Vec<(String, u64)>> {
        let (table, batches) = (&self.name, &self.batches);
        let Some(tp) = policy.tables.get(table) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (column, _) in tp.columns.iter().filter(|(_, cp)| cp.per_unit) {
            let parts = batches.iter().filter_map(|b| {
                let units = b.column_by_name(UNIT_COLUMN)?;
                let units = units.as_primitive::<arrow::datatypes::UInt32Type>();
                Some((b.column_by_name(column)?, units.values().as_ref()))
            });
            let varying = units_with_several_values(parts)
                .map_err(|e| Error::Dataset(format!("table {table}, column {column}: {e}")))?;
            out.push((column.clone(), varying));
        }
        Ok(out)
    }
}

/// How many units hold more than one value (NULL being one) in a column given in parts, each
/// with its rows' dense unit numbers.
pub(crate) fn units_with_several_values<'a>(
    parts: impl IntoIterator<Item = (&'a ArrayRef, &'a [u32])>,
) -> std::result::Result<u64, arrow::error::ArrowError> {
    // Each unit's first value, and whether another was seen.
    let mut first: Vec<Option<(Option<String>, bool)>> = Vec::new();
    for (column, units) in parts {
        let text = arrow::compute::cast(column, &DataType::Utf8)?;
        for (v, &u) in text.as_string::<i32>().iter().zip(units) {
            let u = u as usize;
            if u >= first.len() {
                first.resize(u + 1, None);
            }
            match &mut first[u] {
                Some((seen, varies)) => *varies |= seen.as_deref() != v,
                slot @ None => *slot = Some((v.map(str::to_owned), false)),
            }
        }
    }
    Ok(first.iter().flatten().filter(|(_, varies)| *varies).count() as u64)
}

/// One table of a dataset, in memory.
#[derive(Debug)]
pub struct Table {
    /// Table name.
    pub name: String,
    /// Schema with the unit column.
    pub schema: SchemaRef,
    /// Batches, bounded.
    pub batches: Vec<RecordBatch>,
    /// Rows dropped by contribution bounding.
    pub rows_dropped: u64,
}

/// A dataset version loaded for querying.
#[derive(Debug)]
pub struct Dataset {
    /// The column policy.
    pub policy: Policy,
    /// Tables by name.
    pub tables: Vec<Arc<Table>>,
    /// Privacy units.
    pub units: UnitIndex,
}

/// Where a table's data comes from.
#[derive(Debug, Clone)]
pub struct TableSource {
    /// Table name as queried.
    pub name: String,
    /// Its files (Parquet `.parquet` or Arrow IPC `.arrow`/`.feather`).
    pub files: Vec<std::path::PathBuf>,
}

async fn read_files(files: &[std::path::PathBuf]) -> Result<Vec<RecordBatch>> {
    let ctx = SessionContext::new();
    let mut out = Vec::new();
    for f in files {
        let path = f
            .to_str()
            .ok_or_else(|| Error::Dataset("file paths must be UTF-8".into()))?;
        let is_parquet = f.extension().is_some_and(|e| e == "parquet");
        let df = if is_parquet {
            ctx.read_parquet(path, ParquetReadOptions::default()).await
        } else {
            ctx.read_arrow(path, Default::default()).await
        }
        .map_err(|e| Error::Dataset(format!("{}: {e}", file_name(f))))?;
        out.extend(
            df.collect()
                .await
                .map_err(|e| Error::Dataset(format!("{}: {e}", file_name(f))))?,
        );
    }
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Dataset {
    /// Reads every table, checks it against the policy (every column classified), numbers
    /// the privacy units and bounds each unit's rows.
    pub async fn load(policy: Policy, sources: &[TableSource]) -> Result<Dataset> {
        policy.check()?;
        let mut units = UnitIndex::default();
        let mut tables = Vec::new();
        for src in sources {
            let batches = read_files(&src.files).await?;
            let Some(first) = batches.first() else {
                return Err(Error::Dataset(format!("table {} has no rows", src.name)));
            };
            let schema = first.schema();
            policy.check_schema(&src.name, &schema)?;
            tables.push(Arc::new(Self::prepare(
                &policy, &src.name, &schema, batches, &mut units,
            )?));
        }
        Ok(Dataset {
            policy,
            tables,
            units,
        })
    }

    /// Builds a dataset from batches already in memory (tests, benchmarks).
    pub fn from_batches(
        policy: Policy,
        tables: Vec<(String, Vec<RecordBatch>)>,
    ) -> Result<Dataset> {
        policy.check()?;
        let mut units = UnitIndex::default();
        let mut out = Vec::new();
        for (name, batches) in tables {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .ok_or_else(|| Error::Dataset(format!("table {name} has no rows")))?;
            policy.check_schema(&name, &schema)?;
            out.push(Arc::new(Self::prepare(
                &policy, &name, &schema, batches, &mut units,
            )?));
        }
        if !units.ints.is_empty() && !units.strings.is_empty() {
            return Err(Error::Dataset(format!(
                "the privacy unit {} is a number in some tables and text in others: give it one \
                 type in every table",
                policy.privacy_unit
            )));
        }
        Ok(Dataset {
            policy,
            tables: out,
            units,
        })
    }

    fn prepare(
        policy: &Policy,
        name: &str,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
        units: &mut UnitIndex,
    ) -> Result<Table> {
        let unit_idx = schema.index_of(&policy.privacy_unit).map_err(|_| {
            Error::Policy(format!(
                "table {name} has no privacy-unit column {}",
                policy.privacy_unit
            ))
        })?;
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(UNIT_COLUMN, DataType::UInt32, false)));
        let out_schema = Arc::new(Schema::new(fields));
        let k = policy.table_bounds(name).rows;
        let mut seen: Vec<u32> = Vec::new();
        let mut out = Vec::with_capacity(batches.len());
        let mut dropped = 0u64;
        for b in batches {
            let codes = units.number(b.column(unit_idx))?;
            let mut keep = BooleanBuilder::with_capacity(codes.len());
            let mut all = true;
            for &c in codes.values() {
                let c = c as usize;
                if c >= seen.len() {
                    seen.resize(c + 1, 0);
                }
                seen[c] += 1;
                let ok = seen[c] <= k;
                all &= ok;
                keep.append_value(ok);
            }
            let mut cols = b.columns().to_vec();
            cols.push(Arc::new(codes));
            let batch = RecordBatch::try_new(out_schema.clone(), cols)
                .map_err(|e| Error::Dataset(e.to_string()))?;
            let batch = if all {
                batch
            } else {
                let mask = keep.finish();
                dropped += mask.false_count() as u64;
                filter_record_batch(&batch, &mask).map_err(|e| Error::Dataset(e.to_string()))?
            };
            out.push(batch);
        }
        Ok(Table {
            name: name.to_string(),
            schema: out_schema,
            batches: out,
            rows_dropped: dropped,
        })
    }

    /// Registers every table in `ctx` as an in-memory table.
    pub fn register(&self, ctx: &SessionContext) -> Result<()> {
        // One partition per core, so scans and aggregates run in parallel.
        let parts = std::thread::available_parallelism().map_or(1, |n| n.get());
        for t in &self.tables {
            let mut partitions = vec![Vec::new(); parts];
            for (i, b) in t.batches.iter().enumerate() {
                partitions[i % parts].push(b.clone());
            }
            let mem = MemTable::try_new(t.schema.clone(), partitions)?;
            ctx.register_table(t.name.as_str(), Arc::new(mem))?;
        }
        Ok(())
    }

    /// Rows of table `name` after bounding (0 for an unknown table).
    pub fn table_rows(&self, name: &str) -> u64 {
        self.tables
            .iter()
            .filter(|t| t.name == name)
            .flat_map(|t| &t.batches)
            .map(|b| b.num_rows() as u64)
            .sum()
    }

    /// Total rows after bounding.
    pub fn rows(&self) -> u64 {
        self.tables
            .iter()
            .flat_map(|t| &t.batches)
            .map(|b| b.num_rows() as u64)
            .sum()
    }
}
