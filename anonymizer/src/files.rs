//! Reading a table's file: Parquet (`.parquet`), CSV (`.csv`, with a header row) or Arrow IPC
//! (file or stream format, any other name).
//!
//! CSV columns are typed from their values, over every row: a column is an integer only where
//! every value is written as that integer prints (a leading zero or a `+` keeps a ZIP code or a
//! record number as text, as does a number too large for 64 bits), otherwise a float, a
//! boolean, a date (`YYYY-MM-DD`) or a timestamp where every value is one, and text in all other
//! cases. An empty field is a null. Errors name the file and the line, never a value.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::compute::{CastOptions, cast, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{Error, Result};

/// Whether `path` names a CSV file (by its extension, in any case).
pub fn is_csv(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Whether `path` names a Parquet file.
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Every record batch of a table file, with its schema.
pub fn read_batches(path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let err = |e: &dyn std::fmt::Display| Error::Dataset(format!("{name}: {e}"));
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    if is_csv(path) {
        return read_csv(path).map_err(|e| err(&e));
    }
    if is_parquet(path) {
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| err(&e))?;
        let schema = builder.schema().clone();
        let batches = builder
            .build()
            .map_err(|e| err(&e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| err(&e))?;
        return Ok((schema, batches));
    }
    match arrow::ipc::reader::FileReader::try_new(file, None) {
        Ok(r) => {
            let schema = r.schema();
            let batches = r
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| err(&e))?;
            Ok((schema, batches))
        }
        Err(_) => {
            let file = std::fs::File::open(path).map_err(|e| err(&e))?;
            let r = arrow::ipc::reader::StreamReader::try_new(file, None)
                .map_err(|_| err(&"not a Parquet (.parquet), CSV (.csv) or Arrow IPC file"))?;
            let schema = r.schema();
            let batches = r
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| err(&e))?;
            Ok((schema, batches))
        }
    }
}

/// A CSV file with a header row, every column typed from its values (see the module's text).
fn read_csv(path: &Path) -> std::result::Result<(SchemaRef, Vec<RecordBatch>), String> {
    use arrow::csv::reader::{Format, ReaderBuilder};
    let empty_is_null = regex::Regex::new("^$").map_err(|e| e.to_string())?;
    let format = Format::default()
        .with_header(true)
        .with_null_regex(empty_is_null);
    let open = || std::fs::File::open(path).map_err(|e| e.to_string());
    // The candidate types, from every record.
    let (inferred, _) = format
        .infer_schema(open()?, None)
        .map_err(|e| format!("not a readable CSV file ({})", redact(&e.to_string())))?;
    if inferred.fields().is_empty() {
        return Err("the CSV file has no header row".into());
    }
    // Every column as text, then each given its candidate type where every value fits it.
    let text_schema = Arc::new(Schema::new(
        inferred
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let text: Vec<RecordBatch> = ReaderBuilder::new(text_schema.clone())
        .with_format(format)
        .build(open()?)
        .map_err(|e| redact(&e.to_string()))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("not a readable CSV file ({})", redact(&e.to_string())))?;
    let types: Vec<DataType> = inferred
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let candidate = f.data_type();
            let fits = *candidate != DataType::Utf8
                && *candidate != DataType::Null
                && text.iter().all(|b| typed(b.column(i), candidate).is_some());
            if fits {
                candidate.clone()
            } else {
                DataType::Utf8
            }
        })
        .collect();
    let schema = Arc::new(Schema::new(
        text_schema
            .fields()
            .iter()
            .zip(&types)
            .map(|(f, t)| Field::new(f.name(), t.clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batches = text
        .iter()
        .map(|b| {
            let columns: Vec<ArrayRef> = b
                .columns()
                .iter()
                .zip(&types)
                .map(|(c, t)| typed(c, t).unwrap_or_else(|| c.clone()))
                .collect();
            RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// `text` as `to`, or `None` when a value does not convert; integers must also print back as
/// written (so `02139` stays text).
fn typed(text: &ArrayRef, to: &DataType) -> Option<ArrayRef> {
    if *to == DataType::Utf8 {
        return Some(text.clone());
    }
    let strict = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    let out = cast_with_options(text, to, &strict).ok()?;
    if out.null_count() != text.null_count() {
        return None;
    }
    if to.is_integer() {
        let back = cast(&out, &DataType::Utf8).ok()?;
        if back.as_ref() != text.as_ref() {
            return None;
        }
    }
    Some(out)
}

/// An error message of the CSV reader without the field it quotes (it may hold a value).
fn redact(message: &str) -> String {
    match message.find(['\'', '"']) {
        Some(i) => format!("{}…", message[..i].trim_end()),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray as _;
    use std::io::Write as _;

    fn csv(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("visits.csv");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        (dir, path)
    }

    #[test]
    fn csv_columns_are_typed_from_every_value() {
        let (_d, path) = csv("patient_id,zip,age,hba1c,visit_date,smoker,mrn,note\n\
             1,02139,54,6.1,2021-03-04,true,123,a\n\
             2,10001,,7.25,2022-11-30,false,99999999999999999999,\n\
             3,94110,61,5,2020-01-01,true,7,c d\n");
        let (schema, batches) = read_batches(&path).unwrap();
        let types: Vec<(&str, &DataType)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), f.data_type()))
            .collect();
        assert_eq!(
            types,
            [
                ("patient_id", &DataType::Int64),
                // A leading zero: text, so 02139 stays 02139.
                ("zip", &DataType::Utf8),
                ("age", &DataType::Int64),
                ("hba1c", &DataType::Float64),
                ("visit_date", &DataType::Date32),
                ("smoker", &DataType::Boolean),
                // Too large for 64 bits: text, never wrapped or rounded.
                ("mrn", &DataType::Utf8),
                ("note", &DataType::Utf8),
            ]
        );
        let b = arrow::compute::concat_batches(&schema, &batches).unwrap();
        assert_eq!(b.num_rows(), 3);
        assert_eq!(b.column(1).as_string::<i32>().value(0), "02139");
        assert!(b.column(2).is_null(1), "an empty field is a null");
        assert!(b.column(7).is_null(1));
        assert_eq!(
            b.column(6).as_string::<i32>().value(1),
            "99999999999999999999"
        );
    }

    #[test]
    fn unreadable_csv_is_refused_without_its_values() {
        // A row with more fields than the header.
        let (_d, path) = csv("a,b\n1,2\n3,4,SECRET-VALUE\n");
        let e = read_batches(&path).unwrap_err().to_string();
        assert!(e.contains("visits.csv"), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
        let (_d, path) = csv("");
        assert!(read_batches(&path).is_err());
    }
}
