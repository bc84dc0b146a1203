//! Dataset versions: registered by their custodian, with their files' digests.

use super::super::consent::WHOLE;
use super::super::{Dataset, DatasetVersion};
use super::*;
use crate::entry::{ConsentScope, DatasetRegistered};
use std::sync::Arc;

impl State {
    /// Registers a dataset version (a new version of a dataset, or its first).
    pub(super) fn register_dataset(
        &mut self,
        b: &DatasetRegistered,
        a: &Applying<'_>,
    ) -> Result<()> {
        a.need(&[Role::Custodian])?;
        self.check_dataset(a.author, b)?;
        let version = DatasetVersion {
            index: a.index,
            reg: Arc::new(b.clone()),
        };
        match self.datasets.get_mut(&b.dataset) {
            Some(ds) => {
                ds.consent_basis = b.consent_basis;
                ds.versions.push(version);
            }
            None => {
                self.datasets.insert(
                    b.dataset.clone(),
                    Dataset {
                        custodian: b.custodian.clone(),
                        consent_basis: b.consent_basis,
                        versions: vec![version],
                    },
                );
            }
        }
        self.bump(
            &ConsentScope {
                datasets: vec![b.dataset.clone()],
                custodian: None,
            },
            WHOLE,
        );
        Ok(())
    }

    pub(super) fn check_dataset(&self, author: &PrincipalId, b: &DatasetRegistered) -> Result<()> {
        for t in &b.tables {
            check_count(t.rows, "rows")?;
            for f in &t.files {
                check_count(f.rows, "rows")?;
                check_count(f.bytes, "bytes")?;
            }
        }
        if b.custodian != *author {
            return Err(Error::Forbidden(
                "a custodian registers only its own datasets".into(),
            ));
        }
        if let Some(ds) = self.datasets.get(&b.dataset) {
            if ds.custodian != b.custodian {
                return Err(Error::Forbidden(format!(
                    "dataset {} belongs to another custodian",
                    b.dataset
                )));
            }
            if ds.versions.iter().any(|v| v.reg.version == b.version) {
                return Err(Error::AlreadyExists(format!(
                    "version {} of dataset {} is registered",
                    b.version, b.dataset
                )));
            }
            if b.version <= ds.latest().reg.version {
                return Err(invalid(format!(
                    "version {} of dataset {} must be greater than {}",
                    b.version,
                    b.dataset,
                    ds.latest().reg.version
                )));
            }
        }
        check_text("privacy_unit", &b.privacy_unit, 128)?;
        if b.tables.is_empty() {
            return Err(invalid("a dataset version needs at least one table"));
        }
        let mut names = HashSet::default();
        for t in &b.tables {
            check_text("table name", &t.name, 128)?;
            if !names.insert(t.name.as_str()) {
                return Err(invalid(format!("table {} listed twice", t.name)));
            }
            if !t.columns.iter().any(|c| c.name == b.privacy_unit) {
                return Err(invalid(format!(
                    "table {} has no privacy-unit column {}",
                    t.name, b.privacy_unit
                )));
            }
            if t.files.iter().map(|f| f.rows).sum::<u64>() != t.rows {
                return Err(invalid(format!(
                    "table {}: file row counts do not add up to rows",
                    t.name
                )));
            }
            for f in &t.files {
                check_text("file path", &f.path, 1024)?;
            }
        }
        if DatasetRegistered::compute_digest(&b.tables) != b.digest {
            return Err(invalid("digest does not match the tables' manifests"));
        }
        Ok(())
    }
}
