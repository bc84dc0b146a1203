//! Dataset manifests: what a custodian signs when registering a dataset version (every file's
//! SHA-256, size and rows, each table's schema, one digest for the version).

use std::io::Read;
use std::path::{Component, Path};

use anyhow::Context as _;
use arrow::datatypes::Schema;
use ledger::entry::{ColumnManifest, FileManifest, TableManifest};
use ledger::ids::Digest;
use sha2::Digest as _;

/// SHA-256 and size of a file, read in 1 MiB blocks.
pub fn hash_file(path: &Path) -> anyhow::Result<(Digest, u64)> {
    hash_file_progress(path, &mut |_| {})
}

/// [`hash_file`], calling `progress` with the number of bytes of each block read.
pub fn hash_file_progress(
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<(Digest, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
        progress(k as u64);
    }
    Ok((Digest::from_bytes(h.finalize().into()), n))
}

/// Rows and schema of a Parquet (`.parquet`) or Arrow IPC file, from its metadata. A CSV file
/// is refused: registration stores it converted to Parquet ([`parquet_beside`]).
pub fn file_shape(path: &Path) -> anyhow::Result<(u64, Schema)> {
    anyhow::ensure!(
        !anonymizer::files::is_csv(path),
        "{} is CSV: a registration stores a CSV file converted to Parquet beside it; use that \
         .parquet file",
        path.display()
    );
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if anonymizer::files::is_parquet(path) {
        let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
        let rows = b.metadata().file_metadata().num_rows();
        Ok((u64::try_from(rows)?, b.schema().as_ref().clone()))
    } else {
        let r = arrow::ipc::reader::FileReader::try_new(f, None)
            .with_context(|| format!("{} is not a readable Arrow IPC file", path.display()))?;
        let schema = r.schema().as_ref().clone();
        let mut rows = 0u64;
        for b in r {
            rows += b?.num_rows() as u64;
        }
        Ok((rows, schema))
    }
}

/// Writes a CSV file's table as Parquet beside it (`visits.csv` → `visits.parquet`): the file
/// a registration records and stores. A Parquet file already there is kept when it holds
/// exactly what this conversion writes (a registration run again), and refused otherwise.
/// The file is written whole, synced, then renamed into place.
pub fn parquet_beside(
    csv: &Path,
    schema: arrow::datatypes::SchemaRef,
    batches: &[arrow::array::RecordBatch],
) -> anyhow::Result<std::path::PathBuf> {
    let mut bytes = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, None)
        .with_context(|| format!("converting {} to Parquet", csv.display()))?;
    for b in batches {
        w.write(b)
            .with_context(|| format!("converting {} to Parquet", csv.display()))?;
    }
    w.close()
        .with_context(|| format!("converting {} to Parquet", csv.display()))?;
    let out = csv.with_extension("parquet");
    match std::fs::read(&out) {
        Ok(existing) if existing == bytes => return Ok(out),
        Ok(_) => anyhow::bail!(
            "{} exists and is not the conversion of {}: register it as it is, or move it away",
            out.display(),
            csv.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    }
    let partial = csv.with_extension("parquet.partial");
    let mut f = std::fs::File::create(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::io::Write::write_all(&mut f, &bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &out).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// Checks a manifest path: relative, plain components only, no `..`, printable.
pub fn check_path(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 512
        && !p.contains('\\')
        && !p.chars().any(char::is_control)
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && p != "policy.toml";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "file path {p:?} must be relative, without `..`, and not policy.toml"
        ))
    }
}

/// The manifest of one table from its files: `(path as registered, file on disk)`. `progress`
/// is called with the bytes hashed.
pub fn table_manifest(
    name: &str,
    files: &[(String, &Path)],
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<TableManifest> {
    anyhow::ensure!(!files.is_empty(), "table {name} has no files");
    let mut out = Vec::new();
    let mut schema: Option<Schema> = None;
    let mut total = 0;
    for (rel, path) in files {
        check_path(rel).map_err(anyhow::Error::msg)?;
        let (sha256, bytes) = hash_file_progress(path, progress)?;
        let (rows, s) = file_shape(path)?;
        if let Some(first) = &schema {
            anyhow::ensure!(
                first.fields() == s.fields(),
                "{} has a different schema from the table's first file",
                path.display()
            );
        } else {
            schema = Some(s);
        }
        total += rows;
        out.push(FileManifest {
            path: rel.clone(),
            bytes,
            sha256,
            rows,
        });
    }
    let schema = schema.context("no schema")?;
    Ok(TableManifest {
        name: name.to_owned(),
        rows: total,
        columns: columns_of(&schema),
        files: out,
    })
}

/// A schema's columns as the manifest records them.
pub fn columns_of(schema: &Schema) -> Vec<ColumnManifest> {
    schema
        .fields()
        .iter()
        .map(|f| ColumnManifest {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_confined_to_the_dataset() {
        for ok in ["a.parquet", "visits/part-0.parquet"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x.parquet",
            "/etc/passwd",
            "a/../../b",
            "./a",
            "policy.toml",
            "a\\b",
            "a\nb",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}
